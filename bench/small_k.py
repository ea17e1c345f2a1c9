"""`vaewatch score` at K=1 against the pyarrow read + write of the same rows (issue: the
pipeline's own overhead at small K), this code against an earlier commit's.

    python -m bench.small_k                      # this code against HEAD's; 5 rounds
    python -m bench.small_k --baseline 1e2c91a --quick  # against an earlier commit; 2 rounds
    python -m bench.small_k --rows 1000000 --files 8  # bench/beam_pipeline.py's full data

The baseline's code is driven by this checkout's bench/beam_pipeline.py, so a commit older than
the modules that driver imports cannot be measured (the child's error says so); HEAD always
can, and then the figure that matters is "vs IO floor".

bench/beam_pipeline.py's data and model (32 features, latent 8, hidden [128, 128]; the model saved
with K=1). Each measurement is a fresh process that times the IO floor and the whole scoring job
(plan, Beam's in-process runner, scoring, zstd Parquet, commit) in turn, best of `--repeats`; the
two codes alternate, round after round, so a slow minute of this shared machine hits both. The
table gives medians over rounds; "vs IO floor" is the job's rows/s over the floor's in the same
process. The floor is pyarrow's defaults (a dictionary tried on every column, as a plain
`pq.ParquetWriter` does); the table also gives it with dictionaries for the string columns only,
as vaewatch writes its output. The baseline runs from a `git archive` of the commit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench import harness


def _pipeline_bench():
    """bench/beam_pipeline.py (its data, model and timers), imported where it is used: in a
    child, after PYTHONPATH has put the baseline's vaewatch first."""
    from bench import beam_pipeline

    return beam_pipeline


def measure(data: Path, model: Path, rows: int, repeats: int) -> dict:
    """In the child: best seconds of the IO floor and of the K=1 job, alternating."""
    from vaewatch.model.artifact import ModelArtifact

    bench = _pipeline_bench()
    columns = ["record_id", *ModelArtifact.load(model).spec.names()]
    floor, plain, job = [], [], []
    with tempfile.TemporaryDirectory() as work:
        for i in range(repeats + 1):  # the first round warms the page cache and the imports
            out = Path(work) / f"run{i}"
            f = bench.io_floor(data, out / "floor", columns)
            p = bench.io_floor(data, out / "plain", columns, strings_only=True)
            j = bench.pipeline_run(data, model, out / "scores", k=1)
            shutil.rmtree(out)
            if i:
                floor.append(f)
                plain.append(p)
                job.append(j)
    import vaewatch.pipeline.score as code

    return {
        "floor": rows / min(floor),
        "floor_strings": rows / min(plain),
        "job": rows / min(job),
        "code": code.__file__,
    }


def main() -> None:
    parser = harness.parser(__doc__, quick="2 rounds")
    parser.add_argument("--baseline", default="HEAD", help="the commit to compare with")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed jobs per process (best)")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--make-model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_model is not None:  # in a child: the model, saved by the code being measured
        _pipeline_bench().make_model(Path(args.make_model), k=1)
        return
    if args.child is not None:
        data, model = map(Path, args.child)
        print(json.dumps(measure(data, model, args.rows, args.repeats)))
        return
    harness.start(args, "small_k")
    if args.quick:
        args.rounds = 2

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        bench = _pipeline_bench()
        bench.write_input(work / "input", args.rows, args.files)
        baseline = harness.export(args.baseline, work / "baseline")
        codes = ((args.baseline, baseline), ("now", None))
        # each code reads the model its own code saved: an older commit cannot load fields
        # added to the artifact since (the same seeded training, the same architecture)
        models = {code: work / f"model-{i}" for i, (code, _) in enumerate(codes)}
        for code, path in codes:
            cmd = harness.child_command("small_k", "--make-model", str(models[code]))
            harness.run_child(cmd, harness.child_env(path), code)
        results: dict[str, list[dict]] = {args.baseline: [], "now": []}
        print(f"baseline from {baseline}", flush=True)
        started = time.perf_counter()
        for _ in range(args.rounds):
            for code, path in codes:
                cmd = harness.child_command("small_k", "--rows", str(args.rows))
                cmd += ["--repeats", str(args.repeats), "--child"]
                cmd += [str(work / "input"), str(models[code])]
                done = harness.run_child(cmd, harness.child_env(path), code)
                results[code].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"{args.rows:,} rows in {args.files} files, K=1, {args.rounds} rounds in "
        f"{time.perf_counter() - started:.0f} s"
    )
    print(
        "\n| code | IO floor rows/s | vaewatch score rows/s | vs IO floor "
        "| floor, strings-only dictionary | vs that |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for code, runs in results.items():
        floor = statistics.median(r["floor"] for r in runs)
        plain = statistics.median(r["floor_strings"] for r in runs)
        job = statistics.median(r["job"] for r in runs)
        ratio = statistics.median(r["job"] / r["floor"] for r in runs)
        ratio_plain = statistics.median(r["job"] / r["floor_strings"] for r in runs)
        print(
            f"| {code} | {floor:,.0f} | {job:,.0f} | {ratio:.2f}x "
            f"| {plain:,.0f} | {ratio_plain:.2f}x |"
        )
    for code, runs in results.items():
        print(f"{code}: ran {runs[0]['code']}")
    old = statistics.median(r["job"] for r in results[args.baseline])
    now = statistics.median(r["job"] for r in results["now"])
    print(f"\njob rows/s now / {args.baseline}: {now / old:.2f}x")


if __name__ == "__main__":
    main()
