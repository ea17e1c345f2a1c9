"""The installed vaewatch version, recorded in artifacts, run tags and output metadata."""

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("vaewatch")
    except PackageNotFoundError:
        return "0+unknown"
