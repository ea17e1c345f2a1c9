"""Where data lives: which storage schemes work, and what each needs installed.

vaewatch reads inputs with pyarrow's filesystems (local, s3://, gs://, hdfs://) and writes and
commits outputs with Beam's (the same ones Beam's workers use on Dataflow, Flink and Spark).
Both take credentials and endpoints from each ecosystem's standard configuration: for S3 the
AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
`AWS_PROFILE`), for GCS application default credentials (`GOOGLE_APPLICATION_CREDENTIALS`) and,
against an emulator, `STORAGE_EMULATOR_HOST`. Beam's own filesystem options (`--s3_endpoint_url`,
...) can still be given after `--`.

Beam's object-store filesystems need client libraries that are optional extras of vaewatch;
`require` turns a missing one into a message naming the extra, before anything runs.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

from vaewatch.model.data.inputs import filesystem_for, storage_failure
from vaewatch.model.errors import UserError

# scheme: (vaewatch extra, the modules Beam's filesystem for it imports)
EXTRAS = {
    "s3": ("aws", ("boto3",)),
    "gs": ("gcp", ("google.cloud.storage", "google.auth")),
}


_configured = False  # whether Beam's filesystems got their options in this process


class StorageUnavailable(UserError):
    """A path's scheme needs client libraries that are not installed."""


def make_dirs(path: str) -> None:
    """A folder and its parents, on a file system that has folders (object stores have none:
    nothing to do); one that is already there, or made meanwhile by another worker, is fine."""
    FileSystems = filesystems()  # noqa: N806 - Beam's class, under its name
    if not FileSystems.exists(path):
        try:
            FileSystems.mkdirs(path)
        except OSError:
            if not FileSystems.exists(path):
                raise


def scheme(location: str) -> str:
    """'s3', 'gs', ... or 'file' for a local path."""
    return location.split("://", 1)[0].lower() if "://" in location else "file"


def is_local(location: str) -> bool:
    return scheme(location) == "file"


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(location: str, what: str) -> None:
    """Raise StorageUnavailable when `location`'s scheme needs an extra that is not installed."""
    extra, modules = EXTRAS.get(scheme(location), (None, ()))
    missing = [m for m in modules if not _installed(m)]
    if missing:
        raise StorageUnavailable(
            f"{what} {location!r} is on {scheme(location)}://, which needs the "
            f"{', '.join(missing)} package(s) vaewatch's [{extra}] extra installs: "
            f"pip install 'vaewatch[{extra}]' (or give a local path)"
        )


def probe(location: str, what: str) -> None:
    """Fail fast, before any work, when an object store does not answer: one metadata request
    through pyarrow (a few seconds of retries) instead of Beam's filesystem retrying for
    minutes. StoreUnavailable (exit 75) when it did not answer; the store's own refusals
    (no such bucket, access denied) are InputError."""
    if is_local(location):
        return
    filesystem, path = filesystem_for(location)
    try:
        filesystem.get_file_info(path)
    except OSError as err:
        raise storage_failure(location, what, err) from err


def filesystems():
    """Beam's FileSystems, given their options once in this process if no caller has
    (`configure`): Beam is imported here, when a path on it is first touched, not before."""
    from apache_beam.io.filesystems import FileSystems

    if not _configured:
        configure()
    return FileSystems


def configure(beam_args: Sequence[str] = ()) -> None:
    """Give Beam's filesystems their options in this process (a Pipeline does this on
    construction; the launcher lists, stages and commits before and after one)."""
    global _configured
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    FileSystems.set_options(PipelineOptions(list(beam_args)))
    _configured = True
    if os.environ.get("STORAGE_EMULATOR_HOST") and _installed("apache_beam.internal.gcp.auth"):
        _anonymous_gcs()


def _anonymous_gcs() -> None:
    """Against a GCS emulator (STORAGE_EMULATOR_HOST), Beam's GCS filesystem connects without
    credentials, as google-cloud-storage's own client does; otherwise Beam first retries
    application default credentials for ~20 s before falling back to anonymous access."""
    from apache_beam.internal.gcp import auth

    with auth._Credentials._credentials_lock:
        auth._Credentials._credentials_init = True
        auth._Credentials._credentials = None
