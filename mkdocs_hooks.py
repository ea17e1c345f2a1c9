"""MkDocs hook: the API reference's view of the source tree.

The package folders (model/, pipeline/, jobs/) become vaewatch.model, vaewatch.pipeline and
vaewatch.jobs only when installed (setuptools' package-dir), and mkdocstrings' static reader
(griffe) looks for a `vaewatch` folder. Before each build this lays that mapping out as symlinks
under build/api-src/, which mkdocs.yml gives mkdocstrings as its search path. It runs as the
hook is loaded, before any plugin reads its configuration (some mkdocstrings-python releases drop
a search path that does not exist yet), and again on each config (`mkdocs serve` rebuilds).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "build" / "api-src" / "vaewatch"
PACKAGES = ("model", "pipeline", "jobs")


def lay_out() -> None:
    SOURCE.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        link = SOURCE / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(ROOT / name, link, target_is_directory=True)


lay_out()


def on_config(config, **_):
    lay_out()
    return config
