"""How many threads torch may use: the cores this process may really run on.

torch's default is the machine's core count. That is wrong in three common cases, and each
costs an order of magnitude: a container with a CPU quota on a large host (64 threads on a
2-CPU pod), several worker processes per machine (Dataflow, Spark and Beam's multi-processing
runner start one per core), and another job sharing the cores. So:

- `available_cores()` is the smallest of the CPU affinity mask and the cgroup CPU quota
  (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us / cpu.cfs_period_us`), rounded up;
- `threads_for(workers)` shares those cores among the worker processes of one machine.

Separately, vaewatch/model/process.py makes OpenMP's idle threads spin only briefly before
they sleep (`GOMP_SPINCOUNT=1000`, unless the user set an OpenMP policy): measured on 2 cores,
two concurrent jobs each ran at 0.18x (scoring) and 0.02x (training) of one alone with torch's
default spinning, and at 0.47x and 0.72x with the short spin (bench/contention.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _quota_cores(root: Path) -> float | None:
    """The cgroup CPU quota in cores, or None when there is none (or no cgroup to read)."""
    try:
        v2 = (root / "cpu.max").read_text().split()
        if v2 and v2[0] != "max":
            return int(v2[0]) / int(v2[1])
        if v2:
            return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: affinity mask and cgroup quota, whichever is smaller."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _quota_cores(cgroup_root)
    if quota is not None:
        cores = min(cores or 1, math.ceil(quota))
    return max(1, cores or 1)


def threads_for(workers: int = 1, cgroup_root: Path = CGROUP_ROOT) -> int:
    """Intra-op threads for each of `workers` processes sharing this machine's cores."""
    return max(1, available_cores(cgroup_root) // max(1, workers))


def apply(threads: int) -> int:
    """Set torch's intra-op threads (and one inter-op thread: vaewatch runs one op at a time);
    returns the count set."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already started in this process
        pass
    return threads
