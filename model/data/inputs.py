"""Parquet inputs: resolve a path, directory or glob to files, fingerprint them, stream batches.

Paths are anything pyarrow's filesystems understand: local paths, `file://`, `s3://`, `gs://`,
`hdfs://`. A directory means every `*.parquet` file below it, skipping names that start with
`_` or `.` (Hive/Spark convention: `_SUCCESS`, `_manifest.json`, `_rejected/`, temp folders).
A glob matches path segments one by one (`*` never crosses a `/`; `**` matches any depth).
Files are listed in sorted order, so a row's position in the stream is stable across runs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vaewatch.model.errors import DependencyUnavailable, UserError

GLOB_CHARS = frozenset("*?[")
DEFAULT_READ_BATCH_ROWS = 65_536  # large enough to amortise Python per batch, small in memory


class InputError(UserError):
    """The input path, glob or files cannot be used; the message says which and why."""


class StoreUnavailable(DependencyUnavailable):
    """An object store did not answer (refused, timed out, name not resolved)."""


# what pyarrow's and boto3's messages say when a store cannot be reached at all, as opposed
# to answering with an error (no such bucket, access denied)
UNREACHABLE = (
    "NETWORK_CONNECTION", "Could not connect", "could not connect", "Connection refused",
    "timed out", "Timeout", "UNAVAILABLE", "Could not resolve host", "Name or service not known",
    "Failed to connect", "EndpointConnectionError", "Connect timeout",
)  # fmt: skip


def storage_failure(location: str, what: str, err: Exception) -> UserError:
    """The error to raise when reaching `location` failed with `err`: StoreUnavailable (the
    job may succeed later) when the store did not answer, else InputError."""
    text = str(err)
    if any(marker in text for marker in UNREACHABLE):
        return StoreUnavailable(
            f"the storage of {what} {location!r} did not answer ({text.splitlines()[0][:300]}); "
            "nothing was done. Check the endpoint (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST) "
            "and the network."
        )
    return InputError(f"cannot access {what} {location!r}: {text.splitlines()[0][:300]}")


@dataclass(frozen=True)
class InputFile:
    path: str  # as the user names it: a local path, or a URI with its scheme (s3://bucket/key)
    size: int  # bytes
    modified: str  # ISO-8601 mtime, "" when the filesystem does not report one


def inside(path: str) -> str:
    """The path as pyarrow's filesystem object takes it: a URI without its scheme."""
    return path.split("://", 1)[1] if "://" in path else path


