"""Arrow columns as features: which kind a column is, reading it as numbers or strings, and
the streaming statistics a feature spec is fitted with."""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vaewatch.model.errors import UserError, setting


class FeatureKind(str, enum.Enum):
    CONTINUOUS = "continuous"
    BOOLEAN = "boolean"
    CATEGORICAL = "categorical"


KIND_ORDER = (FeatureKind.CONTINUOUS, FeatureKind.BOOLEAN, FeatureKind.CATEGORICAL)


class SchemaMismatchError(UserError):
    """A column the model needs is missing from the data, or has a type it cannot use."""


def kind_of(arrow_type: pa.DataType) -> FeatureKind | None:
    if pa.types.is_boolean(arrow_type):
        return FeatureKind.BOOLEAN
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return FeatureKind.CONTINUOUS
    if pa.types.is_decimal(arrow_type):
        return FeatureKind.CONTINUOUS
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return FeatureKind.CATEGORICAL
    if pa.types.is_dictionary(arrow_type) and (
        pa.types.is_string(arrow_type.value_type) or pa.types.is_large_string(arrow_type.value_type)
    ):
        return FeatureKind.CATEGORICAL
    return None  # timestamps, binary, nested: never features unless the user says otherwise


def accepts(kind: FeatureKind, arrow_type: pa.DataType) -> bool:
    """Whether a column of `arrow_type` can be read as a feature of `kind`: numbers and booleans
    as continuous, booleans as boolean, anything with a kind as categorical (numbers formatted);
    an all-null column (Arrow's null type) as any kind."""
    if pa.types.is_null(arrow_type):
        return True
    found = kind_of(arrow_type)
    if kind is FeatureKind.CONTINUOUS:
        return found in (FeatureKind.CONTINUOUS, FeatureKind.BOOLEAN)
    if kind is FeatureKind.BOOLEAN:
        return found is FeatureKind.BOOLEAN
    return found is not None


