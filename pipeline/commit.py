"""Committing a scoring run: readers see the previous complete output or the new one, never a mix.

A sink renames shards one at a time, leaves `beam-temp-*` folders behind when a run dies, and
a re-run with another shard count keeps the old shards. So a run never writes into the output
directory. It writes everything (scored shards, `_rejected/`, `_manifest.json`,
`_SUCCESS`) into its own staging folder, checks rows in = scored + rejected there, and only then
publishes:

- Local filesystems (`LocalCommitter`): the staging folder is a hidden sibling of the output,
  `.NAME.staging-RUNID`, on the same filesystem. Publishing is one atomic `renameat2(...,
  RENAME_EXCHANGE)` that swaps it with the existing output (or one `rename` when there is no
  output yet); the previous output, now at the staging path, is deleted afterwards. Where the
  kernel or filesystem lacks RENAME_EXCHANGE, two renames are used and readers may briefly find
  no output (still never a mix). A re-run replaces the whole directory, so no stale shard can
  survive it.
- Object stores and other Beam filesystems (`ObjectStoreCommitter`, gs://, s3://, ...), where
  nothing renames atomically: staging is `OUT/_staging-RUNID/`; publishing copies the shards to
  run-unique names (`part-RUNID-00000-of-00004.parquet`), then writes `_manifest.json` (one
  object write, atomic on GCS and S3) listing exactly the committed files, then `_SUCCESS`, and
  only then deletes files of earlier runs. The manifest is the source of truth there: vaewatch's
  readers read the files it lists, and a plain glob may see two runs' files for the moments
  between the copy and the clean-up.

Debris of a crashed run (a staging folder) is hidden from readers by its `.`/`_` prefix and
removed by the next run for the same output.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as dt
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from vaewatch.model.contract import Manifest
from vaewatch.model.errors import UserError, setting
from vaewatch.pipeline import faults, storage
from vaewatch.pipeline.committed import MANIFEST, SUCCESS, read_manifest  # noqa: F401 - re-exported

REJECTED_DIR = "_rejected"
PART_PREFIX = "part"
TEMP_PREFIX = "beam-temp-"  # a sink's temporary folder in staging; removed at commit


class OutputError(UserError):
    """The output location cannot be used or a run's output does not add up."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), a)


