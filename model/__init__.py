"""vaewatch's model core: torch, numpy and pyarrow only (see README's layout section)."""

import os

# OpenMP threads waiting for work spin only briefly before they sleep, unless the user chose a
# policy. Set before torch loads its OpenMP runtime, which reads it once. Measured on 2 cores
# (bench/contention.py): with libgomp's default of 300,000 spins, two jobs on the same cores
# each ran at 0.18x (scoring) and 0.02x (training) of one alone; with 1,000 spins at 0.47x and
# 0.72x, and one job alone as fast as before. OMP_WAIT_POLICY=PASSIVE shares as well but made
# one job alone 30 % slower.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"


def _keep_large_blocks() -> None:
    """Stop glibc from handing each large tensor its own fresh mmap: by default a block over a
    dynamic threshold is mmap'd and unmapped on free, so every decoder chunk page-faults its
    memory in again. Measured on a 320-column table with 20,000 categorical logits: 9.3 s per
    2,048 rows at K=32 with the default, 4.4 s with blocks up to 1 GiB kept in the heap (the
    chunk budget bounds how much that is). The same as MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_, which glibc reads only at start-up; a user's own setting wins."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
        libc.mallopt(m_mmap_threshold, 2**30)
        libc.mallopt(m_trim_threshold, 2**30)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        pass


_keep_large_blocks()
