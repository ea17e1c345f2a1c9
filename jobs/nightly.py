"""`vaewatch nightly`: score ROOT/dt=DATE/ into OUT/dt=DATE/, one committed partition per day.

The model alias is pinned once for the whole run, so a promotion during a backfill cannot mix
versions. A day already committed with that same version is skipped unless `force`. Every
input partition is checked before any work, so a missing day fails the run at once.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vaewatch.model import registry
from vaewatch.model.data import InputError, resolve_files
from vaewatch.model.errors import UserError
from vaewatch.pipeline import faults
from vaewatch.pipeline.commit import read_manifest
from vaewatch.pipeline.plan import ScoreJob, ScoreOptions
from vaewatch.pipeline.score import run

DATE = re.compile(r"\d{4}-\d{2}-\d{2}")  # exactly this: no path separators, no "..", no spaces
MAX_BACKFILL_DAYS = 3660


def parse_date(text: str, what: str = "--date") -> dt.date:
    """A YYYY-MM-DD calendar date, or a UserError naming the flag and the value."""
    if not isinstance(text, str) or not DATE.fullmatch(text):
        raise UserError(f"{what} must be a date written YYYY-MM-DD, got {text!r}")
    try:
        return dt.date.fromisoformat(text)
    except ValueError as err:
        raise UserError(f"{what} {text!r} is not a calendar date: {err}") from err


def days_between(first: dt.date, last: dt.date) -> list[dt.date]:
    if last < first:
        raise UserError(f"--to {last} is before --from {first}; give the range oldest first")
    count = (last - first).days + 1
    if count > MAX_BACKFILL_DAYS:
        raise UserError(f"a backfill of {count} days is too long; split it (at most ten years)")
    return [first + dt.timedelta(days=i) for i in range(count)]


def yesterday_utc(now: dt.datetime | None = None) -> dt.date:
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.astimezone(dt.timezone.utc).date() - dt.timedelta(days=1)


def days_to_score(
    date: str | None,
    from_date: str | None,
    to_date: str | None,
    now: dt.datetime | None = None,
) -> list[dt.date]:
    """The days a nightly run scores: --date, a --from/--to backfill, or yesterday (UTC)."""
    if from_date or to_date:
        if date or not (from_date and to_date):
            raise UserError("a backfill needs both --from and --to, and no --date")
        return days_between(parse_date(from_date, "--from"), parse_date(to_date, "--to"))
    return [parse_date(date) if date else yesterday_utc(now)]


def partition(root: str, day: dt.date) -> str:
    return f"{root.rstrip('/')}/dt={day.isoformat()}"


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


def run_nightly(job: NightlyJob, echo: Callable[[str], None] = print) -> list[DayOutcome]:
    pinned = registry.resolve(job.model, job.tracking_uri)
    echo(f"model {job.model} -> {pinned.uri}")
    missing = []
    for day in job.days:
        try:
            resolve_files(partition(job.input_root, day))
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
        committed = read_manifest(out)
        if committed and committed.model.uri == pinned.uri and not job.force:
            rows = committed.rows
            echo(f"{day}: already committed with {pinned.uri}; skipped (--force re-scores)")
            outcomes.append(
                DayOutcome(day, "skipped", rows.rows_in, rows.scored, rows.rejected, out)
            )
            continue
        result = run(
            ScoreJob(
                input=partition(job.input_root, day),
                output=out,
                model=pinned.uri,
                tracking_uri=job.tracking_uri,
                options=job.options,
            )
        )
        rows = result.manifest.rows
        echo(
            f"{day}: scored {rows.scored:,} of {rows.rows_in:,} rows "
            f"({rows.rejected:,} rejected) -> {out}"
        )
        outcomes.append(DayOutcome(day, "scored", rows.rows_in, rows.scored, rows.rejected, out))
        faults.point("nightly:day-committed")
    return outcomes
