"""What a run depends on, failing: the registry (slow, alias missing, artifact corrupted or
tampered), the output location (read-only, full), another run of the same nightly date."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.conftest import TRAIN_EXCLUDE
from tests.servers import free_port
from vaewatch.jobs.cli import main
from vaewatch.jobs.train import TrainJob
from vaewatch.jobs.train import run as train_run
from vaewatch.model import registry
from vaewatch.model.training.fit import FitConfig
from vaewatch.model.training.loop import TrainConfig
from vaewatch.pipeline.commit import read_manifest


def _score(tracking_uri, source, out, model="models:/transactions@champion", *extra):
    return CliRunner().invoke(
        main,
        ["score", "--input", str(source), "--output", str(out), "--k", "4",
         "--model", model, "--tracking-uri", tracking_uri, *extra],
    )  # fmt: skip


def _clear_exit_1(result, *needles, code=1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


# ------------------------------------------------------------------------------- registry
@pytest.fixture
def silent_server():
    """Accepts TCP connections and never answers: a hung tracking server."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_hung_tracking_server_fails_fast_and_writes_nothing(silent_server, workspace, tmp_path,
                                                              monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    result = _score(silent_server, workspace / "holdout", tmp_path / "out")
    elapsed = time.monotonic() - started
    _clear_exit_1(
        result, "cannot reach the MLflow tracking server", silent_server, "3 tries", code=75
    )
    # 3 tries x the per-try timeout + 1 s + 2 s of backoff: bounded, not MLflow's minutes
    assert elapsed < 3 * registry.REACH_TIMEOUT + 3 + 15, elapsed
    assert not list(tmp_path.iterdir())


def test_a_missing_alias_names_the_alias_and_the_fix(trained, workspace, tmp_path):
    job, _ = trained
    result = _score(job.tracking_uri, workspace / "holdout", tmp_path / "out",
                    "models:/transactions@nightly")  # fmt: skip
    _clear_exit_1(result, "nightly", "transactions")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def fragile(workspace, tmp_path_factory):
    """A model of its own (the tests below damage its stored artifact and restore it)."""
    previous = Path.cwd()
    os.chdir(workspace)
    try:
        job = TrainJob(
            data=str(workspace / "train" / "part-0.parquet"), model_name="fragile",
            tracking_uri=registry.default_tracking_uri(workspace), progress=False,
            fit=FitConfig(id_column="record_id", exclude=TRAIN_EXCLUDE,
                          train=TrainConfig(epochs=1, device="cpu")),
        )  # fmt: skip
        outcome = train_run(job, echo=lambda _: None)
    finally:
        os.chdir(previous)
    registry.configure(job.tracking_uri)
    uri = mlflow.MlflowClient().get_model_version_download_uri("fragile", outcome.resolved.version)
    stored = Path(uri.removeprefix("file://"))
    folder = next(stored.rglob("config.json")).parent
    backup = tmp_path_factory.mktemp("fragile-backup") / "artifact"
    shutil.copytree(folder, backup)
    return job, folder, backup


@pytest.mark.parametrize(
    "damage, needles",
    [
        (  # an edited config (someone lowers the threshold): the registry's digest catches it
            lambda f: (f / "config.json").write_text(
                (f / "config.json")
                .read_text()
                .replace('"threshold_quantile"', '"threshold_quantile" ', 1)
            ),
            ["modified after registration", "artifact_sha256"],
        ),
        (  # weights swapped for other bytes of the same size
            lambda f: (f / "weights.safetensors").write_bytes(
                bytes(b ^ 0xFF for b in (f / "weights.safetensors").read_bytes())
            ),
            ["weights.safetensors", "does not match the sha256"],
        ),
        (  # a truncated upload
            lambda f: (f / "weights.safetensors").write_bytes(
                (f / "weights.safetensors").read_bytes()[:100]
            ),
            ["weights.safetensors", "does not match the sha256"],
        ),
        (lambda f: (f / "weights.safetensors").unlink(), ["no weights.safetensors"]),
    ],
)
def test_corrupted_or_tampered_artifacts_are_refused(fragile, damage, needles, workspace,
                                                     tmp_path, monkeypatch):  # fmt: skip
    job, folder, backup = fragile
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    ok = _score(
        job.tracking_uri, workspace / "holdout", tmp_path / "ok", "models:/fragile@champion"
    )
    assert ok.exit_code == 0, ok.output  # loads with pickle disallowed: weights only
    damage(folder)
    try:
        result = _score(job.tracking_uri, workspace / "holdout", tmp_path / "out",
                        "models:/fragile@champion")  # fmt: skip
        _clear_exit_1(result, *needles)
        assert not (tmp_path / "out").exists()
    finally:
        shutil.rmtree(folder)
        shutil.copytree(backup, folder)


