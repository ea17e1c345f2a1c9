"""Reading committed output: the layout a run commits (OUT/_manifest.json and OUT/_SUCCESS, or
one dt=YYYY-MM-DD/ partition per day) and the functions that find and read it.

These are what `query`, `top`, `summary`, `report` and `nightly`'s skip check need. A local
output is read with the standard library, so those commands start without loading Beam; an
object store goes through Beam's filesystems (the ones the runs wrote with), loaded on first
use. Writing and committing live in commit.py.
"""

from __future__ import annotations

import glob
import json
import os
import re

from vaewatch.model.contract import Manifest
from vaewatch.pipeline import storage

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")  # exactly this: no path separators, no "..", no spaces


def join(root: str, *parts: str) -> str:
    if storage.is_local(root):
        return os.path.join(root.removeprefix("file://"), *parts)
    return storage.filesystems().join(root, *parts)


def match_paths(pattern: str) -> list[str]:
    """The files a one-level glob (`OUT/dt=*/_SUCCESS`) matches; [] when nothing is there. A
    local pattern is matched by the standard library; an object store's by Beam (commit.py's
    `match_paths`), whose failures other than "not found" are raised, never read as empty."""
    if storage.is_local(pattern):
        return sorted(p for p in glob.glob(pattern.removeprefix("file://")) if os.path.isfile(p))
    from vaewatch.pipeline.commit import match_paths as beam_match

    storage.filesystems()  # configured before Beam's first use in this process
    return beam_match(pattern)


def read_manifest(output: str) -> Manifest | None:
    """The committed manifest of an output, or None if it has no committed run."""
    if storage.is_local(output):
        root = output.removeprefix("file://")
        path = os.path.join(root, MANIFEST)
        if not (os.path.isfile(os.path.join(root, SUCCESS)) and os.path.isfile(path)):
            return None
        with open(path, "rb") as handle:
            return Manifest.from_json(json.loads(handle.read().decode()))
    filesystems = storage.filesystems()
    path = filesystems.join(output, MANIFEST)
    if not filesystems.exists(filesystems.join(output, SUCCESS)) or not filesystems.exists(path):
        return None
    with filesystems.open(path) as handle:
        return Manifest.from_json(json.loads(handle.read().decode()))
