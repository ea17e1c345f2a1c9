"""Which days a run covers: the dt=YYYY-MM-DD partitions of the layout, `--date`, a
`--from`/`--to` backfill, `--catch-up` (every input partition up to yesterday), or yesterday
(UTC). Light on purpose: `top --date` and `nightly`'s argument checks need it without loading
the scoring path.
"""

from __future__ import annotations

import datetime as dt

import pyarrow.fs as pafs

from vaewatch.model.data.inputs import filesystem_for, storage_failure
from vaewatch.model.errors import UserError
from vaewatch.pipeline.committed import DATE

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
    *,
    catch_up: bool = False,
    input_root: str = "",
) -> list[dt.date]:
    """The days a nightly run scores: --date, a --from/--to backfill, --catch-up (every input
    partition from --from up to yesterday), or yesterday (UTC)."""
    if catch_up:
        if date or to_date:
            raise UserError("--catch-up runs up to yesterday: give it no --date or --to")
        return catch_up_days(input_root, from_date, now)
    if from_date or to_date:
        if date or not (from_date and to_date):
            raise UserError("a backfill needs both --from and --to, and no --date")
        return days_between(parse_date(from_date, "--from"), parse_date(to_date, "--to"))
    return [parse_date(date) if date else yesterday_utc(now)]


def partition(root: str, day: dt.date) -> str:
    return f"{root.rstrip('/')}/dt={day.isoformat()}"


def input_days(input_root: str) -> list[dt.date]:
    """The dt=YYYY-MM-DD partitions under `input_root`, oldest first."""
    filesystem, base = filesystem_for(input_root)
    try:
        entries = filesystem.get_file_info(pafs.FileSelector(base, recursive=False))
    except FileNotFoundError as err:
        raise UserError(f"--input-root {input_root!r} does not exist") from err
    except OSError as err:
        raise storage_failure(input_root, "--input-root", err) from err
    names = [e.base_name for e in entries if e.type == pafs.FileType.Directory]
    return sorted(
        dt.date.fromisoformat(n[3:]) for n in names if n.startswith("dt=") and DATE.fullmatch(n[3:])
    )


def catch_up_days(
    input_root: str, from_date: str | None, now: dt.datetime | None = None
) -> list[dt.date]:
    """Every input partition from --from (default: the earliest) up to yesterday, oldest first;
    run_nightly then skips the days already committed with the same model and inputs."""
    first = parse_date(from_date, "--from") if from_date else None
    last = yesterday_utc(now)
    days = [d for d in input_days(input_root) if d <= last and (first is None or d >= first)]
    if not days:
        raise UserError(
            f"--catch-up found no dt=YYYY-MM-DD partition under {input_root!r} up to {last}"
            + (f" from {first}" if first else "")
        )
    return days
