"""Which ports a local run opens: Beam's multi-processing gRPC servers, bound to loopback."""

import ipaddress
import os
import threading
import time

import pytest

from vaewatch.model.scoring import ScoringOverrides
from vaewatch.pipeline.score import ScoreJob, ScoreOptions, run


def _listening_addresses() -> set[str]:
    """Local addresses of the TCP sockets this process is listening on (Linux /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A = LISTEN
                    continue
                hex_ip, hex_port = local.split(":")
                raw = bytes.fromhex(hex_ip)
                # /proc prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(f"{ipaddress.ip_address(raw)}:{int(hex_port, 16)}")
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp6"), reason="reads Linux /proc")
def test_multi_process_workers_listen_on_loopback_only(trained, workspace, tmp_path):
    job, _ = trained
    before = _listening_addresses()
    seen: set[str] = set()
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.update(_listening_addresses() - before)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run(
            ScoreJob(
                input=str(workspace / "holdout"),
                output=str(tmp_path / "out"),
                model="models:/transactions@champion",
                tracking_uri=job.tracking_uri,
                options=ScoreOptions(overrides=ScoringOverrides(k=4), workers=2),
            )
        )
    finally:
        done.set()
        watcher.join()
    hosts = {ipaddress.ip_address(a.rsplit(":", 1)[0]) for a in seen}
    hosts = {getattr(h, "ipv4_mapped", None) or h for h in hosts}  # ::ffff:127.0.0.1
    assert len(seen) >= 4, f"expected Beam's control/data/state/logging servers, saw {seen}"
    assert all(h.is_loopback for h in hosts), f"listening beyond loopback: {sorted(seen)}"
