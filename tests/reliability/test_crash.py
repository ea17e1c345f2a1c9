"""SIGKILL at every named point of a scoring run, a nightly run and a backfill.

Each kill is made by the process itself at a named fault point (pipeline/faults.py), which
first writes the point's name to a marker file: the test proves where the process died, not
only that it died. After every kill: readers see the previous complete output or none, and a
re-run produces exactly the input's rows (scored + rejected), each once.
"""

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import write_days
from vaewatch.model.scoring import ScoringOverrides
from vaewatch.pipeline import faults
from vaewatch.pipeline.commit import MANIFEST, REJECTED_DIR, SUCCESS, read_manifest
from vaewatch.pipeline.score import ScoreJob, ScoreOptions, run

SCORE_POINTS = [p for p in faults.POINTS if not p.startswith("nightly:")]
MODEL = "models:/transactions@champion"


def _with_bad_rows(root, every=400):
    """Every `every`-th row gets amount = +inf: a rejected output exists in every run."""
    for path in sorted(root.glob("*.parquet")):
        table = pq.read_table(path)
        amount = table["amount"].to_numpy().copy()
        amount[::every] = np.inf
        table = table.set_column(table.schema.get_field_index("amount"), "amount", pa.array(amount))
        pq.write_table(table, path, row_group_size=1_000)
    return root


@pytest.fixture(scope="module")
def crash_input(tmp_path_factory):
    root = write_days(
        tmp_path_factory.mktemp("crash-in"), days=3, rows=3_000, anomaly_rate=0.02, seed=31
    )
    return _with_bad_rows(root)


@pytest.fixture(scope="module")
def baseline(trained, crash_input, tmp_path_factory):
    """A complete earlier output, copied in before the runs that must leave it untouched."""
    job, _ = trained
    out = tmp_path_factory.mktemp("baseline") / "out"
    run(
        ScoreJob(
            input=str(crash_input),
            output=str(out),
            model=MODEL,
            tracking_uri=job.tracking_uri,
            options=ScoreOptions(overrides=ScoringOverrides(k=4)),
        )
    )
    return out


def _env(point, mark):
    env = dict(os.environ, **{faults.CRASH_ENV: point, faults.MARK_ENV: str(mark)})
    env.pop("VAEWATCH_SCORE_WORKERS", None)
    return env


