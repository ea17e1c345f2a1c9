"""Synthetic card-transaction data with injected anomalies of known kinds.

Normal records follow a small causal story, so there is structure for a model to learn:
a merchant category sets the typical amount and the chance of an online purchase; distance
and travel time are tied by a speed; basket size grows with amount; some sensor-like fields are
missing at random. Anomalies break one piece of that story each:

- ``out_of_range``: an amount orders of magnitude above its category's range
- ``broken_correlation``: travel time inconsistent with distance
- ``rare_category``: a merchant category never seen in normal data
- ``impossible_combination``: an in-person purchase at an online-only merchant, at an odd hour

The `anomaly_kind` column names the kind ("" for normal rows) and `is_injected_anomaly` is the
label; both, with `record_id` and `event_time`, are not features.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa

CATEGORIES = ["grocery", "fuel", "restaurant", "travel", "electronics", "streaming", "pharmacy"]
_LOG_AMOUNT = np.array([3.5, 4.0, 3.2, 6.0, 5.5, 2.5, 3.0])  # log-euro mean per category
_P_ONLINE = np.array([0.1, 0.0, 0.2, 0.6, 0.5, 1.0, 0.15])
_CATEGORY_WEIGHTS = np.array([0.3, 0.15, 0.2, 0.05, 0.08, 0.12, 0.1])
LABEL_COLUMNS = ["record_id", "event_time", "is_injected_anomaly", "anomaly_kind"]
ANOMALY_KINDS = ["out_of_range", "broken_correlation", "rare_category", "impossible_combination"]
# the columns each kind changes (`transactions`): what top_features should name first
CHANGED_COLUMNS = {
    "out_of_range": ("amount",),
    "broken_correlation": ("is_online", "distance_km", "travel_min"),
    "rare_category": ("merchant_category",),
    "impossible_combination": (
        "merchant_category",
        "is_online",
        "distance_km",
        "travel_min",
        "hour",
    ),
}


def transactions(
    n_rows: int,
    *,
    anomaly_rate: float = 0.02,
    seed: int = 0,
    day: dt.date = dt.date(2026, 1, 1),
    first_id: int = 0,
) -> pa.Table:
    """`n_rows` transactions on `day`, a fraction `anomaly_rate` of them injected anomalies."""
    rng = np.random.default_rng(seed)
    category_index = rng.choice(
        len(CATEGORIES), size=n_rows, p=_CATEGORY_WEIGHTS / _CATEGORY_WEIGHTS.sum()
    )
    category = np.array(CATEGORIES, dtype=object)[category_index]
    amount = np.exp(_LOG_AMOUNT[category_index] + rng.normal(0.0, 0.4, n_rows))
    is_online = rng.random(n_rows) < _P_ONLINE[category_index]
    hour = np.where(is_online, rng.normal(20.0, 3.0, n_rows), rng.normal(13.0, 3.0, n_rows)) % 24
    n_items = np.maximum(1, rng.poisson(1.0 + amount / 40.0)).astype(np.int64)
    distance_km = np.where(is_online, 0.0, rng.gamma(2.0, 3.0, n_rows))
    speed_kmh = rng.normal(30.0, 3.0, n_rows)
    travel_min = np.where(
        is_online, 0.0, distance_km / speed_kmh * 60.0 + rng.normal(0, 1.0, n_rows)
    )
    latency_ms = rng.lognormal(4.0, 0.3, n_rows)
    latency_ms[rng.random(n_rows) < 0.05] = np.nan  # sensor gaps: missing at random
    travel_missing = rng.random(n_rows) < 0.03

    kind = np.array([""] * n_rows, dtype=object)
    n_anomalies = int(round(anomaly_rate * n_rows))
    chosen = rng.choice(n_rows, size=n_anomalies, replace=False)
    for i, row in enumerate(chosen):
        k = ANOMALY_KINDS[i % len(ANOMALY_KINDS)]
        kind[row] = k
        if k == "out_of_range":
            amount[row] *= rng.uniform(50.0, 500.0)
        elif k == "broken_correlation":
            is_online[row] = False
            distance_km[row] = rng.uniform(30.0, 80.0)
            travel_min[row] = rng.uniform(1.0, 5.0)
            travel_missing[row] = False
        elif k == "rare_category":
            category[row] = rng.choice(["casino", "crypto_exchange", "pawn_shop"])
        else:
            category[row] = "streaming"
            is_online[row] = False
            distance_km[row] = rng.gamma(2.0, 3.0)
            travel_min[row] = distance_km[row] / 30.0 * 60.0
            hour[row] = rng.uniform(2.0, 5.0)

    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc)
    seconds = np.sort(rng.integers(0, 86_400, n_rows))
    travel = pa.array(travel_min, mask=travel_missing)
    return pa.table(
        {
            "record_id": pa.array(np.arange(first_id, first_id + n_rows, dtype=np.int64)),
            "event_time": pa.array(
                int(start.timestamp()) * 1_000_000 + seconds * 1_000_000,
                type=pa.timestamp("us", tz="UTC"),
            ),
            "merchant_category": pa.array(category.tolist(), type=pa.string()).dictionary_encode(),
            "amount": pa.array(np.round(amount, 2)),
            "n_items": pa.array(n_items),
            "is_online": pa.array(is_online),
            "hour": pa.array(hour),
            "distance_km": pa.array(distance_km),
            "travel_min": travel,
            "latency_ms": pa.array(latency_ms, from_pandas=True),
            "is_injected_anomaly": pa.array(kind != ""),
            "anomaly_kind": pa.array(kind.tolist(), type=pa.string()),
        }
    )


# ------------------------------------------------------------------ segments
# `segmented`: stores of three kinds. A "kiosk" sells few, alike items (each reading within a
# few percent of its usual value); a "market" sells varied ones (readings spread tenfold
# wider); an "outlet" is rare. Every record's readings are tied to one shared level, so the
# model has structure to learn; an anomaly moves one reading by SEGMENT_SHIFT of its own
# segment's spread, which a kiosk's normal records never do but a market's often come close to.
SEGMENTS = {"kiosk": (0.1, 0.48), "market": (1.0, 0.48), "outlet": (0.5, 0.04)}  # spread, share
SEGMENT_READINGS = 4
SEGMENT_SHIFT = 5.0


def segmented(n_rows: int, *, anomaly_rate: float = 0.0, seed: int = 0) -> pa.Table:
    """`n_rows` records of SEGMENTS: `store`, readings r0..r3 (a shared level plus noise of the
    store's spread), `is_injected_anomaly` (one reading moved by SEGMENT_SHIFT spreads)."""
    rng = np.random.default_rng(seed)
    names = list(SEGMENTS)
    spread = np.array([SEGMENTS[s][0] for s in names])
    share = np.array([SEGMENTS[s][1] for s in names])
    store = rng.choice(len(names), size=n_rows, p=share / share.sum())
    level = rng.normal(0.0, 1.0, n_rows)
    noise = rng.normal(0.0, 1.0, (n_rows, SEGMENT_READINGS)) * spread[store, None]
    readings = 10.0 + level[:, None] + noise
    anomalous = rng.random(n_rows) < anomaly_rate
    which = rng.integers(0, SEGMENT_READINGS, n_rows)
    sign = np.where(rng.random(n_rows) < 0.5, -1.0, 1.0)
    rows = np.flatnonzero(anomalous)
    readings[rows, which[rows]] += sign[rows] * SEGMENT_SHIFT * spread[store[rows]]
    columns = {
        "record_id": pa.array(np.arange(n_rows, dtype=np.int64)),
        "store": pa.array(np.array(names, dtype=object)[store].tolist(), pa.string()),
    }
    columns.update({f"r{j}": pa.array(readings[:, j]) for j in range(SEGMENT_READINGS)})
    columns["is_injected_anomaly"] = pa.array(anomalous)
    return pa.table(columns)
