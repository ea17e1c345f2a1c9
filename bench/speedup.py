"""The production estimator's records/s against an earlier commit's, each at its own defaults.

    python -m bench.speedup --baseline 387521e~1    # the code before the estimator changes
    python -m bench.speedup --baseline HEAD --rounds 3
    python -m bench.speedup --quick                 # 2 rounds (make bench-quick)

Both codes score the same in-memory batches (bench/estimators.py's model: 32 features, latent 8,
hidden [128, 128]) with `score_records` at their own default K and precision, and at K=64 in
float32 as a fixed reference. Each measurement is a fresh process; the two codes alternate, round
after round, so a slow minute of this shared machine hits both; the table gives the median over
rounds and the ratio of medians. The baseline runs from a `git archive` of the commit.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench import harness

BATCHES = (4096, 65536)


def measure(records: int, repeats: int) -> dict:
    """In the child: records/s of the importable vaewatch's default scorer and of K=64 fp32."""
    import torch

    from bench.datasets import model_and_batch
    from vaewatch.model import defaults

    score_records = harness.model_module("estimation.estimators").score_records

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model, x, mask = model_and_batch(records, torch.device("cpu"))
    accepts_dtype = "matmul_dtype" in inspect.signature(score_records).parameters
    default_dtype = None
    if accepts_dtype:
        from vaewatch.model.device import resolve_precision

        default_dtype = resolve_precision(defaults.PRECISION, torch.device("cpu"))
    runs = {
        "default": dict(k=defaults.K, **({"matmul_dtype": default_dtype} if accepts_dtype else {})),
        "K=64 fp32": dict(k=64),
    }
    out = {"K": defaults.K, "precision": "bf16" if default_dtype is not None else "fp32"}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for kwargs in runs.values():
        score_records(model, x, mask, log_std=None, **kwargs)  # warm-up
    for _ in range(repeats):  # the two settings alternate, so neither gets the quieter seconds
        for name, kwargs in runs.items():
            start = time.perf_counter()
            score_records(model, x, mask, log_std=None, **kwargs)
            times[name].append(time.perf_counter() - start)
    out.update({name: records / min(t) for name, t in times.items()})
    return out


def child(pythonpath: Path | None, records: int, repeats: int) -> dict:
    cmd = harness.child_command("speedup", "--child", str(records), "--repeats", str(repeats))
    done = harness.run_child(cmd, harness.child_env(pythonpath), str(pythonpath or "this checkout"))
    return harness.last_json(done)


def main() -> None:
    parser = harness.parser(__doc__, quick="2 rounds of 3 timed calls")
    parser.add_argument("--baseline", default="387521e~1", help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two codes")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per process (best)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.repeats = 2, 3
    if args.child is not None:
        print(json.dumps(measure(args.child, args.repeats)))
        return
    harness.start(args, "speedup")
    with tempfile.TemporaryDirectory() as work:
        baseline = harness.export(args.baseline, Path(work))
        results: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.rounds):
            for code, path in ((args.baseline, baseline), ("now", None)):
                for records in BATCHES:
                    results.setdefault((code, records), []).append(
                        child(path, records, args.repeats)
                    )
    print(f"{args.rounds} rounds, {os.cpu_count()} cores; records/s, median over rounds\n")
    print("| code | batch | default K, precision | default | K=64 fp32 |")
    print("|---|---:|---|---:|---:|")
    medians = {}
    for (code, records), runs in results.items():
        medians[code, records] = {
            name: statistics.median(r[name] for r in runs) for name in ("default", "K=64 fp32")
        }
        m = medians[code, records]
        setting = f"K={runs[0]['K']}, {runs[0]['precision']}"
        print(f"| {code} | {records:,} | {setting} | {m['default']:,.0f} | {m['K=64 fp32']:,.0f} |")
    print()
    for records in BATCHES:
        old, new = medians[args.baseline, records], medians["now", records]
        print(
            f"batch {records:,}: default now / default {args.baseline} = "
            f"{new['default'] / old['default']:.2f}x; K=64 fp32 now / then = "
            f"{new['K=64 fp32'] / old['K=64 fp32']:.2f}x"
        )


if __name__ == "__main__":
    main()
