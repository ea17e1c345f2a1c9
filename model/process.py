"""Process-wide tuning for a process that scores or trains: OpenMP's idle spinning and glibc's
handling of large blocks. Importing vaewatch changes neither; the entry points that own their
process call `tune()`: the `vaewatch` command (first thing, before torch loads) and, for Beam
workers, `ScoreBatches.setup` calls `keep_large_blocks()` (the allocator can be tuned at any
time). A user's own pipeline gets the OpenMP setting by calling `tune()` before torch is
imported, or by setting `GOMP_SPINCOUNT=1000` in the workers' environment (the images in infra/
do); see the docs' "Using vaewatch in your own Beam pipeline" for what each is worth.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "1000"


def tune() -> dict[str, bool]:
    """Both settings, where the user has not chosen their own; returns which took effect."""
    return {"short_spin": short_openmp_spin(), "large_blocks": keep_large_blocks()}


def short_openmp_spin() -> bool:
    """OpenMP threads waiting for work spin only briefly before they sleep, unless the user chose
    a policy. torch's OpenMP runtime reads this once, when torch loads: after that it is too late
    (returns False). Measured on 2 cores (bench/contention.py): with libgomp's default of 300,000
    spins, two jobs on the same cores each ran at 0.18x (scoring) and 0.02x (training) of one
    alone; with 1,000 spins at 0.47x and 0.72x, and one job alone as fast as before.
    OMP_WAIT_POLICY=PASSIVE shares as well but made one job alone 30 % slower."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    if "torch" in sys.modules:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


def keep_large_blocks() -> bool:
    """Stop glibc from handing each large tensor its own fresh mmap: by default a block over a
    dynamic threshold is mmap'd and unmapped on free, so every decoder chunk page-faults its
    memory in again. Measured on a 320-column table with 20,000 categorical logits: 9.3 s per
    2,048 rows at K=32 with the default, 4.4 s with blocks up to 1 GiB kept in the heap (the
    chunk budget bounds how much that is). The same as MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_, which glibc reads only at start-up; a user's own setting wins.
    Returns whether it was applied (False on a libc other than glibc)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
        libc.mallopt(m_mmap_threshold, 2**30)
        libc.mallopt(m_trim_threshold, 2**30)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    return True