def _run_cli(args, env, timeout=300):
    command = [sys.executable, "-m", "vaewatch.jobs.cli", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def visible(out):
    """What a reader of `out` sees: None, or the manifest of a complete output. Fails the test
    on anything half-written: a missing marker, an unlisted or missing file, a count off."""
    if not out.exists():
        return None
    names = {p.name for p in out.iterdir()}
    assert MANIFEST in names and SUCCESS in names, f"{out} visible without a commit: {names}"
    manifest = read_manifest(str(out))
    scored = sorted(p.name for p in out.glob("*.parquet"))
    rejected = sorted(f"{REJECTED_DIR}/{p.name}" for p in (out / REJECTED_DIR).glob("*.parquet"))
    assert scored == sorted(manifest.files), "unlisted or missing scored files"
    assert rejected == sorted(manifest.rejected_files), "unlisted or missing rejected files"
    rows = sum(pq.ParquetFile(out / f).metadata.num_rows for f in scored)
    bad = sum(pq.ParquetFile(out / f).metadata.num_rows for f in rejected)
    assert (rows, bad) == (manifest.rows.scored, manifest.rows.rejected)
    assert rows + bad == manifest.rows.rows_in
    assert not [n for n in names if n.startswith("beam-temp") or n.endswith(".tmp")]
    return manifest


def input_ids(root):
    """(every record id, the ids of the rows with amount = inf), sorted."""
    table = pq.read_table(root, columns=["record_id", "amount"])
    ids = table["record_id"].to_numpy()
    bad = ids[np.isinf(table["amount"].to_numpy())]
    assert len(np.unique(ids)) == len(ids) and len(bad) > 0
    return np.sort(ids), np.sort(bad)


def exactly_once(out, root):
    """Every input id is in the scored or the rejected output, once; the rejected ones are
    exactly the rows made unscorable."""
    ids, bad = input_ids(root)
    scored = pq.read_table(out, columns=["record_id"])["record_id"].to_numpy()
    rejected = pq.read_table(out / REJECTED_DIR, columns=["record_id"])["record_id"].to_numpy()
    np.testing.assert_array_equal(np.sort(np.concatenate([scored, rejected])), ids)
    np.testing.assert_array_equal(np.sort(rejected), bad)


@pytest.mark.slow
@pytest.mark.parametrize("point", SCORE_POINTS)
def test_sigkill_at_every_point_of_a_score_run(point, trained, crash_input, baseline, tmp_path):
    job, _ = trained
    out = tmp_path / "out"
    # half the points start from a committed earlier output, half from none; the exchange
    # point needs one (with none, publishing is a plain rename, covered by launch/commit ones)
    previous = None
    if SCORE_POINTS.index(point) % 2 == 1 or point == "commit:exchanged":
        shutil.copytree(baseline, out)
        previous = read_manifest(str(out))
    mark = tmp_path / "mark"
    done = _run_cli(
        [
            "score",
            "--input",
            crash_input,
            "--output",
            out,
            "--model",
            MODEL,
            "--tracking-uri",
            job.tracking_uri,
            "--k",
            "4",
            "--batch-size",
            "1000",
        ],
        _env(point, mark),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert mark.read_text().splitlines()[0].startswith(point + "@")

    if point.startswith("write:"):  # killed with the writer's temporary files open
        staged = list(tmp_path.glob(".out.staging-*/**/beam-temp-*/*"))
        assert staged, "the writer had not opened its temporary files yet"

    seen = visible(out)
    if point == "commit:exchanged":  # published: the new output is complete; old one aside
        assert seen is not None and seen.run_id != previous.run_id
    elif previous is None:
        assert seen is None
    else:
        assert seen == previous

    # the re-run finishes the job: exact rows, each once, no debris left beside the output
    result = run(
        ScoreJob(
            input=str(crash_input),
            output=str(out),
            model=MODEL,
            tracking_uri=job.tracking_uri,
            options=ScoreOptions(overrides=ScoringOverrides(k=4)),
        )
    )
    assert visible(out).run_id == result.manifest.run_id
    assert result.manifest.rows.rows_in == 9_000
    exactly_once(out, crash_input)
    assert not list(tmp_path.glob(".out.staging-*")) and not list(tmp_path.glob(".out.prev*"))


DAYS = ("2026-05-01", "2026-05-02", "2026-05-03")


@pytest.fixture(scope="module")
def nightly_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly-in")
    for i, day in enumerate(DAYS):
        _with_bad_rows(
            write_days(root / f"dt={day}", days=1, rows=1_500, anomaly_rate=0.02, seed=50 + i),
            every=300,
        )
    return root


def _nightly_args(trained, root, out, *extra):
    job, _ = trained
    return [
        "nightly",
        "--input-root",
        root,
        "--output-root",
        out,
        "--model",
        MODEL,
        "--tracking-uri",
        job.tracking_uri,
        "--k",
        "4",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, committed_days",
    [
        ("nightly:day-committed@2", 2),  # backfill killed between day 2 and day 3
        ("write:scored@2", 1),  # killed while writing day 2
        ("commit:success@3", 2),  # killed while committing day 3
    ],
)
def test_sigkill_in_a_backfill(point, committed_days, trained, nightly_root, tmp_path):
    out = tmp_path / "out"
    mark = tmp_path / "mark"
    args = _nightly_args(trained, nightly_root, out, "--from", DAYS[0], "--to", DAYS[-1])
    done = _run_cli(args, _env(point, mark))
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert mark.read_text().strip() == point
    runs = {}
    for i, day in enumerate(DAYS):
        seen = visible(out / f"dt={day}")
        assert (seen is not None) == (i < committed_days), (day, seen)
        if seen:
            runs[day] = seen.run_id
            exactly_once(out / f"dt={day}", nightly_root / f"dt={day}")

    again = _run_cli(args, dict(os.environ))
    assert again.returncode == 0, again.stderr[-3000:]
    for i, day in enumerate(DAYS):
        manifest = visible(out / f"dt={day}")
        exactly_once(out / f"dt={day}", nightly_root / f"dt={day}")
        if i < committed_days:  # completed days stay committed and are skipped, not redone
            assert manifest.run_id == runs[day]
            assert f"{day}: already committed" in again.stderr
        else:
            assert f"{day}: scored" in again.stderr


@pytest.mark.slow
def test_sigkill_of_a_single_nightly_day(trained, nightly_root, tmp_path):
    out = tmp_path / "out"
    mark = tmp_path / "mark"
    args = _nightly_args(trained, nightly_root, out, "--date", DAYS[1])
    done = _run_cli(args, _env("score:batch", mark))
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert visible(out / f"dt={DAYS[1]}") is None
    assert _run_cli(args, dict(os.environ)).returncode == 0
    exactly_once(out / f"dt={DAYS[1]}", nightly_root / f"dt={DAYS[1]}")
