"""`vaewatch nightly`: score ROOT/dt=DATE/ into OUT/dt=DATE/, one committed partition per day.

The model alias is pinned once for the whole run, so a promotion during a backfill cannot mix
versions. A day already committed with that same version and the same input files (paths,
sizes, modification times, as its manifest lists them) is skipped unless `force`; a day whose
inputs changed since (late or corrected data) is re-scored. `--catch-up` takes every input
partition up to yesterday, so a night a scheduler missed is scored by the next one. Every
input partition is checked before any work, so a missing day fails the run at once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vaewatch.jobs.days import days_to_score, parse_date, partition  # noqa: F401 - re-exported
from vaewatch.model import registry
from vaewatch.model.contract import Manifest
from vaewatch.model.data.inputs import InputError, InputFile, resolve_files
from vaewatch.model.errors import UserError
from vaewatch.pipeline import faults
from vaewatch.pipeline.commit import output_lock
from vaewatch.pipeline.committed import read_manifest
from vaewatch.pipeline.plan import ScoreJob, ScoreOptions, ScorePlan
from vaewatch.pipeline.score import run


def stale_inputs(committed: Manifest, files: Sequence[InputFile]) -> str | None:
    """Why a committed day's inputs differ from what is there now, or None if they do not."""
    then = {(i.path, i.size, i.modified) for i in committed.inputs}
    now = {(f.path, f.size, f.modified) for f in files}
    if then == now:
        return None
    paths_then, paths_now = {p for p, _, _ in then}, {p for p, _, _ in now}
    added, removed = len(paths_now - paths_then), len(paths_then - paths_now)
    changed = len({p for p, _, _ in now - then} & paths_then)
    return f"its input changed since it was committed ({added} added, {removed} removed, " \
        f"{changed} modified)"  # fmt: skip


@dataclass
class NightlyJob:
    input_root: str
    output_root: str
    model: str
    tracking_uri: str
    days: Sequence[dt.date]
    force: bool = False
    options: ScoreOptions = field(default_factory=ScoreOptions)


@dataclass
class DayOutcome:
    day: dt.date
    status: str  # "scored" or "skipped"
    rows_in: int
    rows_scored: int
    rows_rejected: int
    output: str


def run_nightly(
    job: NightlyJob,
    echo: Callable[[str], None] = print,
    on_planned: Callable[[ScorePlan], None] | None = None,
) -> list[DayOutcome]:
    """Score each of the job's days in turn (`on_planned`: given each day's plan before its rows
    are read, as `pipeline.score.run` does)."""
    pinned = registry.resolve(job.model, job.tracking_uri)
    echo(f"model {job.model} -> {pinned.uri}")
    missing, inputs = [], {}
    for day in job.days:
        try:
            inputs[day] = resolve_files(partition(job.input_root, day))[1]
        except InputError:
            missing.append(partition(job.input_root, day))
    if missing:
        raise UserError(
            f"input partition(s) missing or empty: {missing}; check --input-root and --date "
            "(each day is read from INPUT_ROOT/dt=YYYY-MM-DD/)"
        )
    outcomes = []
    for day in job.days:
        out = partition(job.output_root, day)
        # the check and the run under one lock: a concurrent nightly run either fails at once
        # ("another vaewatch run is writing") or, coming after, finds the day committed
        with output_lock(out):
            outcomes.append(_day(job, day, out, pinned.uri, inputs[day], echo, on_planned))
        if outcomes[-1].status == "scored":
            faults.point("nightly:day-committed")
    return outcomes


def _day(job: NightlyJob, day, out: str, uri: str, files, echo, on_planned=None) -> DayOutcome:
    """One day: skipped when committed with this model version and these inputs, else scored."""
    committed = read_manifest(out)
    if committed and committed.model.uri == uri and not job.force:
        stale = stale_inputs(committed, files)
        if stale is None:
            rows = committed.rows
            echo(f"{day}: already committed with {uri}; skipped (--force re-scores)")
            return DayOutcome(day, "skipped", rows.rows_in, rows.scored, rows.rejected, out)
        echo(f"{day}: re-scoring: {stale}")
    result = run(
        ScoreJob(
            input=partition(job.input_root, day),
            output=out,
            model=uri,
            tracking_uri=job.tracking_uri,
            options=job.options,
        ),
        lock_held=True,
        on_planned=on_planned,
    )
    rows = result.manifest.rows
    echo(
        f"{day}: scored {rows.scored:,} of {rows.rows_in:,} rows "
        f"({rows.rejected:,} rejected) -> {out}"
    )
    return DayOutcome(day, "scored", rows.rows_in, rows.scored, rows.rejected, out)
