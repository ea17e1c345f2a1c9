"""What a Beam pipeline of your own gives up without the short OpenMP spin: the example
pipeline (examples/score_parquet_pipeline.py: Beam's Parquet IO around `ScoreRecords`), run as
a user runs it, with and without GOMP_SPINCOUNT=1000 in its environment.

    python -m bench.user_pipeline            # 400,000 rows in 4 files, 3 rounds
    python -m bench.user_pipeline --quick    # 100,000 rows, 2 rounds

The `vaewatch` command sets the short spin before torch loads (vaewatch.model.process.tune);
a pipeline of your own gets it only from its workers' environment, or from calling `tune()`
in its launcher before torch is imported. Each run is a fresh process of the example on
Beam's DirectRunner: one worker in the launching process, and two worker processes
(`--direct_num_workers 2`), whose torch threads then share the cores. Both settings alternate
round after round, so a slow minute of a shared machine hits both; the table gives each
setting's median rows/s (the whole command: imports, reading, scoring, writing) and the ratio.
The model is bench/beam_pipeline.py's (32 features, latent 8, hidden [128, 128]) at its K.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import harness

SETTINGS = {"torch's default spin": None, "GOMP_SPINCOUNT=1000": "1000"}
WORKERS = (1, 2)


def one_run(data: Path, model: Path, out: Path, workers: int, spin: str | None) -> float:
    """Seconds of one run of the example pipeline in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if spin is not None:
        env["GOMP_SPINCOUNT"] = spin
    beam = ["--runner", "DirectRunner", "--direct_num_workers", str(workers)]
    if workers > 1:
        beam += ["--direct_running_mode", "multi_processing"]
    command = [
        sys.executable, str(harness.ROOT / "examples" / "score_parquet_pipeline.py"),
        "--input", str(data / "*.parquet"), "--output", str(out), "--model", str(model),
        "--keep", "record_id", "--", *beam,
    ]  # fmt: skip
    with harness.Stopwatch() as watch:
        harness.run_child(command, env, f"the example pipeline ({workers} worker(s), spin {spin})")
    return watch.seconds


def main() -> None:
    parser = harness.parser(__doc__, quick="100,000 rows, 2 rounds")
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=24, help="the model's K (the scoring default)")
    args = parser.parse_args()
    run = harness.start(args, "user_pipeline")
    if args.quick:
        args.rows, args.rounds = 100_000, 2
    from bench import beam_pipeline

    seconds: dict[tuple[int, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vaewatch-user-pipeline-") as tmp:
        work = Path(tmp)
        data = beam_pipeline.write_input(work / "input", args.rows, args.files)
        beam_pipeline.make_model(work / "model", k=args.k)
        for round_ in range(args.rounds):
            for workers in WORKERS:
                for name, spin in SETTINGS.items():
                    out = work / f"out-{round_}-{workers}-{spin}"
                    took = one_run(data, work / "model", out, workers, spin)
                    seconds.setdefault((workers, name), []).append(took)
                    subprocess.run(["rm", "-rf", str(out)], check=True)
    cores = len(os.sched_getaffinity(0))
    print(f"{args.rows:,} rows in {args.files} files, K={args.k}, {cores} cores, "
          f"{args.rounds} rounds; rows/s of the whole command, median over rounds\n")  # fmt: skip
    print("| workers | " + " | ".join(SETTINGS) + " | default / short spin |")
    print("|---:|" + "---:|" * len(SETTINGS) + "---:|")
    for workers in WORKERS:
        rates = {name: args.rows / statistics.median(seconds[workers, name]) for name in SETTINGS}
        default, short = rates.values()
        run.results[f"{workers} worker(s)"] = {**rates, "ratio": default / short}
        cells = " | ".join(f"{rate:,.0f}" for rate in rates.values())
        print(f"| {workers} | {cells} | {default / short:.2f}x |")


if __name__ == "__main__":
    main()
