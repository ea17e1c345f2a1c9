"""The whole nightly loop on object stores: an S3-protocol server (moto) and a GCS emulator,
each a real server on 127.0.0.1 reached through the standard environment variables. Training
reads the bucket, two days are scored into it, a re-run replaces a day, query and report read
the committed output back, and a SIGKILL during publish loses and doubles nothing."""

import json
import os
import subprocess
import sys

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.conftest import TRAIN_EXCLUDE
from tests.servers import gcs_server, s3_server
from vaewatch.jobs.cli import main
from vaewatch.model import registry
from vaewatch.model.data.inputs import filesystem_for, inside
from vaewatch.model.synthetic import transactions
from vaewatch.pipeline import faults, storage
from vaewatch.pipeline.commit import MANIFEST, SUCCESS, read_manifest

DAYS = ("2026-03-01", "2026-03-02")
ROWS = {"2026-03-01": 1_500, "2026-03-02": 1_200}


def _make_bucket(scheme: str, bucket: str) -> None:
    if scheme == "s3":
        import boto3

        boto3.client("s3").create_bucket(Bucket=bucket)
    else:
        from google.cloud import storage as gcs

        gcs.Client(project="test").create_bucket(bucket)


@pytest.fixture(scope="module", params=["s3", "gs"])
def store(request, tmp_path_factory):
    """A bucket on a fresh server, with training data and two days of input in it."""
    scheme = request.param
    root = tmp_path_factory.mktemp(f"store-{scheme}")
    server = s3_server if scheme == "s3" else gcs_server
    with server(root) as env, pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        storage.configure()
        _make_bucket(scheme, "lake")
        base = f"{scheme}://lake"
        fs, _ = filesystem_for(base)
        for i in range(2):
            table = transactions(2_000, anomaly_rate=0.005, seed=300 + i, first_id=i * 2_000)
            pq.write_table(table, f"lake/train/part-{i}.parquet", filesystem=fs)
        for i, day in enumerate(DAYS):
            table = transactions(ROWS[day], anomaly_rate=0.05, seed=400 + i)
            pq.write_table(table, f"lake/in/dt={day}/part-0.parquet", filesystem=fs)
        yield base, env


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, f"{args}: {result.output}"
    return result.output


def _visible_rows(output: str) -> dict[str, int]:
    """Rows per day as a plain pyarrow reader that follows each day's manifest counts them."""
    fs, root = filesystem_for(output)
    counts = {}
    for day in DAYS:
        folder = f"{root}/dt={day}"
        if fs.get_file_info(f"{folder}/{SUCCESS}").type != pafs.FileType.File:
            continue
        with fs.open_input_stream(f"{folder}/{MANIFEST}") as handle:
            listed = json.load(handle)["files"]
        counts[day] = sum(pq.ParquetFile(f"{folder}/{f}", filesystem=fs).metadata.num_rows
                          for f in listed)  # fmt: skip
    return counts


def _objects(output: str, day: str) -> set[str]:
    fs, root = filesystem_for(output)
    folder = f"{root}/dt={day}"
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    return {i.path[len(folder) + 1 :] for i in infos if i.type == pafs.FileType.File}


def test_nightly_loop_on_an_object_store(store, tmp_path, monkeypatch):
    base, env = store
    monkeypatch.chdir(tmp_path)
    tracking = registry.default_tracking_uri(tmp_path)
    name = f"on-{base.split(':')[0]}"
    _cli(
        "train", "--data", f"{base}/train", "--model-name", name, "--epochs", 3,
        "--id-column", "record_id", "--exclude", ",".join(TRAIN_EXCLUDE),
        "--tracking-uri", tracking,
    )  # fmt: skip
    out = f"{base}/scores"
    nightly = [
        "nightly", "--input-root", f"{base}/in", "--output-root", out, "--k", 4,
        "--model", f"models:/{name}@champion", "--tracking-uri", tracking,
    ]  # fmt: skip
    for day in DAYS:
        _cli(*nightly, "--date", day)
    assert _visible_rows(out) == ROWS

    counted = json.loads(
        _cli(
            "query",
            out,
            "SELECT CAST(dt AS VARCHAR) AS dt, count(*) AS n FROM scores GROUP BY dt ORDER BY dt",
            "--format",
            "json",
        )  # fmt: skip
    )
    assert {r["dt"]: r["n"] for r in counted} == ROWS

    # a re-run replaces the day: the same rows once, only the new run's files left
    first = read_manifest(f"{out}/dt={DAYS[1]}")
    _cli(*nightly, "--date", DAYS[1], "--force")
    second = read_manifest(f"{out}/dt={DAYS[1]}")
    assert second.run_id != first.run_id
    assert _objects(out, DAYS[1]) == {*second.files, *second.rejected_files, MANIFEST, SUCCESS}
    assert _visible_rows(out) == ROWS

    _cli("report", out, "--out", tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert "<svg" in html or "<img" in html
    assert DAYS[1] in html

    # SIGKILL while publishing (files copied, manifest not yet replaced), then a re-run
    crash_env = dict(os.environ, **{faults.CRASH_ENV: "commit:manifest"})
    crash_env[faults.MARK_ENV] = str(tmp_path / "mark")
    killed = subprocess.run(
        [sys.executable, "-m", "vaewatch.jobs.cli", *map(str, nightly), "--date", DAYS[1],
         "--force"], env=crash_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "mark").read_text() == "commit:manifest@1\n"
    # the new files and manifest are in place, the previous run's files not yet deleted:
    # a reader that follows the manifest counts each row once
    assert len(_objects(out, DAYS[1])) > len(second.files) + len(second.rejected_files) + 2
    assert _visible_rows(out) == ROWS
    _cli(*nightly, "--date", DAYS[1], "--force")
    third = read_manifest(f"{out}/dt={DAYS[1]}")
    assert _visible_rows(out) == ROWS
    assert _objects(out, DAYS[1]) == {*third.files, *third.rejected_files, MANIFEST, SUCCESS}
    assert inside(out) == "lake/scores"


def test_a_missing_extra_is_named(tmp_path):
    """A scheme whose client library is absent: exit 1 naming the extra, before any work.
    The library is made unimportable for the child process by a shadowing package."""
    shadow = tmp_path / "shadow"
    (shadow / "boto3").mkdir(parents=True)
    (shadow / "boto3" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        [sys.executable, "-m", "vaewatch.jobs.cli", "score", "--input", "s3://lake/in",
         "--output", str(tmp_path / "out"), "--model", "models:/m@champion"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "pip install 'vaewatch[aws]'" in done.stderr and "s3://lake/in" in done.stderr
    assert "Traceback" not in done.stderr