def test_a_local_model_folder_with_bad_weights_is_refused(trained, workspace, tmp_path):
    _, outcome = trained
    folder = outcome.artifact.save(tmp_path / "model")
    (folder / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"weights_sha256"', '"weights_sha256_"'))
    result = _score("unused", workspace / "holdout", tmp_path / "out", str(folder))
    _clear_exit_1(result, "weights.safetensors", "not a readable safetensors file")


# --------------------------------------------------------------------------- output location
@pytest.fixture
def mount_tmpfs(tmp_path):
    mounted = []

    def mount(name, options):
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        # lazy: after ENOSPC, Beam's failed writer can keep a (deleted) file open in this
        # process, which makes a plain umount fail with "target is busy"
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_read_only_output_location(trained, workspace, tmp_path, mount_tmpfs):
    job, _ = trained
    ro = mount_tmpfs("ro", "ro,size=1m")
    _clear_exit_1(_score(job.tracking_uri, workspace / "holdout", ro / "out"),
                  str(ro / "out"), "Read-only file system", "writable --output")  # fmt: skip


def test_a_full_disk_fails_cleanly_and_keeps_the_previous_output(trained, workspace, tmp_path,
                                                                 mount_tmpfs):  # fmt: skip
    job, _ = trained
    small = tmp_path / "small"
    small.mkdir()
    pq.write_table(pq.read_table(workspace / "holdout").slice(0, 20), small / "a.parquet")
    disk = mount_tmpfs("disk", "size=400k")
    first = _score(job.tracking_uri, small, disk / "out")
    assert first.exit_code == 0, first.output
    previous = read_manifest(str(disk / "out"))
    result = _score(job.tracking_uri, workspace / "holdout", disk / "out")  # 5,000 rows: too big
    _clear_exit_1(result, str(disk / "out"), "no space left on device", "Nothing was committed")
    assert read_manifest(str(disk / "out")) == previous
    assert pq.read_table(disk / "out").num_rows == 20
    assert sorted(p.name for p in disk.iterdir()) == [".out.lock", "out"]  # no staging left


# -------------------------------------------------------------------------- concurrent runs
def test_concurrent_nightly_runs_of_the_same_date(trained, workspace, tmp_path):
    job, _ = trained
    day = tmp_path / "in" / "dt=2026-06-01"
    day.mkdir(parents=True)
    pq.write_table(pq.read_table(workspace / "holdout"), day / "part-0.parquet")
    command = [
        sys.executable, "-m", "vaewatch.jobs.cli", "nightly", "--input-root", str(tmp_path / "in"),
        "--output-root", str(tmp_path / "out"), "--date", "2026-06-01", "--k", "16",
        "--model", "models:/transactions@champion", "--tracking-uri", job.tracking_uri,
    ]  # fmt: skip
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    results = [(r.wait(timeout=300), r.stderr.read()) for r in runs]
    codes = sorted(code for code, _ in results)
    for code, err in results:
        assert "Traceback" not in err, err
        if code == 1:
            assert "another vaewatch run is writing" in err, err
    # either they overlapped (one refused at once) or the second found the day committed
    assert codes == [0, 1] or (
        codes == [0, 0] and any("already committed" in err for _, err in results)
    ), results
    manifest = read_manifest(str(tmp_path / "out" / "dt=2026-06-01"))
    assert manifest.rows.rows_in == manifest.rows.scored + manifest.rows.rejected
    assert manifest.rows.rows_in == 5_000
    assert pq.read_table(tmp_path / "out" / "dt=2026-06-01").num_rows == manifest.rows.scored


@pytest.mark.parametrize("side", ["input", "output", "query"])
def test_an_unreachable_object_store_exits_75(side, trained, workspace, tmp_path, monkeypatch):
    """Nothing listens at the S3 endpoint: the job stops within seconds, exit 75 (retry later),
    naming the location, and writes nothing."""
    port = free_port()  # closed again: connections are refused
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    job, _ = trained
    if side == "query":
        result = CliRunner().invoke(main, ["summary", "s3://lake/scores"])
        location = "s3://lake/scores"
    else:
        source = "s3://lake/in" if side == "input" else workspace / "holdout"
        out = tmp_path / "out" if side == "input" else "s3://lake/scores"
        location = str(source if side == "input" else out)
        started = time.monotonic()
        result = _score(job.tracking_uri, source, out)
        assert time.monotonic() - started < 60
        assert not (tmp_path / "out").exists()
    _clear_exit_1(result, location, "did not answer", "exit 75", code=75)


@pytest.mark.parametrize("missing", ["job service", "worker pool"])
def test_an_unreachable_beam_service_exits_75(missing, trained, workspace, tmp_path):
    """The portable runner pointed at a job service or an external worker pool that does not
    answer: exit 75 within seconds, naming it; nothing written."""
    dead = f"localhost:{free_port()}"  # closed again: connections are refused
    with socket.socket() as listening:  # accepts connections: stands in for a live service
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        alive = f"localhost:{listening.getsockname()[1]}"
        endpoint, pool = (dead, alive) if missing == "job service" else (alive, dead)
        beam = ("--runner", "PortableRunner", "--", "--job_endpoint", endpoint,
                "--environment_type", "EXTERNAL", "--environment_config", pool)  # fmt: skip
        tracking = trained[0].tracking_uri
        result = _score(tracking, workspace / "holdout", tmp_path / "out",
                        "models:/transactions@champion", *beam)  # fmt: skip
    _clear_exit_1(result, missing, dead, "exit 75", code=75)
    assert not (tmp_path / "out").exists()
