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
