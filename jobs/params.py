"""Every CLI option, defined once: help text and a VAEWATCH_<NAME> environment variable each."""

from __future__ import annotations

from pathlib import Path

import click

ENV_PREFIX = "VAEWATCH_"


def option(*decls: str, **kwargs):
    """click.option with its env var from the long flag: --rows-per-day -> VAEWATCH_ROWS_PER_DAY."""
    long_flag = next(d for d in decls if d.startswith("--")).split("/")[0]
    kwargs.setdefault("envvar", ENV_PREFIX + long_flag[2:].replace("-", "_").upper())
    kwargs.setdefault("show_envvar", True)
    kwargs.setdefault("show_default", True)
    return click.option(*decls, **kwargs)


workdir = option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("vaewatch-demo"),
    help="Directory for the demo's generated data and outputs (created if missing).",
)
rows_per_day = option(
    "--rows-per-day",
    type=click.IntRange(min=500),
    default=20_000,
    help="Synthetic rows generated per daily partition.",
)
days = option(
    "--days",
    type=click.IntRange(min=2),
    default=4,
    help="Daily partitions to generate: the first trains the model, the rest are scored.",
)
seed = option("--seed", type=int, default=0, help="Seed for data, training and scoring noise.")
epochs = option("--epochs", type=click.IntRange(min=1), default=30, help="Maximum training epochs.")
k = option(
    "--k",
    type=click.IntRange(min=1),
    default=None,
    help="IWAE importance samples per record (default: the model's).",
)
