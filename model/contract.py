"""The output contract, defined once: what a scoring run writes and what readers may rely on.

- `score_schema(d)`: the score columns of a scored row, in order (kept input columns go first);
- `rejected_schema(input_schema)`: a rejected row is its input columns plus `reason`;
- `RejectReason`: every code the `reason` column (Parquet and the pyfunc alike) can hold;
- `MetadataKey` / `parquet_metadata`: the key-value metadata of every written Parquet file;
- `Manifest`: the typed `_manifest.json` of a committed run, written by the commit and read by
  nightly, query, summary and report.

Only pyarrow here: the scorer (model/), the pipeline and the CLI all import this module.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields, replace

import pyarrow as pa

REASON_COLUMN = "reason"  # the rejected side's column, in Parquet and in the pyfunc's output

# One entry per feature named as making the record unusual, largest contribution first. The
# fields after `basis` say, in the data's own units, what the model expected of the feature
# given the record's other columns (model/estimation/explanations.py); they are filled where
# `basis` is "conditional" and null otherwise, `basis` saying why.
TOP_FEATURE_FIELDS = [
    pa.field("feature", pa.string()),
    pa.field("contribution", pa.float64()),  # nats above the feature's usual value (baseline)
    pa.field("basis", pa.string()),  # Basis: how `contribution` was measured
    pa.field("direction", pa.string()),  # Direction
    pa.field("observed", pa.string()),  # the record's value as text; null where missing
    pa.field("expected", pa.float64()),  # a number: the median of p(x_j | x_-j)
    pa.field("low", pa.float64()),  # a number: 5 % quantile of p(x_j | x_-j)
    pa.field("high", pa.float64()),  # a number: 95 % quantile
    # a class: p(observed class | x_-j); a number: the tail beyond the observed value on its
    # side of the median; a missing value: p(missing | x_-j)
    pa.field("probability", pa.float64()),
    pa.field("likely", pa.list_(pa.string())),  # a class: the likeliest classes, likeliest first
]
TOP_FEATURE_TYPE = pa.list_(pa.struct(TOP_FEATURE_FIELDS))
# what partitions written by 0.2.0 and before hold: readers fill in the other fields as null
TOP_FEATURE_TYPE_0_2 = pa.list_(pa.struct(TOP_FEATURE_FIELDS[:2]))


class Basis(str, enum.Enum):
    """How a top_features entry's `contribution` was measured, and so whether its expectation
    fields are filled."""

    # -log p(x_j | x_-j) over its calibration median: the expectation fields are filled
    CONDITIONAL = "conditional"
    # the others are -log p(x_j | z) over its median, read under the posterior of the whole
    # record (model/estimation/attribution.py), and say why the conditional was not computed:
    NOT_FLAGGED = "not_flagged"  # only flagged records are explained
    # flagged past the batch's explanation budget (EXPLAINED_SHARE of its records; the most
    # anomalous of the flagged get it)
    OVER_BUDGET = "over_budget"
    OTHER_K = "other_k"  # scored at another K than the model's calibration (--k)
    NOT_IN_MODEL = "not_in_model"  # the model holds no conditional baseline


class Baseline(str, enum.Enum):
    """Which calibration judged a record (its threshold, percentile and drift reference): the
    `baseline` column. A model trained with per-segment baselines (`train --segment-column`,
    model/calibration/segments.py) judges a record of a segment with its own baseline,
    `segment=VALUE` (`label`); every other record by the global one, saying why."""

    GLOBAL = "global"  # a model without segments
    UNSEEN_SEGMENT = "global:unseen_segment"  # a value outside the model's vocabulary
    NULL_SEGMENT = "global:null_segment"  # the segment column is null
    SMALL_SEGMENT = "global:small_segment"  # too few validation rows for a baseline of its own

    @staticmethod
    def label(value: str) -> str:
        return f"segment={value}"


class Direction(str, enum.Enum):
    """What is unusual about an explained feature, against p(x_j | x_-j)."""

    ABOVE = "above"  # a number above the 95 % quantile
    BELOW = "below"  # a number below the 5 % quantile
    # inside the 5-95 % range (a number) or among the classes that hold 90 % of the probability:
    # the value is plausible given the rest; its contribution comes from how it combines with them
    WITHIN = "within"
    UNUSUAL_CATEGORY = "unusual_category"  # a category outside that 90 % set
    UNUSUAL_VALUE = "unusual_value"  # a boolean outside it
    UNUSUALLY_MISSING = "unusually_missing"  # missing where the rest makes that unlikely


class RejectReason(str, enum.Enum):
    """Why a row was not scored. The value is what the `reason` column holds (a schema or cast
    problem appends the library's explanation after `: `)."""

    NON_FINITE_VALUE = "non_finite_value"  # a continuous value is +inf or -inf
    ALL_FEATURES_MISSING = "all_features_missing"  # every model feature is null/NaN
    VALUE_OUT_OF_RANGE = "value_out_of_range"  # beyond what float32 can score (1e15 stds)
    NON_FINITE_SCORE = "non_finite_score"  # the model returned NaN/inf for the row
    SCHEMA_MISMATCH = "schema_mismatch"  # its file's columns cannot be read as the model's types
    KEEP_COLUMN_NOT_CASTABLE = "keep_column_not_castable"  # a kept value does not fit the output

    def with_detail(self, detail: object) -> str:
        return f"{self.value}: {detail}"


def score_schema(latent_dim: int) -> pa.Schema:
    """The score columns of the output contract, in order (pass-through columns come first)."""
    return pa.schema(
        [
            pa.field("elbo", pa.float64()),
            pa.field("log_likelihood", pa.float64()),
            pa.field("log_likelihood_se", pa.float64()),
            pa.field("anomaly_score", pa.float64()),
            pa.field("score_percentile", pa.float64()),
            pa.field("is_anomaly", pa.bool_()),
            pa.field("latent_mean", pa.list_(pa.float32(), latent_dim)),
            pa.field("latent_std", pa.list_(pa.float32(), latent_dim)),
            pa.field("top_features", TOP_FEATURE_TYPE),
            pa.field("baseline", pa.dictionary(pa.int32(), pa.string())),  # Baseline
            pa.field("model_version", pa.dictionary(pa.int32(), pa.string())),
        ]
    )


SCORE_COLUMNS = tuple(score_schema(1).names)


def spark_result_type() -> str:
    """The pyfunc's output (the score columns, then `reason`) as a Spark DDL struct: the
    `result_type` of `mlflow.pyfunc.spark_udf` for a vaewatch model."""
    fields = [*score_schema(1), pa.field(REASON_COLUMN, pa.string())]
    return "struct<" + ", ".join(f"{f.name}: {_spark(f.type)}" for f in fields) + ">"


def _spark(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _spark(t.value_type)
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
        return f"array<{_spark(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(f"{f.name}: {_spark(f.type)}" for f in t) + ">"
    names = {pa.float64(): "double", pa.float32(): "float", pa.bool_(): "boolean",
             pa.string(): "string"}  # fmt: skip
    return names[t]


def rejected_schema(input_schema: pa.Schema) -> pa.Schema:
    """A rejected row: its input columns as read, then why it was not scored."""
    return pa.schema([*input_schema, pa.field(REASON_COLUMN, pa.string())])


class MetadataKey(str, enum.Enum):
    """Parquet key-value metadata of every scored and rejected file."""

    MODEL_URI = "vaewatch.model_uri"
    MODEL_REQUESTED = "vaewatch.model_requested"
    MODEL_VERSION = "vaewatch.model_version"
    K = "vaewatch.k"
    SEED = "vaewatch.seed"
    THRESHOLD_QUANTILE = "vaewatch.threshold_quantile"
    THRESHOLD = "vaewatch.threshold"
    FLAG_RULE = "vaewatch.flag_rule"
    VERSION = "vaewatch.version"
    RUN_ID = "vaewatch.run_id"


# ------------------------------------------------------------------------------ the manifest
@dataclass(frozen=True)
class ManifestModel:
    requested: str  # what the user asked for: models:/NAME@ALIAS, a folder, ...
    uri: str  # the pinned version: models:/NAME/VERSION (or the folder)
    name: str  # "" for a local folder
    version: str  # "" for a local folder
    run_id: str  # the MLflow run that trained it ("" for a local folder)


@dataclass(frozen=True)
class ManifestInput:
    path: str
    size: int  # bytes
    modified: str  # ISO-8601, "" when the filesystem reports none


@dataclass(frozen=True)
class RowCounts:
    rows_in: int  # "in" in the JSON
    scored: int | None = None  # None until the run is committed
    rejected: int | None = None

    def to_json(self) -> dict:
        out = {"in": self.rows_in}
        if self.scored is not None:
            out.update(scored=self.scored, rejected=self.rejected)
        return out

    @classmethod
    def from_json(cls, d: dict) -> RowCounts:
        return cls(rows_in=int(d["in"]), scored=d.get("scored"), rejected=d.get("rejected"))


@dataclass(frozen=True)
class Manifest:
    """`_manifest.json`: what a run read, what it scored with, what it committed. A reader
    trusts only the files listed here (on object stores a plain listing can show two runs)."""

    run_id: str
    model: ManifestModel
    inputs: tuple[ManifestInput, ...]
    rows: RowCounts
    k: int
    seed: int
    threshold_quantile: float
    threshold: float
    batch_size: int
    runner: str
    workers: int
    keep: tuple[str, ...]
    started: str  # ISO-8601, UTC
    vaewatch_version: str
    precision: str = "fp32"  # the scoring matmuls' precision option (auto | fp32 | bf16)
    # how is_anomaly was decided (model/calibration/scores.py): "any" (the total score or one
    # feature
    # in its tail) or "total" (anomaly_score > threshold); manifests before it were "total"
    flag_rule: str = "total"
    finished: str = ""  # set at commit
    files: tuple[str, ...] = ()  # scored files, relative to the output
    rejected_files: tuple[str, ...] = ()  # relative to the output
    # the day against the model's calibration (model/calibration/drift.py): {"alarm": bool, ...};
    # set at
    # commit, {} when not computed
    drift: dict = field(default_factory=dict, compare=False)
    extra: dict = field(default_factory=dict, compare=False)  # keys a newer writer added

    def committed(
        self, *, scored: int, rejected: int, files, rejected_files, finished: str
    ) -> Manifest:
        return replace(
            self,
            rows=replace(self.rows, scored=scored, rejected=rejected),
            files=tuple(files),
            rejected_files=tuple(rejected_files),
            finished=finished,
        )

    def parquet_metadata(self) -> dict[str, str]:
        """The Parquet key-value metadata of this run's files."""
        return {
            MetadataKey.MODEL_URI.value: self.model.uri,
            MetadataKey.MODEL_REQUESTED.value: self.model.requested,
            MetadataKey.MODEL_VERSION.value: model_label(self.model),
            MetadataKey.K.value: str(self.k),
            MetadataKey.SEED.value: str(self.seed),
            MetadataKey.THRESHOLD_QUANTILE.value: str(self.threshold_quantile),
            MetadataKey.THRESHOLD.value: repr(self.threshold),
            MetadataKey.FLAG_RULE.value: self.flag_rule,
            MetadataKey.VERSION.value: self.vaewatch_version,
            MetadataKey.RUN_ID.value: self.run_id,
        }

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(
            model=asdict(self.model),
            inputs=[asdict(i) for i in self.inputs],
            rows=self.rows.to_json(),
            keep=list(self.keep),
            files=list(self.files),
            rejected_files=list(self.rejected_files),
        )
        if not self.finished:
            out.pop("finished")
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        known = {f.name for f in fields(cls)}
        return cls(
            run_id=d["run_id"],
            model=ManifestModel(**d["model"]),
            inputs=tuple(ManifestInput(**i) for i in d.get("inputs", [])),
            rows=RowCounts.from_json(d["rows"]),
            k=int(d["k"]),
            seed=int(d["seed"]),
            threshold_quantile=float(d["threshold_quantile"]),
            threshold=float(d["threshold"]),
            batch_size=int(d["batch_size"]),
            runner=d["runner"],
            workers=int(d["workers"]),
            keep=tuple(d.get("keep", ())),
            started=d["started"],
            vaewatch_version=d["vaewatch_version"],
            precision=d.get("precision", "fp32"),
            flag_rule=d.get("flag_rule", "total"),
            finished=d.get("finished", ""),
            files=tuple(d.get("files", ())),
            rejected_files=tuple(d.get("rejected_files", ())),
            drift=dict(d.get("drift", {})),
            extra={k: v for k, v in d.items() if k not in known},
        )


def model_label(model: ManifestModel) -> str:
    """What the model_version column holds: NAME/VERSION, or the local folder's path."""
    return f"{model.name}/{model.version}" if model.name else model.uri
