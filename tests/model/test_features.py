"""FeatureSpec: fitting, encoding, JSON round trip, schema errors."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from vaewatch.model.data.features import FeatureKind, FeatureSpec, RowProblem, SchemaMismatchError

LABELS = ["record_id", "is_injected_anomaly", "anomaly_kind"]


def test_kinds_layout_and_skipped_columns(transactions_table):
    spec = FeatureSpec.fit(transactions_table, exclude=LABELS)
    kinds = [f.kind for f in spec.features]
    assert kinds == sorted(
        kinds, key=[FeatureKind.CONTINUOUS, FeatureKind.BOOLEAN, FeatureKind.CATEGORICAL].index
    )
    assert "event_time" not in spec.names()  # timestamps are never features by default
    assert not set(LABELS) & set(spec.names())
    assert spec.names(FeatureKind.BOOLEAN) == ["is_online"]
    assert spec.names(FeatureKind.CATEGORICAL) == ["merchant_category"]


def test_standardisation_matches_numpy_with_nulls_and_streaming():
    rng = np.random.default_rng(0)
    values = rng.normal(5.0, 3.0, 10_001)
    values[::7] = np.nan
    table = pa.table({"v": pa.array(values, from_pandas=False)})
    whole = FeatureSpec.fit(table)
    streamed = FeatureSpec.fit(iter(table.to_batches(max_chunksize=333)))
    finite = values[~np.isnan(values)]
    for spec in (whole, streamed):
        (f,) = spec.features
        assert f.mean == pytest.approx(finite.mean(), rel=1e-12)
        assert f.std == pytest.approx(finite.std(), rel=1e-12)
    enc = whole.encode(table)
    np.testing.assert_array_equal(enc.mask[:, 0].numpy(), ~np.isnan(values))
    expected = (finite - finite.mean()) / finite.std()
    np.testing.assert_allclose(enc.x[enc.mask[:, 0], 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (enc.x[~enc.mask[:, 0], 0] == 0).all()


def test_vocabulary_by_frequency_with_cap_and_oov():
    table = pa.table({"c": ["b", "a", "b", "c", "b", "a", None, "d"]})
    spec = FeatureSpec.fit(table, max_categories=2)
    assert spec.features[0].vocabulary == ["b", "a"]  # most frequent first; c and d -> OOV
    enc = spec.encode(pa.table({"c": ["a", "b", "c", "never-seen", None]}))
    assert enc.x[:, 0].tolist() == [1.0, 0.0, 2.0, 2.0, 0.0]
    assert enc.mask[:, 0].tolist() == [True, True, True, True, False]


def test_dictionary_and_plain_strings_encode_identically():
    plain = pa.table({"c": ["x", "y", None, "x", "z"]})
    encoded = pa.table({"c": plain.column("c").combine_chunks().dictionary_encode()})
    spec = FeatureSpec.fit(plain)
    a, b = spec.encode(plain), spec.encode(encoded)
    assert a.x.equal(b.x) and a.mask.equal(b.mask)


def test_forced_categorical_integer_column():
    table = pa.table({"zip": pa.array([1000, 2000, 1000, None], type=pa.int32())})
    spec = FeatureSpec.fit(table, categorical=["zip"])
    assert spec.features[0].kind is FeatureKind.CATEGORICAL
    assert spec.features[0].vocabulary == ["1000", "2000"]


def test_json_round_trip_is_exact(transactions_table):
    spec = FeatureSpec.fit(transactions_table, exclude=LABELS)
    again = FeatureSpec.loads(spec.dumps())
    assert again == spec
    assert [f.mean for f in again.features] == [f.mean for f in spec.features]  # bit-exact floats
    a, b = spec.encode(transactions_table), again.encode(transactions_table)
    assert a.x.equal(b.x) and a.mask.equal(b.mask)


def test_row_problems_inf_and_all_missing():
    table = pa.table(
        {
            "v": [1.0, math.inf, None, -math.inf, 2.0],
            "c": ["a", "b", None, "a", None],
        }
    )
    spec = FeatureSpec.fit(table)
    enc = spec.encode(table)
    assert enc.problems.tolist() == [
        RowProblem.OK,
        RowProblem.NON_FINITE,
        RowProblem.ALL_MISSING,
        RowProblem.NON_FINITE,
        RowProblem.OK,
    ]
    assert RowProblem.NON_FINITE.reason == "non_finite_value"


def test_values_beyond_float32_reach_are_out_of_range():
    spec = FeatureSpec.fit(pa.table({"v": [0.0, 1.0, 2.0, 3.0]}))  # mean 1.5, std ~1.118
    limit = 1.5 + 1e15 * spec.features[0].std
    enc = spec.encode(pa.table({"v": [1e308, -1e308, limit * 0.99, limit * 1.01, 1e9]}))
    assert enc.problems.tolist() == [
        RowProblem.OUT_OF_RANGE,
        RowProblem.OUT_OF_RANGE,
        RowProblem.OK,
        RowProblem.OUT_OF_RANGE,
        RowProblem.OK,
    ]
    assert torch.isfinite(enc.x).all() and RowProblem.OUT_OF_RANGE.reason == "value_out_of_range"


def test_schema_errors_name_column_and_types(transactions_table):
    spec = FeatureSpec.fit(transactions_table, exclude=LABELS)
    with pytest.raises(SchemaMismatchError, match=r"'amount'.*missing.*`exclude=amount`"):
        spec.encode(transactions_table.drop_columns(["amount"]))
    wrong = transactions_table.set_column(
        transactions_table.schema.get_field_index("amount"),
        "amount",
        pa.array(["1"] * len(transactions_table)),
    )
    with pytest.raises(
        SchemaMismatchError, match=r"'amount' expects a continuous column.*type string"
    ):
        spec.encode(wrong)
    with pytest.raises(SchemaMismatchError, match=r"not in the data"):
        FeatureSpec.fit(transactions_table, exclude=["no_such_column"])


def test_all_null_column_is_a_clear_error():
    table = pa.table({"v": [1.0, 2.0], "empty": pa.nulls(2, pa.float64())})
    with pytest.raises(ValueError, match=r"\['empty'\] have no non-null values"):
        FeatureSpec.fit(table)


def test_grid_resolution_and_quantisation_variance():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, 1000).astype(np.float64)
    table = pa.table(
        {
            "count": pa.array(counts.astype(np.int64)),  # integers -> 1
            "pixel": pa.array(counts * 2.0),  # integer-valued floats -> 1
            "price": pa.array(np.round(rng.uniform(0, 100, 1000), 2)),  # cents -> 0.01
            "ratio": pa.array(rng.normal(size=1000)),  # on no grid -> None
            "big": pa.array(counts * 1e6),  # multiples of 1e6 still report 1 (the cap)
            "flag": pa.array(counts > 2),
        }
    )
    spec = FeatureSpec.fit(table)
    res = {f.name: f.resolution for f in spec.features if f.kind is FeatureKind.CONTINUOUS}
    assert res == {"count": 1.0, "pixel": 1.0, "price": 0.01, "ratio": None, "big": 1.0}
    std = {f.name: f.std for f in spec.features if f.kind is FeatureKind.CONTINUOUS}
    expected = {
        "count": (1.0 / std["count"]) ** 2 / 12,
        "pixel": (1.0 / std["pixel"]) ** 2 / 12,
        "price": (0.01 / std["price"]) ** 2 / 12,
        "ratio": 0.0,
        "big": (1.0 / std["big"]) ** 2 / 12,
    }
    names = spec.names(FeatureKind.CONTINUOUS)
    assert spec.quantisation_variance == pytest.approx([expected[n] for n in names], rel=1e-12)
    # a constant integer column (std falls back to 1) is capped at the marginal's variance
    const = FeatureSpec.fit(pa.table({"c": pa.array([3, 3, 3])}))
    assert const.quantisation_variance == [pytest.approx(1 / 12)]
    tiny = FeatureSpec.fit(pa.table({"c": pa.array([0.0, 1.0] * 10)}))  # std 0.5 -> (2^2)/12
    assert tiny.quantisation_variance == [pytest.approx(4 / 12)]
    wide = FeatureSpec.fit(pa.table({"c": pa.array([0.0, 0.0, 0.0, 1.0] + [0.0] * 96)}))
    assert wide.quantisation_variance == [1.0]  # (1 / 0.0995)^2 / 12 > 1: capped
    assert FeatureSpec.loads(spec.dumps()) == spec


def test_resolution_is_found_across_batches():
    batches = [
        pa.RecordBatch.from_pydict({"x": pa.array([1.0, 2.0, 3.0])}),
        pa.RecordBatch.from_pydict({"x": pa.array([1.5, 2.25])}),  # 0.25 is not a multiple of 0.1
        pa.RecordBatch.from_pydict({"x": pa.array([math.nan, 4.0])}),
    ]
    assert FeatureSpec.fit(iter(batches)).features[0].resolution == 0.01
    batches[1] = pa.RecordBatch.from_pydict({"x": pa.array([1.5, 2.123456789])})
    assert FeatureSpec.fit(iter(batches)).features[0].resolution is None


def test_an_identifier_like_string_column_is_warned_about(caplog):
    """Half or more of the non-null rows distinct (from 100 rows): a warning naming the column,
    its counts and the fix. Ordinary categories, and small tables, stay quiet."""
    n = 400
    rng = np.random.default_rng(0)
    table = pa.table({
        "user": [f"u{i}" for i in range(n)],  # every value new
        "half": [f"h{i // 2}" if i < 380 else None for i in range(n)],  # 190 of 380: half
        "below": [f"b{i // 2}" if i < 398 else "b0" for i in range(n)],  # 199 of 400
        "city": rng.choice(["a", "b", "c"], n),
        "amount": rng.normal(size=n),
    })  # fmt: skip
    with caplog.at_level("WARNING", logger="vaewatch"):
        FeatureSpec.fit(table)
    warned = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert len(warned) == 2
    assert warned[0].startswith("feature 'half' has 190 distinct values in its 380 non-null")
    assert warned[1].startswith("feature 'user' has 400 distinct values in its 400 non-null")
    assert "(100%)" in warned[1] and "`exclude=user`" in warned[1]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vaewatch"):
        FeatureSpec.fit(table.slice(0, 99))  # too few rows to tell
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_column_that_rises_with_every_row_is_warned_about(caplog):
    """A record number or a time (rising within every batch, whatever the batches' order) is
    warned about; the same values shuffled, a constant stretch, or too few rows are not."""
    rng = np.random.default_rng(0)
    ids = np.arange(1_000, 1_300, dtype=np.int64)
    stamps = 1.7e9 + np.cumsum(rng.exponential(3.0, 300))
    flat = ids.copy()
    flat[10] = flat[9]  # one repeat: not strictly rising
    table = pa.table({
        "seq": ids, "stamp": stamps, "shuffled": rng.permutation(ids), "flat": flat,
        "amount": rng.normal(size=300),
    })  # fmt: skip
    batches = table.to_batches(max_chunksize=100)
    with caplog.at_level("WARNING", logger="vaewatch"):
        FeatureSpec.fit(iter([batches[2], batches[0], batches[1]]))  # batches out of order
    warned = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert [m.split(" rises")[0] for m in warned] == ["feature 'seq'", "feature 'stamp'"]
    assert "(300 values)" in warned[0] and "`exclude=seq`" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="vaewatch"):
        FeatureSpec.fit(table.slice(0, 99))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_value_counts_are_exact_within_capacity_and_bounded_beyond(caplog):
    """Exact counts up to twice the capacity; past it, memory stays within that and every value
    seen more than rows / capacity times is kept, its count short by at most that (Misra and
    Gries 1982)."""
    from collections import Counter

    from vaewatch.model.data.columns import ValueCounts

    rng = np.random.default_rng(0)
    values = [f"v{v}" for v in rng.zipf(1.5, 5_000) % 30]
    exact = ValueCounts(capacity=100)
    for start in range(0, len(values), 700):
        exact.update(pa.array(values[start : start + 700]))
    assert not exact.pruned and dict(exact.items()) == Counter(values)

    heavy = [f"h{j}" for j in range(5)] * 400  # 2,000 rows, 400 each
    unique = [f"u{j}" for j in range(8_000)]
    stream = list(rng.permutation(np.array(heavy + unique, dtype=object)))
    capacity, n = 10, len(stream)
    counts = ValueCounts(capacity)
    for start in range(0, n, 250):
        counts.update(pa.array(stream[start : start + 250]))
        assert counts.pending <= 2 * capacity + 250
    kept = dict(counts.items())
    assert counts.pruned and len(kept) <= 2 * capacity
    for j in range(5):
        assert 400 - n / capacity <= kept[f"h{j}"] <= 400
    assert not counts.warn("mixed")  # a fifth of each batch repeats five values

    ids = ValueCounts(capacity)
    for start in range(0, 8_000, 250):
        ids.update(pa.array(unique[start : start + 250]))
    with caplog.at_level("WARNING", logger="vaewatch"):
        assert ids.warn("user")
    assert "more than 20 distinct values in its 8,000 non-null training rows, 100%" in (
        caplog.records[-1].getMessage()
    )