def _is_hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def _split_glob(path: str) -> tuple[str, list[str]]:
    """('base/dir', ['pattern', 'segments']) with base the longest glob-free prefix."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if GLOB_CHARS & set(part):
            return "/".join(parts[:i]) or "/", parts[i:]
    return path, []


def _match_segments(segments: Sequence[str], pattern: Sequence[str]) -> bool:
    if not pattern:
        return not segments
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match_segments(segments[i:], rest) for i in range(len(segments) + 1))
    return bool(segments) and (
        fnmatch.fnmatchcase(segments[0], head) and _match_segments(segments[1:], rest)
    )


def filesystem_for(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI pyarrow knows, else the local filesystem with an
    absolute path."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator and location.startswith(("gs://", "gcs://")):
        # google-cloud-storage's convention, which pyarrow does not read: a GCS emulator there,
        # spoken to without credentials
        scheme, _, host = emulator.rpartition("://")
        filesystem = pafs.GcsFileSystem(
            anonymous=True, endpoint_override=host.rstrip("/"), scheme=scheme or "http"
        )
        return filesystem, location.split("://", 1)[1]
    try:
        filesystem, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, ValueError):
        filesystem, path = pafs.LocalFileSystem(), location
    except OSError as err:
        raise InputError(f"cannot open the filesystem of {location!r}: {err}") from err
    if isinstance(filesystem, pafs.LocalFileSystem):
        path = Path(path).expanduser().absolute().as_posix()
    return filesystem, path


def input_containing(location: str | Sequence[str], output: str) -> str | None:
    """The input location (a directory, or a glob) that would list a scored file written to
    `output`: a later run over the same input would read this run's output as its records.
    None when no input does. Paths only; nothing is listed."""

    def normal(path: str) -> str:
        return path.rstrip("/") if "://" in path else os.path.abspath(path)

    written = normal(output) + "/part-00000-of-00001.parquet"
    for loc in [location] if isinstance(location, str) else location:
        base, pattern = _split_glob(normal(loc))
        if not written.startswith(base.rstrip("/") + "/"):
            continue
        relative = written[len(base.rstrip("/")) :].lstrip("/").split("/")
        if _match_segments(relative, pattern) if pattern else not any(map(_is_hidden, relative)):
            return loc
    return None


def resolve_files(location: str | Sequence[str]) -> tuple[pafs.FileSystem, list[InputFile]]:
    """Every Parquet file a location (or several) names, sorted, with sizes and mtimes."""
    locations = [location] if isinstance(location, str) else list(location)
    if not locations:
        raise InputError("no input given: pass a Parquet file, a directory or a glob")
    filesystem, found = None, {}
    for loc in locations:
        fs, path = filesystem_for(loc)
        scheme = "" if isinstance(fs, pafs.LocalFileSystem) else loc.split("://", 1)[0] + "://"
        if filesystem is not None and type(fs) is not type(filesystem):
            raise InputError(
                f"inputs mix filesystems ({type(filesystem).__name__} and {type(fs).__name__}); "
                "read them in separate runs"
            )
        filesystem = fs
        base, pattern = _split_glob(path.rstrip("/") or "/")
        try:
            info = fs.get_file_info(base)
        except OSError as err:
            raise storage_failure(loc, "input", err) from err
        if info.type == pafs.FileType.NotFound:
            raise InputError(
                f"input {loc!r} does not exist ({base!r} not found); check the path"
                + (" and the glob" if pattern else "")
            )
        if info.type == pafs.FileType.File:
            if pattern:
                raise InputError(f"input {loc!r}: {base!r} is a file, not a directory")
            candidates = [info]
        else:
            candidates = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        for item in candidates:
            if item.type != pafs.FileType.File:
                continue
            relative = item.path[len(base) :].lstrip("/").split("/") if item.path != base else []
            if pattern:
                if not _match_segments(relative, pattern):
                    continue
            elif relative and (
                any(_is_hidden(p) for p in relative) or not item.path.endswith(".parquet")
            ):
                continue  # inside a directory: only visible *.parquet files
            mtime = item.mtime.isoformat() if item.mtime is not None else ""
            uri = scheme + item.path
            found[uri] = InputFile(uri, int(item.size or 0), mtime)
    if not found:
        raise InputError(
            f"input {locations if len(locations) > 1 else locations[0]!r} matched no Parquet "
            "files; check the path or glob (a directory is searched for *.parquet)"
        )
    return filesystem, [found[p] for p in sorted(found)]


def read_footers(files: Sequence[InputFile], filesystem) -> list[pq.FileMetaData]:
    """Each file's Parquet footer (schema, row groups, row count), read once; no data read.
    A file that is not Parquet is an InputError naming it."""
    footers = []
    for f in files:
        try:
            footers.append(pq.ParquetFile(inside(f.path), filesystem=filesystem).metadata)
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"input file {f.path!r} is not readable Parquet: {err}") from err
    return footers


@dataclass(frozen=True)
class Fingerprint:
    """What a model was trained on: enough to tell later whether the data changed."""

    files: tuple[InputFile, ...]
    total_bytes: int
    rows: int
    digest: str  # sha256 over (path, size, mtime) of every file, first 16 hex digits

    def to_json(self) -> dict:
        d = asdict(self)
        d["files"] = [asdict(f) for f in self.files]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Fingerprint:
        return cls(
            files=tuple(InputFile(**f) for f in d["files"]),
            total_bytes=d["total_bytes"],
            rows=d["rows"],
            digest=d["digest"],
        )


class ParquetSource:
    """A fixed, sorted set of Parquet files read as a stream of record batches."""

    def __init__(self, location: str | Sequence[str]):
        self.location = location
        self.filesystem, self.files = resolve_files(location)
        self._footers: list[pq.FileMetaData] | None = None
        try:
            self.dataset = ds.dataset(
                [inside(f.path) for f in self.files], format="parquet", filesystem=self.filesystem
            )
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"cannot read {location!r} as Parquet: {err}") from err

    @property
    def schema(self) -> pa.Schema:
        return self.dataset.schema

    def num_rows(self) -> int:
        """From the footers: no data is read."""
        return sum(self.file_rows())

    def fingerprint(self) -> Fingerprint:
        h = hashlib.sha256()
        for f in self.files:
            h.update(json.dumps(asdict(f), sort_keys=True).encode())
        return Fingerprint(
            files=tuple(self.files),
            total_bytes=sum(f.size for f in self.files),
            rows=self.num_rows(),
            digest=h.hexdigest()[:16],
        )

    def check_columns(self, columns: Sequence[str], what: str) -> None:
        missing = [c for c in columns if c not in self.schema.names]
        if missing:
            raise InputError(
                f"{what} names column(s) {missing} that are not in {self.location!r}; the data "
                f"has columns {self.schema.names}"
            )

    def footers(self) -> list[pq.FileMetaData]:
        """Each file's Parquet footer, read once (no data read)."""
        if self._footers is None:
            self._footers = read_footers(self.files, self.filesystem)
        return self._footers

    def file_rows(self) -> list[int]:
        """Rows per file, from the footers (no data read)."""
        return [footer.num_rows for footer in self.footers()]

    def file_schemas(self) -> list[pa.Schema]:
        """Each file's Arrow schema, from the footers (no data read). `schema` is the first's."""
        return [footer.schema.to_arrow_schema() for footer in self.footers()]

    def batches(
        self,
        columns: Sequence[str] | None = None,
        batch_rows: int = DEFAULT_READ_BATCH_ROWS,
        file_order: Sequence[int] | None = None,
    ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """Stream (first row ordinal, record batch) pairs, projected to `columns`.

        A row's ordinal is its position in the sorted file list (file offset + row in file), the
        same whatever `file_order` the files are read in, so it can key a seeded split.
        """
        rows = self.file_rows()
        offsets = [sum(rows[:i]) for i in range(len(rows))]
        order = range(len(self.files)) if file_order is None else file_order
        for i in order:
            path = self.files[i].path
            try:
                reader = pq.ParquetFile(inside(path), filesystem=self.filesystem)
                position = offsets[i]
                for batch in reader.iter_batches(
                    batch_size=batch_rows, columns=list(columns) if columns is not None else None
                ):
                    if batch.num_rows:
                        yield position, batch
                    position += batch.num_rows
            except (pa.ArrowInvalid, OSError) as err:
                raise InputError(f"cannot read Parquet file {path!r}: {err}") from err
