"""Bit-identical scores across a code change: the same model and input through two commits.

    python -m bench.same_scores --baseline 28e9dfe    # before the model/ layout by concept
    python -m bench.same_scores --baseline HEAD~3 --rows 20000

Fits one model with the baseline commit's code (the demo's generator, one day; a child process
with a `git archive` of the commit on PYTHONPATH), so that its artifact is in the baseline's
format, which this checkout reads too (a model saved in an older format is upgraded at load;
the reverse is not promised), and scores the next day with the `Scorer` of this checkout and,
in another child, of the baseline. Every output column must be bit-identical: the
same Arrow arrays, nulls and floats alike. Prints each column's verdict; exit 1 on a
difference. A refactor that moves code must pass this; a change meant to move the scores
must not claim to.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench import harness

SCORE = """
import sys
import pyarrow.parquet as pq
from vaewatch.model.artifact import ModelArtifact
from vaewatch.model.scoring import Scorer
import vaewatch.model.scoring as where
artifact = ModelArtifact.load(sys.argv[1])
scored = Scorer(artifact, model_version="m/1", device="cpu").score(pq.read_table(sys.argv[2]))
pq.write_table(scored.aligned(), sys.argv[3])
print(where.__file__)
"""


FIT = """
import sys
try:
    from vaewatch.model.training.fit import FitConfig, fit
    from vaewatch.model.training.loop import TrainConfig
except ImportError:  # a commit before the layout by concept (0.2.0)
    from vaewatch.model.fit import FitConfig, fit
    from vaewatch.model.training import TrainConfig
from vaewatch.model.synthetic import LABEL_COLUMNS
exclude = [c for c in LABEL_COLUMNS if c != "record_id"]
config = FitConfig(id_column="record_id", exclude=exclude, train=TrainConfig(epochs=3, seed=0))
fit(sys.argv[1], config).artifact.save(sys.argv[2])
"""


def score_with(pythonpath: Path | None, model: Path, data: Path, out: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCORE, str(model), str(data), str(out)],
        env=harness.child_env(pythonpath), capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"scoring with {pythonpath or 'this checkout'} failed:\n{done.stderr}")
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = harness.parser(__doc__, quick="2,000 rows per day")
    parser.add_argument(
        "--baseline", default="HEAD", help="the commit to compare with (HEAD: the working tree's "
        "changes against the last commit)"
    )  # fmt: skip
    parser.add_argument("--rows", type=int, default=5_000, help="rows per day")
    args = parser.parse_args()
    run = harness.start(args, "same_scores")
    if args.quick:
        args.rows = 2_000

    from vaewatch.jobs.demo import write_partitions

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        days = write_partitions(work / "input", days=2, rows_per_day=args.rows, seed=0)
        train, data = days
        baseline = harness.export(args.baseline, work / "baseline")
        model = work / "model"
        harness.run_child(
            [sys.executable, "-c", FIT, str(train), str(model)], harness.child_env(baseline),
            f"fitting with {args.baseline}",
        )  # fmt: skip
        here = score_with(None, model, data, work / "here.parquet")
        base = score_with(baseline, model, data, work / "base.parquet")
        a, b = pq.read_table(work / "here.parquet"), pq.read_table(work / "base.parquet")
        verdicts = {
            name: bool(
                a.schema.field(name).equals(b.schema.field(name)) and a[name].equals(b[name])
            )
            for name in a.column_names
        }
        verdicts["(same columns)"] = a.column_names == b.column_names
    print(f"this checkout: {here}\nbaseline {args.baseline}: {base}")
    print(f"{data.name}: {a.num_rows:,} rows")
    for name, same in verdicts.items():
        print(f"  {name:<20} {'bit-identical' if same else 'DIFFERENT'}")
    run.results["verdicts"] = verdicts
    if not all(verdicts.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    pa.set_cpu_count(1)
    main()
