"""String value counts at training: vaewatch's bounded Arrow counts against a Python Counter.

A feature spec counts every string column's values to choose its vocabulary. Until 2026-12-03
that was a `collections.Counter` updated value by value from each batch's value counts: memory
grew with the column's distinct values (an identifier as text in a 100M-row table: tens of
GiB) and so did the time. `ValueCounts` merges the batches' counts with Arrow and prunes them
Misra-Gries style past its capacity. Both run here on the same batches, in one process,
alternating; the table is the ratio of their times and how far each one grew the process's
resident memory.

    python -m bench.value_counts [--rows 3000000] [--repeats 3] [--quick]
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench import harness
from vaewatch.model import defaults
from vaewatch.model.data.columns import ValueCounts


def python_counter(batches: list[pa.Array]) -> Counter:
    """The counting as it was: each batch's value counts added value by value."""
    counts: Counter = Counter()
    for values in batches:
        vc = pc.value_counts(values)
        for value, count in zip(
            vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True
        ):
            counts[value] += count
    return counts


def arrow_counts(batches: list[pa.Array]) -> list[tuple[str, int]]:
    counts = ValueCounts(defaults.VALUE_COUNT_CAPACITY)
    for values in batches:
        counts.update(values)
    return counts.items()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(fn, batches) -> tuple[float, float]:
    """(seconds, MiB the process's resident set grew by at its peak while counting: Python's
    objects and Arrow's buffers alike). Linux: the peak is reset through /proc/self/clear_refs."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM, the peak resident set, to the current one
    before = _status_kib("VmRSS")
    started = time.perf_counter()
    result = fn(batches)
    seconds = time.perf_counter() - started
    grew = (_status_kib("VmHWM") - before) / 1024
    del result
    return seconds, grew


def main() -> None:
    parser = harness.parser(__doc__, quick="300,000 rows, 2 repeats")
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    harness.start(args, "value_counts")
    rows, repeats = (300_000, 2) if args.quick else (args.rows, args.repeats)
    rng = np.random.default_rng(0)
    columns = {
        "identifier (every value new)": [f"{i:032x}" for i in rng.permutation(rows)],
        "categorical (5,000 values, Zipf)": [
            f"c{v}" for v in np.minimum(rng.zipf(1.3, rows), 5_000)
        ],
    }
    print(f"{rows:,} rows in batches of 65,536, best of {repeats} alternations; "
          f"command: python {' '.join(sys.argv)}")  # fmt: skip
    print()
    print(
        "| column | Counter s | Arrow s | speed-up | Counter: RSS growth MiB | "
        "Arrow: RSS growth MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in columns.items():
        array = pa.array(values)
        batches = [array.slice(i, 65_536) for i in range(0, rows, 65_536)]
        exact = dict(arrow_counts(batches)) == python_counter(batches)
        best = {python_counter: (np.inf, 0.0), arrow_counts: (np.inf, 0.0)}
        for _ in range(repeats):
            for fn in best:
                seconds, peak = measure(fn, batches)
                best[fn] = (min(best[fn][0], seconds), max(best[fn][1], peak))
        (c_s, c_mib), (a_s, a_mib) = best[python_counter], best[arrow_counts]
        note = "" if exact else " (pruned: beyond the exact capacity)"
        print(f"| {name}{note} | {c_s:.2f} | {a_s:.2f} | {c_s / a_s:.1f}x | {c_mib:.0f} | "
              f"{a_mib:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
