"""The commit protocol: a killed run leaves nothing visible, re-runs replace, never duplicate."""

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.conftest import write_days
from vaewatch.model.scoring import ScoringOverrides
from vaewatch.pipeline.commit import (
    MANIFEST,
    SUCCESS,
    LocalCommitter,
    ObjectStoreCommitter,
    read_manifest,
)
from vaewatch.pipeline.score import ScoreJob, ScoreOptions, run


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    # large enough that scoring takes several seconds on 2 cores (K=256)
    return write_days(tmp_path_factory.mktemp("big"), days=4, rows=25_000, anomaly_rate=0.0, seed=7)


def _launch(trained, source, output, *extra):
    job, _ = trained
    command = [
        sys.executable, "-m", "vaewatch.jobs.cli", "score",
        "--input", str(source), "--output", str(output),
        "--model", "models:/transactions@champion", "--tracking-uri", job.tracking_uri,
        *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def _kill_when_staging_has_data(process, parent, name, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        staged = list(parent.glob(f".{name}.staging-*/**/*"))
        if any("beam-temp" in str(p) or p.suffix == ".parquet" for p in staged):
            break
        if process.poll() is not None:
            pytest.fail(
                f"the run ended before it could be killed:\n{process.stdout.read()[-3000:]}"
            )
        time.sleep(0.05)
    else:
        pytest.fail("the run never staged anything")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def test_killed_run_commits_nothing_and_a_rerun_completes(trained, big_input, tmp_path):
    out = tmp_path / "out"
    process = _launch(trained, big_input, out, "--k", "256", "--batch-size", "2000")
    _kill_when_staging_has_data(process, tmp_path, "out")
    assert not out.exists()  # nothing committed: readers find no output at all
    assert list(tmp_path.glob(".out.staging-*"))  # the debris is hidden (dot prefix)

    first = _launch(trained, big_input, out, "--shards", "4")
    assert first.wait(timeout=300) == 0, first.stdout.read()[-3000:]
    assert not list(tmp_path.glob(".out.staging-*"))  # the re-run cleaned the debris
    assert ds.dataset(str(out), format="parquet").count_rows() == 100_000
    assert len(list(out.glob("part-*.parquet"))) == 4
    committed = read_manifest(str(out))

    # kill a second run: the first run's output stays complete and readable
    process = _launch(trained, big_input, out, "--k", "256", "--batch-size", "2000")
    _kill_when_staging_has_data(process, tmp_path, "out")
    assert read_manifest(str(out)) == committed
    assert ds.dataset(str(out), format="parquet").count_rows() == 100_000

    # a re-run with another shard count replaces the output: no stale shard survives
    again = _launch(trained, big_input, out, "--shards", "2")
    assert again.wait(timeout=300) == 0, again.stdout.read()[-3000:]
    assert len(list(out.glob("part-*.parquet"))) == 2
    assert ds.dataset(str(out), format="parquet").count_rows() == 100_000
    assert read_manifest(str(out)).run_id != committed.run_id


def test_object_store_protocol_on_a_local_path(trained, workspace, tmp_path, monkeypatch):
    """The copy + manifest protocol used for gs:// and s3://, exercised through Beam's
    FileSystems on a local path: the manifest lists exactly the committed files and a re-run
    deletes the previous run's files."""
    import vaewatch.pipeline.plan as plan_module

    monkeypatch.setattr(plan_module, "committer_for", ObjectStoreCommitter)
    job, _ = trained
    out = tmp_path / "store"

    def once(shards):
        return run(
            ScoreJob(
                input=str(workspace / "holdout"),
                output=str(out),
                model="models:/transactions@champion",
                tracking_uri=job.tracking_uri,
                options=ScoreOptions(shards=shards),
            )
        )

    first = once(3)
    files = sorted(p.name for p in out.glob("part-*.parquet"))
    assert len(files) == 3 and all(first.manifest.run_id in f for f in files)
    assert sorted(first.manifest.files) == files
    assert (out / SUCCESS).exists() and (out / MANIFEST).exists()
    second = once(2)
    files = sorted(p.name for p in out.glob("part-*.parquet"))
    assert len(files) == 2 and all(second.manifest.run_id in f for f in files)
    assert not list(out.glob("_staging-*"))
    total = sum(pq.ParquetFile(out / f).metadata.num_rows for f in second.manifest.files)
    assert total == second.manifest.rows.scored == 5_000


@pytest.mark.parametrize("committer", [LocalCommitter, ObjectStoreCommitter])
def test_publishing_again_after_success_changes_nothing(
    trained, workspace, tmp_path, monkeypatch, committer
):
    """A runner may retry the step that published (a bundle retried after success): the
    second publish finds its own run committed and returns it, touching nothing."""
    import vaewatch.pipeline.plan as plan_module

    monkeypatch.setattr(plan_module, "committer_for", committer)
    job, _ = trained
    out = tmp_path / "out"
    result = run(
        ScoreJob(
            input=str(workspace / "holdout"),
            output=str(out),
            model="models:/transactions@champion",
            tracking_uri=job.tracking_uri,
            options=ScoreOptions(overrides=ScoringOverrides(k=4)),
        )
    )
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    again = committer(str(out), result.manifest.run_id).publish(result.manifest)
    assert again == result.manifest
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} == before
    assert read_manifest(str(out)) == result.manifest


def test_report_on_an_output_without_scored_rows_is_a_clear_error(trained, workspace, tmp_path):
    from click.testing import CliRunner

    from vaewatch.jobs.cli import main

    job, _ = trained
    table = pq.read_table(workspace / "holdout").slice(0, 20)
    for name in table.column_names:
        if name != "record_id":
            column = table.schema.get_field_index(name)
            table = table.set_column(column, name, pa.nulls(20, table.schema.field(name).type))
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "empty.parquet")
    result = run(
        ScoreJob(
            input=str(tmp_path / "in"),
            output=str(tmp_path / "out"),
            model="models:/transactions@champion",
            tracking_uri=job.tracking_uri,
        )
    )
    assert result.manifest.rows.to_json() == {"in": 20, "scored": 0, "rejected": 20}
    report = CliRunner().invoke(
        main, ["report", str(tmp_path / "out"), "--out", str(tmp_path / "r.html")]
    )
    assert report.exit_code == 1, report.output
    assert "has no scored rows" in report.output and "Traceback" not in report.output
