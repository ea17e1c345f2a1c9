"""FeatureSpec: fitting, encoding, JSON round trip, schema errors."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from model.features import FeatureKind, FeatureSpec, RowProblem, SchemaMismatchError

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
    with pytest.raises(SchemaMismatchError, match=r"'amount'.*missing"):
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


def test_format_version_is_checked():
    spec = FeatureSpec.fit(pa.table({"v": [1.0, 2.0]}))
    payload = spec.to_json() | {"format_version": 99}
    with pytest.raises(ValueError, match="format_version 99"):
        FeatureSpec.from_json(payload)