def to_float64(column: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    """A numeric/boolean column as float64 numpy, nulls as NaN. Integers beyond 2^53 round to
    the nearest float64 (a safe cast would refuse the whole batch for one such value; found by
    the hostile-input property test)."""
    try:
        options = pc.CastOptions(pa.float64(), allow_float_truncate=True)
        as_float = pc.cast(column, options=options)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise SchemaMismatchError(
            f"column {name!r} has type {column.type}, which cannot be read as a number: {err}"
        ) from err
    return np.asarray(pc.fill_null(as_float, math.nan).to_numpy(zero_copy_only=False))


def to_string(column: pa.ChunkedArray | pa.Array, name: str) -> pa.Array:
    """A categorical column as a plain string array (dictionary decoded, numbers formatted)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise SchemaMismatchError(
            f"column {name!r} has type {column.type}, which cannot be read as a category: {err}"
        ) from err


class RunningMoments:
    """Streaming mean and variance (Chan et al. parallel update), exact in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        n_b = values.size
        if n_b == 0:
            return
        mean_b = float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    @property
    def std(self) -> float:
        if self.n < 2:
            return 1.0
        std = math.sqrt(self.m2 / self.n)
        return std if std > 0.0 and math.isfinite(std) else 1.0


class Grid:
    """The coarsest power of ten (10^0 down to 10^-6) that every finite value is a multiple of.

    Counts, ages and pixel intensities are integers; prices are whole cents. A Gaussian decoder
    can shrink its variance without limit on values that repeat exactly, and the likelihood of
    such a column then measures float noise, not surprise; the resolution lets the model keep
    its variance at or above the grid's own quantisation noise (r^2 / 12).
    """

    FINEST = -6

    def __init__(self) -> None:
        self.exponent = 0

    def update(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        while self.exponent >= self.FINEST and values.size:
            q = values / 10.0**self.exponent
            if np.all(np.abs(q - np.round(q)) <= 1e-9 * np.maximum(1.0, np.abs(q))):
                return
            self.exponent -= 1

    @property
    def resolution(self) -> float | None:
        return 10.0**self.exponent if self.exponent >= self.FINEST else None


def choose_columns(
    schema: pa.Schema,
    *,
    exclude: Sequence[str],
    features: Sequence[str] | None,
    categorical: Sequence[str],
    continuous: Sequence[str] = (),
) -> list[tuple[str, FeatureKind]]:
    for group, names in (
        ("exclude", exclude),
        ("features", features or ()),
        ("categorical", categorical),
        ("continuous", continuous),
    ):
        missing = [n for n in names if n not in schema.names]
        if missing:
            raise SchemaMismatchError(
                f"{group} names column(s) {missing} that are not in the data; "
                f"the data has columns {schema.names}"
            )
    both = sorted(set(categorical) & set(continuous))
    if both:
        raise SchemaMismatchError(f"column(s) {both} are named both categorical and continuous")
    for name in continuous:
        arrow_type = schema.field(name).type
        if kind_of(arrow_type) is not FeatureKind.CONTINUOUS:
            raise SchemaMismatchError(
                f"column {name!r} is named continuous but has type {arrow_type}, which is not "
                f"numeric; cast it to a number in the data, or drop it from "
                f"{setting('continuous')} (string columns are modelled as categorical)"
            )
    names = list(features) if features is not None else list(schema.names)
    names += [n for n in continuous if n not in names]
    chosen = []
    for name in names:
        if name in exclude:
            continue
        arrow_type = schema.field(name).type
        kind = FeatureKind.CATEGORICAL if name in categorical else kind_of(arrow_type)
        if kind is None:
            if features is not None:
                raise SchemaMismatchError(
                    f"column {name!r} has type {arrow_type}, which vaewatch cannot model; "
                    f"use numeric, boolean or string columns, or drop it from {setting('features')}"
                )
            continue  # silently skipped only when the user did not ask for it
        chosen.append((name, kind))
    if not chosen:
        raise SchemaMismatchError(
            f"no usable feature columns: the data has {schema.names} (types "
            f"{[str(t) for t in schema.types]}); after exclusions nothing numeric, boolean or "
            "string is left"
        )
    return chosen


# A string column with at least this share of distinct values among its non-null training rows
# (and at least IDENTIFIER_MIN_ROWS of them) looks like an identifier or a timestamp as text;
# past ValueCounts' capacity, where the share is unknown, this share within each batch does
IDENTIFIER_SHARE = 0.5
IDENTIFIER_BATCH_SHARE = 0.9
IDENTIFIER_MIN_ROWS = 100
EXCLUDE_FIX = (
    f"Exclude it ({setting('exclude', '{name}')}), or name it the "
    f"{setting('id_column')} if it identifies the record"
)
IDENTIFIER_HARM = (
    "A value not seen in training is out of vocabulary, and on a later day nearly every "
    "record's would be, so every record would score as unusual. " + EXCLUDE_FIX
)


class Increasing:
    """Whether a numeric column rises strictly within every record batch: a sequence number or
    a time. Checked batch by batch (files and batches may come in any order), O(1) memory."""

    def __init__(self) -> None:
        self.rows = 0  # finite values in batches of two or more
        self.always = True

    def update(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if values.size >= 2 and self.always:
            self.always = bool(np.all(values[1:] > values[:-1]))
            self.rows += values.size

    def warn(self, name: str) -> bool:
        """Warn (as `ValueCounts.warn`) when the column rose in every batch, over at least
        IDENTIFIER_MIN_ROWS values: a later day's values lie beyond the training range, so every
        record would score as unusual. True when it warned."""
        if not self.always or self.rows < IDENTIFIER_MIN_ROWS:
            return False
        logging.getLogger(__name__).warning(
            "feature %r rises with every row of the training data (%s values): a record number "
            "or a time? A later day's values would lie beyond the training range, so every "
            "record would score as unusual. %s",
            name, f"{self.rows:,}", EXCLUDE_FIX.format(name=name),
        )  # fmt: skip
        return True


EMPTY_COUNTS = pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})


class ValueCounts:
    """A string column's value counts over a stream of batches, in memory bounded by
    `capacity` values: exact while the column has at most 2 x capacity distinct values (every
    ordinary categorical); beyond that (an identifier as text in a large table) the counts are
    pruned Misra-Gries style, each merge subtracting the (capacity + 1)-th largest count from
    all and dropping what falls to 0, so a value seen more than rows / capacity times is kept
    and any count is short by at most that. Merged with Arrow, not value by value in Python."""

    MERGE_PARTS = 64

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.parts: list[pa.Table] = []
        self.pending = 0  # rows across `parts`
        self.pruned = False  # some counts were cut: `distinct` is then a lower bound
        self.observed = 0  # values counted
        self.batch_distinct = 0  # the sum over batches of each batch's distinct values

    def update(self, values: pa.Array) -> None:
        counted = pc.value_counts(values)
        self.observed += len(values)
        self.batch_distinct += len(counted)
        self.parts.append(
            pa.table({"value": counted.field("values"), "count": counted.field("counts")})
        )
        self.pending += len(counted)
        if self.pending > 2 * self.capacity or len(self.parts) > self.MERGE_PARTS:
            self._merge()

    def _merge(self) -> pa.Table:
        if len(self.parts) == 1:
            table = self.parts[0]
        elif not self.parts:
            table = EMPTY_COUNTS
        else:
            merged = pa.concat_tables(self.parts).group_by("value").aggregate([("count", "sum")])
            table = merged.rename_columns(["value", "count"])
        if table.num_rows > 2 * self.capacity:
            counts = table["count"].to_numpy()
            cut = np.partition(counts, counts.size - self.capacity - 1)[-self.capacity - 1]
            kept = table.filter(pa.array(counts > cut))
            table = kept.set_column(1, "count", pc.subtract(kept["count"], cut))
            self.pruned = True
        self.parts, self.pending = [table], table.num_rows
        return table

    def items(self) -> list[tuple[str, int]]:
        table = self._merge()
        return list(zip(table["value"].to_pylist(), table["count"].to_pylist(), strict=True))

    @property
    def distinct(self) -> int:
        """Distinct values seen (a lower bound once pruned)."""
        return self._merge().num_rows

    def warn(self, name: str) -> bool:
        """Warn (on the `vaewatch` logger, so it shows under -q) when the column looks like an
        identifier: half or more of its values distinct (past the capacity, 90 % distinct
        within the batches). True when it warned."""
        log = logging.getLogger(__name__)
        if self.observed < IDENTIFIER_MIN_ROWS:
            return False
        harm = IDENTIFIER_HARM.format(name=name)
        if not self.pruned:
            distinct = self.distinct
            if distinct < IDENTIFIER_SHARE * self.observed:
                return False
            share = 100.0 * distinct / self.observed
            log.warning(
                "feature %r has %s distinct values in its %s non-null training rows (%.0f%%): "
                "an identifier, or a timestamp stored as text? %s",
                name, f"{distinct:,}", f"{self.observed:,}", share, harm,
            )  # fmt: skip
            return True
        share = self.batch_distinct / self.observed
        if share < IDENTIFIER_BATCH_SHARE:
            return False
        log.warning(
            "feature %r has more than %s distinct values in its %s non-null training rows, "
            "%.0f%% distinct within each batch: an identifier, or a timestamp stored as text? %s",
            name, f"{2 * self.capacity:,}", f"{self.observed:,}", 100.0 * share, harm,
        )  # fmt: skip
        return True
