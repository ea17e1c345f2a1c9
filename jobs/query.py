"""Reading committed output with DuckDB: `query`, `top`, `summary`.

Only committed runs are visible: a partition counts when it has `_SUCCESS` and a manifest, and
only the files its manifest lists are read (so staging folders, debris of a crashed run and, on
object stores, files of a run still being published are never seen). The view `scores` has every
score column plus `dt` (the partition date; NULL for a plain `vaewatch score` output); the view
`rejected` has the rows that were not scored (their input columns as read, `reason`, `dt`;
days whose inputs had different columns are aligned by column name), and `runs` one row per
committed run.

No user text is pasted into SQL: file paths go to DuckDB as a Python list, dates and limits as
bound parameters, and the only generated SQL literal is a partition date that has matched
YYYY-MM-DD.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from vaewatch.model.calibration.drift import findings
from vaewatch.model.contract import TOP_FEATURE_TYPE, Baseline, Manifest
from vaewatch.model.data.inputs import filesystem_for, inside
from vaewatch.model.errors import UserError
from vaewatch.pipeline import storage
from vaewatch.pipeline.committed import DATE, join, match_paths, read_manifest


@dataclass
class Partition:
    day: dt.date | None
    root: str
    manifest: Manifest

    @property
    def files(self) -> list[str]:
        return [join(self.root, f) for f in self.manifest.files]

    @property
    def rejected_files(self) -> list[str]:
        return [join(self.root, f) for f in self.manifest.rejected_files]


def committed_partitions(output: str) -> list[Partition]:
    """The committed runs under `output`: itself, or its dt=YYYY-MM-DD/ partitions."""
    storage.probe(output, "output")
    manifest = read_manifest(output)
    if manifest is not None:
        return [Partition(None, output, manifest)]
    found = []
    for success in sorted(match_paths(join(output, "dt=*", "_SUCCESS"))):
        root = success.rsplit("/", 1)[0]
        name = root.rsplit("/", 1)[1]
        if not DATE.fullmatch(name[3:]):
            continue
        manifest = read_manifest(root)
        if manifest is not None:
            found.append(Partition(dt.date.fromisoformat(name[3:]), root, manifest))
    return found


def connect(output: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views `scores`, `rejected` and `runs` over the committed
    output."""
    partitions = committed_partitions(output)
    if not partitions:
        raise UserError(
            f"no committed vaewatch output under {output!r} (no _SUCCESS + _manifest.json, "
            "neither there nor in dt=YYYY-MM-DD/ folders); run `vaewatch score` or "
            "`vaewatch nightly` first"
        )
    con = duckdb.connect()
    scored, rejected = [], []
    for p in partitions:
        day = f"DATE '{p.day.isoformat()}'" if p.day else "NULL::DATE"  # validated above
        for files, parts in ((p.files, scored), (p.rejected_files, rejected)):
            if files:
                parts.append(_read(con, files).project(f"*, {day} AS dt"))
    if not scored:
        raise UserError(f"the committed output under {output!r} has no scored rows")
    # no rows, this version's top_features type: partitions written before its fields existed
    # read with them null, and queries may name them whatever days they read
    # (and `baseline`, which partitions written before segments lack)
    empty = {"top_features": pa.array([], TOP_FEATURE_TYPE),
             "baseline": pa.array([], pa.dictionary(pa.int32(), pa.string()))}  # fmt: skip
    scored.append(con.from_arrow(pa.table(empty)))
    _union_view(con, "scores", scored)
    _union_view(con, "rejected", rejected)
    found = [findings(p.manifest.drift) for p in partitions]
    rates = [f["anomaly_rate"] or {} for f in found]
    runs = pa.table(
        {
            "dt": pa.array([p.day for p in partitions], pa.date32()),
            "run_id": [p.manifest.run_id for p in partitions],
            "model_uri": [p.manifest.model.uri for p in partitions],
            # data drift: the bulk of the day moved (--fail-on-drift); None: not assessed
            "drift_alarm": pa.array([f["data_drift_alarm"] for f in found], pa.bool_()),
            "drift_reasons": ["; ".join(f["reasons"]) for f in found],
            # the anomaly rate: the day's flagged share, its 95 % interval, the budget 1 - q
            "anomaly_rate_low": pa.array(
                [r.get("interval", [None])[0] for r in rates], pa.float64()
            ),
            "anomaly_rate_high": pa.array(
                [r.get("interval", [None, None])[1] for r in rates], pa.float64()
            ),
            "anomaly_budget": pa.array([r.get("budget") for r in rates], pa.float64()),
        }
    )
    con.register("runs", runs)  # one row per committed run, from its manifest
    # one row per (run, segment with a baseline of its own), from the manifests' drift
    segment_runs = [
        (p.day, value, part)
        for p in partitions
        for value, part in (p.manifest.drift.get("segments") or {}).items()
    ]
    con.register(
        "segment_runs",
        pa.table(
            {
                "dt": pa.array([d for d, _, _ in segment_runs], pa.date32()),
                "baseline": [Baseline.label(v) for _, v, _ in segment_runs],
                "drift_alarm": pa.array([bool(p["alarm"]) for *_, p in segment_runs], pa.bool_()),
                "drift_reasons": ["; ".join(p.get("reasons", [])) for *_, p in segment_runs],
            }
        ),
    )
    return con


