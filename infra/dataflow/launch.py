"""Flex Template entry point: the template launcher calls this with the template's parameters
as --name=value flags plus Dataflow's own options; they become one `vaewatch score` call."""

from __future__ import annotations

import argparse
import sys

from vaewatch.jobs.cli import main

TEMPLATE_PARAMETERS = ("input", "output", "model", "tracking_uri", "k")


def command(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser()
    for name in TEMPLATE_PARAMETERS:
        parser.add_argument(f"--{name}", required=name != "k")
    known, beam_args = parser.parse_known_args(argv)
    args = [
        "score",
        "--input", known.input,
        "--output", known.output,
        "--model", known.model,
        "--tracking-uri", known.tracking_uri,
        "--runner", "DataflowRunner",
    ]  # fmt: skip
    if known.k:
        args += ["--k", known.k]
    return [*args, "--", *beam_args]


if __name__ == "__main__":
    sys.exit(main(command(sys.argv[1:])))
