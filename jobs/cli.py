"""The `vaewatch` command line."""

from __future__ import annotations

import enum
import sys
from importlib.metadata import PackageNotFoundError, version

import click

from jobs import params


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # the job failed for a reason the user can fix; the message says which
    USAGE = 2  # click's own code for bad usage


def package_version() -> str:
    try:
        return version("vaewatch")
    except PackageNotFoundError:
        return "0+unknown"


class JobFailed(click.ClickException):
    """An expected failure: printed as one paragraph, exit code 1, no traceback."""

    exit_code = ExitCode.FAILED


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_version(), prog_name="vaewatch")
def main() -> None:
    """vaewatch: score tabular Parquet records by how unlikely they are under a VAE."""


@main.command()
@params.workdir
@params.rows_per_day
@params.days
@params.epochs
@params.seed
@params.k
def demo(workdir, rows_per_day, days, epochs, seed, k) -> None:
    """Run the whole loop on generated data: partitions, training, IWAE scoring, ROC-AUC."""
    from jobs.demo import run
    from model.estimators import DEFAULT_K

    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise JobFailed(
            f"cannot create the demo directory {str(workdir)!r}: {err.strerror}. "
            "Pass a writable --workdir (or set VAEWATCH_WORKDIR)."
        ) from err
    run(
        workdir,
        rows_per_day=rows_per_day,
        days=days,
        epochs=epochs,
        seed=seed,
        k=k or DEFAULT_K,
        echo=click.echo,
    )


if __name__ == "__main__":
    sys.exit(main())
