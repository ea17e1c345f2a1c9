"""bench/ is a package of benchmarks that share one harness (bench/harness.py): each runs as
`python -m bench.NAME` with the common options, edits no sys.path, loads no sibling by file
path, and is in `make bench`."""

import json
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

from bench import harness

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"__init__", "harness", "datasets", "broad_tables"}
SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem not in SHARED)


def test_every_benchmark_uses_the_harness_and_is_in_make_bench():
    listed = re.search(r"^BENCH_SCRIPTS := (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert sorted(listed.group(1).split()) == SCRIPTS
    for name in SCRIPTS:
        source = (ROOT / "bench" / f"{name}.py").read_text()
        assert "harness.parser(__doc__" in source, name
        assert "harness.start(args" in source, name
        for habit in ("sys.path", "spec_from_file_location", "ArgumentParser("):
            assert habit not in source, f"bench/{name}.py: {habit}"


def test_a_benchmark_runs_as_a_module_with_the_common_options():
    done = subprocess.run(
        [sys.executable, "-m", "bench.value_counts", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for option in ("--quick", "--json PATH", "--out DIR", "--rows"):
        assert option in done.stdout


def test_a_run_record_names_the_command_commit_and_results(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["value_counts.py", "--quick"])
    args = harness.parser("A benchmark.\n\nMore.", quick="fewer rows").parse_args(
        ["--quick", "--json", str(tmp_path / "a.json"), "--out", str(tmp_path / "out")]
    )
    run = harness.Record("value_counts", args)
    run.results["rate"] = 12.5
    run._printed.write("| table |\n")
    run.save(finished=True)
    written = json.loads((tmp_path / "a.json").read_text())
    assert written["command"] == "python -m bench.value_counts --quick"
    assert written["results"] == {"rate": 12.5} and written["printed"] == "| table |\n"
    assert written["finished"] is True and written["machine"]["cores"] >= 1
    assert re.fullmatch(r"[0-9a-f]{4,}(\+changes)?|", written["commit"])
    (dated,) = (tmp_path / "out").glob("value_counts-*.json")
    assert json.loads(dated.read_text()) == written
    assert run.figure("f.png") == tmp_path / "out" / "f.png"
    assert harness.Record("x", Namespace(json=None, out=None)).paths() == []


def test_best_of_keeps_the_fastest_call():
    calls = iter([0.03, 0.0, 0.02])

    def work():
        import time

        time.sleep(next(calls))

    assert harness.best_of(work, 3) < 0.015