def _union_view(con: duckdb.DuckDBPyConnection, name: str, parts: list) -> None:
    """The view `name` over every partition's rows, aligned by column name: days scored with
    other --keep columns or another model's features have other columns (NULL where a day has
    none). With no parts (no rejected files at all), `reason` and `dt` only, no rows."""
    if not parts:
        con.execute(
            f"CREATE VIEW {name} AS SELECT NULL::VARCHAR AS reason, NULL::DATE AS dt LIMIT 0"
        )
        return
    for i, part in enumerate(parts):
        part.create_view(f"_{name}_{i}")
    union = " UNION ALL BY NAME ".join(f"SELECT * FROM _{name}_{i}" for i in range(len(parts)))
    con.execute(f"CREATE VIEW {name} AS {union}")  # generated names only


def _read(con: duckdb.DuckDBPyConnection, files: list[str]) -> duckdb.DuckDBPyRelation:
    """Local files through DuckDB's own Parquet reader; files on an object store through
    pyarrow's filesystem (DuckDB's would need its httpfs extension, downloaded at run time),
    scanned lazily by DuckDB with projections and filters pushed down."""
    if storage.is_local(files[0]):
        return con.read_parquet(files)
    filesystem, _ = filesystem_for(files[0])
    dataset = ds.dataset([inside(f) for f in files], format="parquet", filesystem=filesystem)
    return con.from_arrow(dataset)


