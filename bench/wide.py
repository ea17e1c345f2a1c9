"""Wide tables: time and peak memory of `vaewatch train` and `vaewatch score` as the number of
columns and the vocabulary size grow.

    python -m bench.wide            # four widths up to 600 numbers + 40 strings of 1,000 values
    python -m bench.wide --quick    # the two narrowest
    python -m bench.wide --baseline eb5cd73   # also run that commit's code on the same tables
    python -m bench.wide --heads 100x5x1000 --epochs 5   # flat vs two-level categorical heads

Each width gets its own synthetic table (numbers with a low-rank structure, strings whose value
depends on the same factors, 5 % of numbers missing): 30,000 training rows and one 20,000-row
file to score. `vaewatch train` (2 epochs: the per-epoch rate is what matters) and
`vaewatch score` each run as the real command in a fresh Python process; the peak resident set
(VmHWM) of that process is read when it finishes. Rates include everything the command does
(imports, reading Parquet, the model, Beam, writing, the commit).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from bench import harness
from bench.datasets import wide_table

# (numeric columns, string columns, values per string column)
WIDTHS = [(30, 2, 50), (100, 5, 200), (300, 20, 1000), (600, 40, 1000)]
TRAIN_ROWS, SCORE_ROWS = 30_000, 20_000

# Runs the CLI in this fresh process and prints its peak RSS (VmHWM) on the last line: a child's
# getrusage would start from its parent's peak (Linux carries ru_maxrss across fork and exec).
_RUNNER = """
import sys
from vaewatch.jobs.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("VMHWM", int(line.split()[1]) * 1024, file=sys.stderr)
"""


def run_cli(args: list[str], source: Path | None = None, cwd: Path | None = None):
    """(seconds, peak RSS bytes, stdout) of `vaewatch ARGS` in a fresh process, run in `cwd`
    (where a SQLite tracking URI puts its ./mlruns artifacts); `source` is a folder holding
    another checkout as `vaewatch/` (found before the installed package)."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(source).resolve()), env.get("PYTHONPATH", "")]
        )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, *args],
        capture_output=True, text=True, check=False, env=env, cwd=cwd,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"vaewatch {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    peak = int(done.stderr.rsplit("VMHWM", 1)[1].split()[0])
    return seconds, peak, done.stdout


def measure(
    work: Path, numbers: int, strings: int, values: int, source: Path | None = None, tag="now"
) -> dict:
    data = work / f"w{numbers}-{strings}-{values}"
    if not data.exists():
        (data / "train").mkdir(parents=True)
        (data / "score").mkdir()
        pq.write_table(
            wide_table(TRAIN_ROWS, numbers, strings, values, 1), data / "train" / "p.parquet"
        )
        pq.write_table(
            wide_table(SCORE_ROWS, numbers, strings, values, 2), data / "score" / "p.parquet"
        )
    folder = data / tag
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    train_s, train_peak, _ = run_cli(
        ["train", "--data", str(data / "train"), "--model-name", "wide",
         "--id-column", "record_id", "--tracking-uri", uri, "--epochs", "2", "--no-progress"],
        source,
        folder,  # the run's artifacts go in ./mlruns beside the SQLite store, not in the caller's
    )  # fmt: skip
    score_s, score_peak, _ = run_cli(
        ["score", "--input", str(data / "score"), "--output", str(folder / "out"),
         "--model", "models:/wide@champion", "--tracking-uri", uri],
        source,
        folder,
    )  # fmt: skip
    return {
        "code": tag,
        "numbers": numbers,
        "strings": strings,
        "values": values,
        "one_hot_width": numbers + strings * (values + 1),
        "train_s": train_s,
        "train_peak": train_peak,
        "score_s": score_s,
        "score_rows_per_s": SCORE_ROWS / score_s,
        "score_peak": score_peak,
    }