def _count_rows(paths: list[str]) -> int:
    total = 0
    for path in paths:
        with FileSystems.open(path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def _is_vaewatch_output(listing: list[str]) -> bool:
    names = {Path(p).name for p in listing}
    return not listing or MANIFEST in names or SUCCESS in names


class LocalCommitter:
    """Stage in a hidden sibling folder, publish with one atomic directory exchange."""

    def __init__(self, output: str, run_id: str):
        self.output = str(Path(output).expanduser().absolute())
        self.run_id = run_id
        out = Path(self.output)
        self.staging = str(out.parent / f".{out.name}.staging-{run_id}")

    def prepare(self) -> None:
        out = Path(self.output)
        if out.exists() and not out.is_dir():
            raise OutputError(
                f"output {self.output!r} is a file; pass a directory as {setting('output')}"
            )
        if out.is_dir() and not _is_vaewatch_output([str(p) for p in out.iterdir()]):
            raise OutputError(
                f"output {self.output!r} already holds files that vaewatch did not write (no "
                f"{MANIFEST}); a run replaces its output directory as a whole, so choose a new "
                "or empty directory"
            )
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create {str(out.parent)!r}: {err.strerror}") from err
        for debris in out.parent.glob(f".{out.name}.staging-*"):
            shutil.rmtree(debris, ignore_errors=True)  # a crashed earlier run's staging folder
        Path(self.staging).mkdir()

    def staged_files(self) -> tuple[list[str], list[str]]:
        root = Path(self.staging)
        scored = sorted(str(p) for p in root.glob(f"{PART_PREFIX}-*.parquet"))
        rejected = sorted(str(p) for p in (root / REJECTED_DIR).glob(f"{PART_PREFIX}-*.parquet"))
        return scored, rejected

    def publish(self, manifest: Manifest) -> Manifest:
        """Publish the staged run; publishing it again after success returns the same result."""
        done = _already_published(self.output, manifest)
        if done is not None and not Path(self.staging).exists():
            return done
        scored, rejected = self.staged_files()
        committed = _check_counts(self.output, scored, rejected, manifest)
        faults.point("commit:counted")
        root = Path(self.staging)
        for debris in root.rglob(f"{TEMP_PREFIX}*"):
            shutil.rmtree(debris, ignore_errors=True)
        _write_manifest_and_success(str(root), committed)
        faults.point("commit:success")
        out = Path(self.output)
        if not out.exists():
            os.rename(self.staging, self.output)
            faults.point("commit:exchanged")
        elif _exchange(self.staging, self.output):
            faults.point("commit:exchanged")
            shutil.rmtree(self.staging)  # now the previous output
        else:
            previous = out.parent / f".{out.name}.previous-{self.run_id}"
            os.rename(self.output, previous)
            os.rename(self.staging, self.output)
            faults.point("commit:exchanged")
            shutil.rmtree(previous)
        return committed

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


class ObjectStoreCommitter:
    """Stage under OUT/_staging-RUNID/, publish by copy + manifest + clean-up."""

    def __init__(self, output: str, run_id: str):
        self.output = output.rstrip("/")
        self.run_id = run_id
        self.staging = FileSystems.join(self.output, f"_staging-{run_id}")

    def prepare(self) -> None:
        listing = list_files(self.output)
        visible = [p for p in listing if "/_staging-" not in p]
        if visible and not _is_vaewatch_output(visible):
            raise OutputError(
                f"output {self.output!r} already holds files that vaewatch did not write (no "
                f"{MANIFEST}); choose a new or empty location"
            )
        stale = {
            FileSystems.join(self.output, "_staging-" + p.split("/_staging-", 1)[1].split("/")[0])
            for p in listing
            if "/_staging-" in p
        }
        for folder in sorted(stale):
            _delete_tree(folder)

    def staged_files(self) -> tuple[list[str], list[str]]:
        listing = list_files(self.staging)
        scored = sorted(
            p
            for p in listing
            if Path(p).name.startswith(PART_PREFIX + "-")
            and f"/{REJECTED_DIR}/" not in p
            and f"/{TEMP_PREFIX}" not in p
        )
        rejected = sorted(p for p in listing if f"/{REJECTED_DIR}/{PART_PREFIX}-" in p)
        return scored, rejected

    def publish(self, manifest: Manifest) -> Manifest:
        """Publish the staged run; publishing it again after success returns the same result."""
        done = _already_published(self.output, manifest)
        if done is not None:
            _delete_tree(self.staging)
            return done
        scored, rejected = self.staged_files()
        committed = _check_counts(self.output, scored, rejected, manifest)
        faults.point("commit:counted")
        sources, destinations = [], []
        for group, paths in (("", scored), (REJECTED_DIR, rejected)):
            for path in paths:
                name = Path(path).name.replace(
                    f"{PART_PREFIX}-", f"{PART_PREFIX}-{self.run_id}-", 1
                )
                target = (
                    FileSystems.join(self.output, group, name)
                    if group
                    else FileSystems.join(self.output, name)
                )
                sources.append(path)
                destinations.append(target)
        if sources:
            for folder in {d.rsplit("/", 1)[0] for d in destinations}:
                storage.make_dirs(folder)
            FileSystems.copy(sources, destinations)
        committed = dataclasses.replace(
            committed,
            files=tuple(
                d[len(self.output) + 1 :] for d in destinations if f"/{REJECTED_DIR}/" not in d
            ),
            rejected_files=tuple(
                d[len(self.output) + 1 :] for d in destinations if f"/{REJECTED_DIR}/" in d
            ),
        )
        _write_manifest_and_success(self.output, committed)
        keep = set(destinations) | {
            FileSystems.join(self.output, MANIFEST),
            FileSystems.join(self.output, SUCCESS),
        }
        old = [p for p in list_files(self.output) if p not in keep and "/_staging-" not in p]
        if old:
            FileSystems.delete(old)
        _delete_tree(self.staging)
        return committed

    def abort(self) -> None:
        _delete_tree(self.staging)


def list_files(prefix: str) -> list[str]:
    """Every file below `prefix`; [] when nothing is there."""
    return match_paths(FileSystems.join(prefix, "**"))


def match_paths(pattern: str) -> list[str]:
    """The files a glob matches through Beam's filesystems (`**` below a prefix included); []
    when nothing is there. Any other failure of the store (permissions, an unreachable
    endpoint) is raised, never read as "empty"."""
    try:
        results = FileSystems.match([pattern])
    except BeamIOError as err:
        causes = list(err.exception_details.values())
        if causes and all(isinstance(c, FileNotFoundError) for c in causes):
            return []
        raise
    return [m.path for result in results for m in result.metadata_list]


def _delete_tree(prefix: str) -> None:
    paths = list_files(prefix)
    if paths:
        FileSystems.delete(paths)
    try:  # local paths keep empty folders; object stores have none to delete
        if FileSystems.exists(prefix):
            FileSystems.delete([prefix])
    except OSError:
        pass


def _check_counts(output: str, scored, rejected, manifest: Manifest) -> Manifest:
    rows_scored, rows_rejected = _count_rows(scored), _count_rows(rejected)
    rows_in = manifest.rows.rows_in
    if rows_scored + rows_rejected != rows_in:
        raise OutputError(
            f"run does not add up: {rows_in} rows in, {rows_scored} scored + {rows_rejected} "
            f"rejected; nothing was committed to {output!r}"
        )
    return manifest.committed(
        scored=rows_scored,
        rejected=rows_rejected,
        files=[Path(p).name for p in scored],
        rejected_files=[f"{REJECTED_DIR}/{Path(p).name}" for p in rejected],
        finished=dt.datetime.now(dt.timezone.utc).isoformat(),
    )


def _write_manifest_and_success(root: str, committed: Manifest) -> None:
    text = json.dumps(committed.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n"
    with FileSystems.create(FileSystems.join(root, MANIFEST)) as handle:
        handle.write(text.encode())
    faults.point("commit:manifest")
    with FileSystems.create(FileSystems.join(root, SUCCESS)) as handle:
        handle.write(f"{committed.run_id}\n".encode())


def _already_published(output: str, manifest: Manifest) -> Manifest | None:
    """The committed manifest when this very run (same run id) is what `output` holds."""
    committed = read_manifest(output)
    return committed if committed is not None and committed.run_id == manifest.run_id else None


@contextlib.contextmanager
def output_lock(output: str):
    """Hold an exclusive lock on a local output for the whole run, so a second run of the same
    output fails at once with a clear message instead of racing it. The lock is an flock on a
    hidden sibling file (released by the kernel if the process dies). Object stores have no
    locks: there, two concurrent runs each stage their own files, and the run whose staging the
    other removed fails its row-count check and publishes nothing (the loser is harmless)."""
    if FileSystems.get_scheme(output) not in (None, "file"):
        yield
        return
    out = Path(output.removeprefix("file://")).expanduser().absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = open(out.parent / f".{out.name}.lock", "a")  # noqa: SIM115 - held until exit
    except OSError as err:
        raise OutputError(
            f"cannot write next to the output {str(out)!r}: {err.strerror}; pass a writable "
            f"{setting('output')}"
        ) from err
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise OutputError(
                f"another vaewatch run is writing {str(out)!r} right now (it holds "
                f"{handle.name}); wait for it to finish, then re-run if needed"
            ) from err
        yield
    finally:
        handle.close()


def committer_for(output: str, run_id: str) -> LocalCommitter | ObjectStoreCommitter:
    scheme = FileSystems.get_scheme(output)
    if scheme in (None, "file"):
        return LocalCommitter(output.removeprefix("file://"), run_id)
    return ObjectStoreCommitter(output, run_id)