def write_result(result: duckdb.DuckDBPyRelation, fmt: str, out: str | None, echo=print) -> None:
    """The result in `fmt`, to `out` when given, else stdout (through `echo`). `json` is one
    JSON document (an array of objects; NaN and infinities are null), `jsonl` one object per
    line; an empty result is an empty document in every format."""
    if fmt == "parquet":
        if not out:
            raise UserError("--format parquet needs --out FILE.parquet")
        result.write_parquet(out)
        echo(f"wrote {out}")
        return
    columns, rows = result.columns, result.fetchall()
    records = [dict(zip(columns, row, strict=True)) for row in rows]
    if fmt == "json":
        text = json.dumps(_jsonable(records), indent=1, allow_nan=False) + "\n"
    elif fmt == "jsonl":
        text = "".join(json.dumps(_jsonable(r), allow_nan=False) + "\n" for r in records)
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        text = format_table(columns, rows) + "\n"
    if out is None:
        echo(text.removesuffix("\n"))
        return
    try:
        with open(out, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    except OSError as err:
        raise UserError(f"cannot write the result to {out!r}: {err.strerror}") from err
    echo(f"wrote {out}")


def _jsonable(value):
    """Plain JSON values: NaN/inf as null, dates and decimals as text, nested lists/structs."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def top_features_text(value) -> str:
    """A top_features list as text, one entry after another, `; ` between them. An explained
    entry (basis "conditional") says what was observed against what the model expected given
    the rest of the record, then the nats: `amount 11428 above (expected 42.19, 5-95%: -63.23
    to 168.1) +374.6`, `merchant_category pawn_shop unusual (p 0.0014; likely grocery,
    restaurant, fuel) +5.4`, `amount missing (p 8.3e-05; expected 42.19) +9.4`. Any other
    entry (and those of partitions written before explanations) is `name +nats`."""
    return "; ".join(_entry_text(v) for v in value or [])


def _entry_text(entry: dict) -> str:
    name, nats = entry["feature"], f"+{entry['contribution']:.1f}"
    direction = entry.get("direction")
    if direction is None:
        return f"{name} {nats}"
    expected, likely = entry.get("expected"), entry.get("likely")
    chance = f"p {entry['probability']:.2g}" if entry.get("probability") is not None else "p ?"
    if direction == "unusually_missing":
        told = f"expected {_short(expected)}" if expected is not None else _likely(likely)
        return f"{name} missing ({chance}; {told}) {nats}"
    word = "" if direction == "within" else " unusual" if expected is None else f" {direction}"
    if expected is None:  # a boolean or a category
        return f"{name} {entry['observed']}{word} ({chance}; {_likely(likely)}) {nats}"
    interval = f"5-95%: {_short(entry['low'])} to {_short(entry['high'])}"
    observed = entry["observed"]  # as the input held it, unless it is long
    value = observed if len(observed) <= 8 else _short(float(observed))
    return f"{name} {value}{word} (expected {_short(expected)}, {interval}) {nats}"


def _likely(likely) -> str:
    return "likely " + ", ".join(likely or [])


def _short(value: float | None) -> str:
    """A number for people: 4 significant digits, none after the point from 10,000 up,
    exponent notation beyond 1e7 or below 1e-3."""
    if value is None or not math.isfinite(value):
        return str(value)
    size = abs(value)
    if value == 0:
        return "0"
    if size >= 1e7 or size < 1e-3:
        return f"{value:.3g}"
    return f"{value:.{max(0, 3 - math.floor(math.log10(size)))}f}"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e6 else f"{value:.3f}"
    if isinstance(value, list) and value and isinstance(value[0], dict) and "feature" in value[0]:
        return top_features_text(value)
    return "" if value is None else str(value)


def format_table(columns: list[str], rows: list[tuple]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def top(con, day: dt.date | None, n: int) -> duckdb.DuckDBPyRelation:
    """The n most anomalous records (of one day if given), with their top features."""
    if day:
        days = [
            d for (d,) in con.sql("SELECT dt FROM runs WHERE dt IS NOT NULL ORDER BY dt").fetchall()
        ]
        if day not in days:
            listed = ", ".join(d.isoformat() for d in days[:5]) + (
                f", ... {days[-1].isoformat()} ({len(days)} days)" if len(days) > 5 else ""
            )
            raise UserError(
                f"no committed partition for {day.isoformat()}; committed days: "
                f"{listed or 'none (a plain `vaewatch score` output has no days: omit --date)'}"
            )
    where = "WHERE dt = $day " if day else ""
    params = {"day": day, "n": n} if day else {"n": n}
    return con.sql(
        "SELECT * EXCLUDE (latent_mean, latent_std, elbo, log_likelihood) FROM scores "
        f"{where}ORDER BY anomaly_score DESC LIMIT $n",
        params=params,
    )


def summary_by_segment(con) -> duckdb.DuckDBPyRelation:
    """Per day and baseline (`baseline`: a segment's own, or the global one and why): rows,
    anomalies, anomaly rate, score quantiles, and the segment's data-drift finding ('-' for the
    global baseline's records: the day's own finding, in `summary`, covers them; partitions
    written before segments have one baseline, NULL)."""
    return con.sql(
        """
        SELECT scores.dt, scores.baseline::VARCHAR AS baseline,
               count(*) AS rows,
               sum(is_anomaly::INTEGER) AS anomalies,
               round(avg(is_anomaly::INTEGER), 5) AS anomaly_rate,
               quantile_cont(anomaly_score, 0.5) AS score_p50,
               quantile_cont(anomaly_score, 0.99) AS score_p99,
               CASE WHEN any_value(segment_runs.drift_alarm) THEN 'ALARM'
                    WHEN any_value(segment_runs.drift_alarm) IS NULL THEN '-'
                    ELSE 'ok' END AS data_drift
        FROM scores LEFT JOIN segment_runs
             ON scores.dt IS NOT DISTINCT FROM segment_runs.dt
            AND scores.baseline::VARCHAR = segment_runs.baseline
        GROUP BY ALL ORDER BY scores.dt, baseline
        """
    )


def summary(con) -> duckdb.DuckDBPyRelation:
    return con.sql(
        """
        WITH days AS (
            SELECT dt,
                   count(*) AS rows,
                   sum(is_anomaly::INTEGER) AS anomalies,
                   round(avg(is_anomaly::INTEGER), 5) AS anomaly_rate,
                   quantile_cont(anomaly_score, 0.5) AS score_p50,
                   quantile_cont(anomaly_score, 0.99) AS score_p99,
                   max(anomaly_score) AS score_max,
                   string_agg(DISTINCT model_version::VARCHAR, ',') AS model_version
            FROM scores GROUP BY dt
        )
        SELECT days.*,
               CASE WHEN runs.anomaly_budget IS NULL THEN '-'
                    ELSE printf('%.2f-%.2f%% (budget %.2f%%)', 100 * runs.anomaly_rate_low,
                                100 * runs.anomaly_rate_high, 100 * runs.anomaly_budget)
                    END AS rate_interval,
               CASE WHEN runs.drift_alarm THEN 'ALARM' WHEN runs.drift_alarm IS NULL THEN '-'
                    ELSE 'ok' END AS data_drift
        FROM days LEFT JOIN runs ON days.dt IS NOT DISTINCT FROM runs.dt
        ORDER BY days.dt
        """
    )