def compare_heads(numbers: int, strings: int, values: int, epochs: int) -> None:
    """The flat and the two-level categorical head (model/network/categorical.py) fitted in process
    on
    the same 10,000 rows, scored on 5,000 fresh ones of the same table: how well each fits
    (held-out mean log_likelihood, nats per record) and what it costs."""
    from vaewatch.model import defaults
    from vaewatch.model.scoring import Scorer
    from vaewatch.model.training.fit import FitConfig, fit
    from vaewatch.model.training.loop import TrainConfig

    print(f"| head | fit, {epochs} epochs (s) | score 5,000 rows (s) | held-out mean "
          "log_likelihood | median |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    held_out = wide_table(5_000, numbers, strings, values, 2)
    with tempfile.TemporaryDirectory(prefix="vaewatch-heads-") as work:
        path = str(Path(work) / "train.parquet")
        pq.write_table(wide_table(10_000, numbers, strings, values, 1), path)
        for name, two_level_min in (("flat", 0), ("two-level", defaults.TWO_LEVEL_MIN_CLASSES)):
            saved, defaults.TWO_LEVEL_MIN_CLASSES = defaults.TWO_LEVEL_MIN_CLASSES, two_level_min
            try:
                started = time.perf_counter()
                config = FitConfig(
                    id_column="record_id", train=TrainConfig(epochs=epochs, seed=0, device="cpu")
                )
                artifact = fit(path, config).artifact
                fit_s = time.perf_counter() - started
            finally:
                defaults.TWO_LEVEL_MIN_CLASSES = saved
            scorer = Scorer(artifact, model_version="heads", device="cpu")
            started = time.perf_counter()
            ll = np.asarray(scorer.score(held_out).scores.column("log_likelihood"))
            score_s = time.perf_counter() - started
            print(
                f"| {name} | {fit_s:.1f} | {score_s:.1f} | {ll.mean():.2f} | {np.median(ll):.2f} |",
                flush=True,
            )


def main() -> None:
    parser = harness.parser(__doc__, quick="the two narrowest widths")
    parser.add_argument(
        "--widths", default=None, help="NUMBERSxSTRINGSxVALUES,... instead of the four defaults"
    )
    parser.add_argument(
        "--baseline", default=None, help="a git commit whose code also runs, for ratios"
    )
    parser.add_argument(
        "--heads", default=None, help="NUMBERSxSTRINGSxVALUES: flat vs two-level heads, in process"
    )
    parser.add_argument("--epochs", type=int, default=5, help="training epochs for --heads")
    args = parser.parse_args()
    run = harness.start(args, "wide")
    import torch

    if args.heads:
        print(f"Run: date {dt.date.today()}, torch {torch.__version__}; command: python "
              f"{' '.join(sys.argv)}\n")  # fmt: skip
        compare_heads(*(int(v) for v in args.heads.split("x")), args.epochs)
        return

    print(
        f"Run: date {dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {TRAIN_ROWS:,} training rows (2 epochs), {SCORE_ROWS:,} rows "
        f"scored; command: python {' '.join(sys.argv)}\n"
    )
    print(
        "| code | numbers | strings x values | encoder one-hot width | train, 2 epochs (s) "
        "| train peak RSS (MiB) | score (s) | score rows/s | score peak RSS (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    with tempfile.TemporaryDirectory(prefix="vaewatch-wide-") as work:
        codes = [("now", None)]
        if args.baseline:
            codes.insert(0, (args.baseline, harness.export(args.baseline, Path(work) / "baseline")))
        widths = WIDTHS[:2] if args.quick else WIDTHS
        if args.widths:
            widths = [tuple(int(v) for v in w.split("x")) for w in args.widths.split(",")]
        for numbers, strings, values in widths:
            for tag, source in codes:
                r = measure(Path(work), numbers, strings, values, source, tag)
                rows.append(r)
                print(
                    f"| {tag} | {numbers} | {strings} x {values:,} | {r['one_hot_width']:,} | "
                    f"{r['train_s']:.1f} | {r['train_peak'] / 2**20:,.0f} | {r['score_s']:.1f} | "
                    f"{r['score_rows_per_s']:,.0f} | {r['score_peak'] / 2**20:,.0f} |",
                    flush=True,
                )
    run.results["rows"] = rows


if __name__ == "__main__":
    main()
