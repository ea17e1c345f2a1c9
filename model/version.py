"""vaewatch's version: the one place it is written (pyproject.toml reads it from here).

Recorded in model artifacts, run tags and output metadata. A model carries this file with its
code (MLflow code_paths), so a loaded model reports the version that saved it even where
vaewatch itself is not installed.
"""

__version__ = "0.2.0"


def package_version() -> str:
    return __version__
