"""Start-up: each command's time to its output, in a fresh process, against an earlier commit's.

    python -m bench.startup                      # against b9e4add (before the lazy imports)
    python -m bench.startup --baseline HEAD~3 --rounds 7
    python -m bench.startup --quick              # 2 rounds

The commands a person types at a terminal, on one committed output of 20,000 rows: `--help`,
`score --help`, `summary`, `top -n 5`, `query` with a per-day aggregate, and, as the floor, a
fresh Python process that runs the same aggregate with DuckDB alone. Each is a fresh process of
the `vaewatch` command of this checkout or of the baseline (a `git archive` of it first on
PYTHONPATH), alternating round after round; the table gives the median seconds and the ratio.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import harness

AGGREGATE = "SELECT dt, count(*) AS n, avg(is_anomaly::INTEGER) AS rate FROM scores GROUP BY dt"
FLOOR = """
import sys, duckdb
con = duckdb.connect()
con.sql("CREATE VIEW scores AS SELECT * FROM read_parquet('" + sys.argv[1] + "/dt=*/part-*.parquet', hive_partitioning=true)")
print(con.sql("SELECT dt, count(*) AS n, avg(is_anomaly::INTEGER) AS rate FROM scores GROUP BY dt").fetchall())
"""  # noqa: E501


def commands(output: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-c", "from vaewatch.jobs.cli import run; run()"]
    return {
        "vaewatch --help": [*cli, "--help"],
        "vaewatch score --help": [*cli, "score", "--help"],
        "vaewatch summary": [*cli, "summary", str(output)],
        "vaewatch top -n 5": [*cli, "top", str(output), "-n", "5"],
        "vaewatch query (per-day aggregate)": [*cli, "query", str(output), AGGREGATE],
    }


def seconds(command: list[str], pythonpath: Path | None) -> float:
    with harness.Stopwatch() as watch:
        done = subprocess.run(
            command, env=harness.child_env(pythonpath), capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[3:])} failed:\n{done.stderr[-2000:]}")
    return watch.seconds


def committed_output(work: Path) -> Path:
    """One day of 20,000 rows scored by this checkout (a `nightly` partition)."""
    from bench import beam_pipeline
    from vaewatch.pipeline.score import ScoreJob, ScoreOptions, run

    data = beam_pipeline.write_input(work / "input", 20_000, 1)
    beam_pipeline.make_model(work / "model", k=24)
    output = work / "out"
    run(ScoreJob(input=str(data), output=str(output / "dt=2026-12-01"), model=str(work / "model"),
                 tracking_uri="", options=ScoreOptions()))  # fmt: skip
    return output


def main() -> None:
    parser = harness.parser(__doc__, quick="2 rounds")
    parser.add_argument("--baseline", default="b9e4add", help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    run = harness.start(args, "startup")
    if args.quick:
        args.rounds = 2
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vaewatch-startup-") as tmp:
        work = Path(tmp)
        output = committed_output(work)
        baseline = harness.export(args.baseline, work / "baseline")
        codes = ((args.baseline, baseline), ("now", None))
        floor = [sys.executable, "-c", FLOOR, str(output)]
        for _ in range(args.rounds):
            for name, command in commands(output).items():
                for code, path in codes:
                    times.setdefault((name, code), []).append(seconds(command, path))
            times.setdefault(("duckdb alone (the floor)", "now"), []).append(seconds(floor, None))
    print(f"median seconds over {args.rounds} rounds, fresh processes; one 20,000-row partition\n")
    print(f"| command | {args.baseline} | now | now / {args.baseline} |")
    print("|---|---:|---:|---:|")
    for name in commands(Path(".")):
        then = statistics.median(times[name, args.baseline])
        now = statistics.median(times[name, "now"])
        run.results[name] = {"baseline": then, "now": now}
        print(f"| {name} | {then:.2f} | {now:.2f} | {now / then:.2f}x |")
    floor_s = statistics.median(times["duckdb alone (the floor)", "now"])
    run.results["duckdb alone"] = floor_s
    print(f"| duckdb alone (the floor) | | {floor_s:.2f} | |")


if __name__ == "__main__":
    main()
