"""Scoring an Arrow batch with a model artifact: the one code path behind the Beam pipeline
and the MLflow pyfunc model.

`Scorer.score(batch)` encodes the batch, sends rows that cannot be scored to the rejected side
with a reason, runs the production estimator on the rest and returns the output contract's
columns as Arrow. The output columns are those of model/contract.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from vaewatch.model import defaults
from vaewatch.model._moved import renamed
from vaewatch.model.artifact import ModelArtifact
from vaewatch.model.calibration.scores import check_quantile
from vaewatch.model.calibration.segments import baseline_column
from vaewatch.model.contract import REASON_COLUMN, Baseline, Basis, RejectReason, score_schema
from vaewatch.model.data.features import RowProblem
from vaewatch.model.device import resolve_device, resolve_precision
from vaewatch.model.errors import UserError
from vaewatch.model.estimation.attribution import explain_flagged, missing_baseline
from vaewatch.model.estimation.estimators import DEFAULT_MEMORY_BUDGET, score_records
from vaewatch.model.estimation.explanations import Expectations, record_basis, top_features

# bytes per (record, feature) of the per-record outputs held at once: the attribution in
# float64 and its top-features temporaries (excess, sort order), the missing-value costs
ROW_BYTES_PER_FEATURE = 64
MIN_ROWS_PER_CALL = 1024  # fewer rows per call and Python overhead shows


@dataclass(frozen=True)
class ScoringOverrides:
    """What a run asks for instead of the model's stored K, seed, threshold quantile and flag
    rule; None keeps the model's own (the values its calibration was computed with).
    `resolve(artifact)` gives the run's settings: every field filled in from the model and
    checked. (0.1.0 returned a separate ScoringSettings type; the resolved overrides are it.)"""

    k: int | None = None
    seed: int | None = None
    threshold_quantile: float | None = None
    flag_rule: str | None = None  # "any" | "total"

    def resolve(self, artifact: ModelArtifact) -> ScoringOverrides:
        stored, calibration = artifact.scoring, artifact.calibration
        k = stored.k if self.k is None else self.k
        if k < 1:
            raise UserError(f"K must be >= 1, got K={k}")
        quantile = (
            calibration.threshold_quantile
            if self.threshold_quantile is None
            else check_quantile(self.threshold_quantile)
        )
        return ScoringOverrides(
            k=k,
            seed=stored.seed if self.seed is None else self.seed,
            threshold_quantile=quantile,
            flag_rule=calibration.check_rule(self.flag_rule),
        )

    def threshold(self, artifact: ModelArtifact) -> float:
        """The anomaly score above which these settings flag every record of `artifact`."""
        resolved = self.resolve(artifact)
        return artifact.calibration.threshold(resolved.threshold_quantile, resolved.flag_rule)


@dataclass
class ScoredBatch:
    scores: pa.Table  # score columns for the rows that were scored, in input order
    scored_rows: np.ndarray  # (n_scored,) int64 positions of those rows in the input batch
    rejected_rows: np.ndarray  # (n_rejected,) int64 positions of the rejected rows
    reasons: pa.Array  # (n_rejected,) string: why each rejected row was not scored
    num_rows: int  # rows in the input batch
    # flagged records whose top_features are -log p(x_j|z): past the batch's leave-one-out
    # budget (model/estimation/attribution.py, EXPLAINED_SHARE), on a day where many records are
    # flagged
    unexplained: int = 0

    def aligned(self) -> pa.Table:
        """One row per input row, in input order: the score columns (null where the row was
        rejected) and `reason` ("" where it was scored). What the pyfunc and the RunInference
        handler return."""
        index = np.full(self.num_rows, -1, dtype=np.int64)
        index[self.scored_rows] = np.arange(len(self.scored_rows))
        scores = self.scores.take(pa.array(index, mask=index < 0))
        reasons = np.full(self.num_rows, "", dtype=object)
        reasons[self.rejected_rows] = self.reasons.to_numpy(zero_copy_only=False)
        return scores.append_column(REASON_COLUMN, pa.array(reasons, pa.string()))


class Scorer:
    """Holds a built model; thread-safe for concurrent `score` calls (inference only)."""

    def __init__(
        self,
        artifact: ModelArtifact,
        *,
        model_version: str,
        device: str = "auto",
        precision: str = defaults.PRECISION,
        overrides: ScoringOverrides = ScoringOverrides(),  # noqa: B008 - frozen, shared safely
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ):
        self.artifact = artifact
        self.spec = artifact.spec
        self.device = resolve_device(device)
        self.matmul_dtype = resolve_precision(precision, self.device)
        self.model = artifact.build(self.device)
        settings = overrides.resolve(artifact)
        self.k, self.seed = settings.k, settings.seed
        self.threshold_quantile, self.flag_rule = settings.threshold_quantile, settings.flag_rule
        self.threshold = settings.threshold(artifact)
        calibration = artifact.calibration
        self.memory_budget = memory_budget
        self.model_version = model_version
        self.schema = score_schema(artifact.vae_config.latent_dim)
        self.log_std = self.spec.continuous_log_std.to(self.device)
        self._names = self.spec.names()
        self._baseline = np.asarray(calibration.feature_baseline)
        # the flagged records' leave-one-out attribution and its explanations
        # (model/estimation/explanations.py), at the K its baseline was computed with; a run at
        # another K (IWAE estimates of different K are on different scales, as for the drift
        # check) keeps -log p(x_j|z) for every record, and says so in top_features' `basis`
        stored = calibration.conditional_baseline
        self._conditional_baseline = (
            np.asarray(stored) if stored is not None and self.k == artifact.scoring.k else None
        )
        self._why_not = (
            Basis.NOT_IN_MODEL
            if stored is None
            else Basis.OTHER_K
            if self._conditional_baseline is None
            else None
        )
        self._missing_baseline = missing_baseline([f.missing_share for f in self.spec.features])
        # the baselines that judge records (model/calibration/segments.py): the `baseline`
        # column's dictionary and, per entry, its calibration (the global markers: the global)
        segments = artifact.segments
        self._labels = [Baseline.GLOBAL.value] if segments is None else segments.labels()
        own = list(artifact.calibrations().values())
        self._judges = [calibration] * (len(self._labels) - len(own)) + own
        # rows per estimator call: the batch-level (rows, features) outputs within the budget
        self.rows_per_call = max(
            MIN_ROWS_PER_CALL, memory_budget // (ROW_BYTES_PER_FEATURE * len(self._names))
        )

    def score(
        self, batch: pa.RecordBatch | pa.Table, model_version: str | None = None
    ) -> ScoredBatch:
        """Score a batch; `model_version` overrides the label for this call only."""
        n = batch.num_rows
        version = self.model_version if model_version is None else model_version
        encoded = self.spec.encode(batch)
        ok = encoded.ok
        reasons = np.full(n, "", dtype=object)
        for problem in RowProblem:
            if problem.reason is not None:
                reasons[encoded.problems == problem] = problem.reason.value
        rows = np.flatnonzero(ok)
        x, mask = encoded.x, encoded.mask
        if 0 < rows.size < n:  # copy only when some rows are rejected (the rare case)
            index = torch.from_numpy(rows)
            x, mask = x[index], mask[index]
        tables, kept, unexplained = [], [], 0
        # the per-record outputs are (rows, features) float64 several times over (attribution,
        # top features, missing costs): slices of the batch keep them within the memory budget
        step = self.rows_per_call
        source = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        for start in range(0, rows.size, step):
            part = rows[start : start + step]
            table, keep, left = self._score_rows(
                x[start : start + step], mask[start : start + step], version, (source, part)
            )
            unexplained += left
            reasons[part[~keep]] = RejectReason.NON_FINITE_SCORE.value
            tables.append(table)
            kept.append(part[keep])
        if tables:
            table = pa.concat_tables(tables).combine_chunks() if len(tables) > 1 else tables[0]
            rows = np.concatenate(kept)
        else:
            d, f = self.artifact.vae_config.latent_dim, len(self._names)
            empty = np.zeros(0)
            table, _ = self._columns(
                {
                    "elbo": empty,
                    "log_likelihood": empty,
                    "log_likelihood_se": empty,
                    "latent_mean": np.zeros((0, d), np.float32),
                    "latent_std": np.zeros((0, d), np.float32),
                    "feature_nll": np.zeros((0, f)),
                    "discrete_nll": np.zeros(0),
                    "missing": np.zeros((0, f), dtype=bool),
                },
                version,
            )
        rejected = np.flatnonzero(reasons != "")
        return ScoredBatch(
            scores=table,
            scored_rows=rows.astype(np.int64),
            rejected_rows=rejected.astype(np.int64),
            reasons=pa.array(reasons[rejected].tolist(), type=pa.string()),
            num_rows=n,
            unexplained=unexplained,
        )

    def _score_rows(self, x: torch.Tensor, mask: torch.Tensor, version: str, source=None):
        """(score columns of the rows whose scores are finite, (rows,) bool: which those are,
        flagged records past the leave-one-out budget). `source`: (the input table, the rows'
        positions in it), for the explained values as the input held them."""
        x = x.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        scores = score_records(
            self.model,
            x,
            mask,
            log_std=self.log_std,
            k=self.k,
            seed=self.seed,
            memory_budget=self.memory_budget,
            matmul_dtype=self.matmul_dtype,
            proposal_scale=self.artifact.scoring.proposal_scale,
            points=self.artifact.scoring.points,
        )
        arrays = {
            name: getattr(scores, name).cpu().numpy()
            for name in ("elbo", "log_likelihood", "log_likelihood_se", "latent_mean",
                         "latent_std", "feature_nll")
        }  # fmt: skip
        arrays["missing"] = ~mask.cpu().numpy()
        if scores.discrete_nll is not None:
            arrays["discrete_nll"] = scores.discrete_nll.cpu().numpy()
        finite = np.isfinite(arrays["log_likelihood"]) & np.isfinite(arrays["elbo"])
        if not finite.all():
            arrays = {name: values[finite] for name, values in arrays.items()}
            index = torch.from_numpy(np.flatnonzero(finite)).to(x.device)
            x, mask = x[index], mask[index]
            if source is not None:
                source = (source[0], source[1][finite])
        table, unexplained = self._columns(arrays, version, (x, mask), source)
        return table, finite, unexplained

    def _columns(
        self,
        arrays: dict[str, np.ndarray],
        version: str,
        inputs: tuple | None = None,
        source: tuple[pa.Table, np.ndarray] | None = None,
    ) -> tuple[pa.Table, int]:
        """(The output contract's score columns from the estimator's per-record arrays; how many
        flagged records kept the posterior attribution, past the leave-one-out budget).
        `inputs` (x, mask) of those records, for the flagged ones' attribution; `source` as in
        `_score_rows`."""
        n = len(arrays["log_likelihood"])
        calibration, nll = self.artifact.calibration, arrays["feature_nll"]
        anomaly = calibration.complete(
            arrays["log_likelihood"], arrays["missing"], arrays.get("discrete_nll")
        )
        judged_by = np.zeros(n, dtype=np.int32)
        if self.artifact.segments is not None and inputs is not None:
            judged_by = self.artifact.segments.assign(self.spec, *inputs)
        flagged, percentile = self._judge(anomaly, nll, arrays.get("discrete_nll"), judged_by)
        excess, unexplained = nll - self._baseline, 0
        conditional, explained, expectations = self._conditional_baseline, None, None
        if inputs is not None and conditional is not None and flagged.any():
            estimator = dict(
                k=self.k, seed=self.seed, log_std=self.log_std,
                proposal_scale=self.artifact.scoring.proposal_scale,
                points=self.artifact.scoring.points,
                memory_budget=self.memory_budget, matmul_dtype=self.matmul_dtype,
            )  # fmt: skip
            explained = explain_flagged(
                self.model, *inputs, excess, flagged, conditional, anomaly,
                self._missing_baseline, **estimator,
            )  # fmt: skip
            excess, unexplained = explained.excess, explained.unexplained
            expectations = Expectations(
                self.model, self.spec, *inputs, explained, estimator, source
            )
        basis = record_basis(flagged, explained, self._why_not)
        latent_type = self.schema.field("latent_mean").type

        def fixed(values: np.ndarray) -> pa.FixedSizeListArray:
            flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
            return pa.FixedSizeListArray.from_arrays(flat, type=latent_type)

        version_column = pa.DictionaryArray.from_arrays(
            pa.array(np.zeros(n, dtype=np.int32)), pa.array([version], pa.string())
        )
        table = pa.Table.from_arrays(
            [
                pa.array(arrays["elbo"], pa.float64()),
                pa.array(arrays["log_likelihood"], pa.float64()),
                pa.array(arrays["log_likelihood_se"], pa.float64()),
                pa.array(anomaly, pa.float64()),
                pa.array(percentile, pa.float64()),
                pa.array(flagged, pa.bool_()),
                fixed(arrays["latent_mean"]),
                fixed(arrays["latent_std"]),
                top_features(
                    excess,
                    self._names,
                    self.artifact.scoring.top_features,
                    basis=basis,
                    expectations=expectations,
                ),
                baseline_column(self._labels, judged_by),
                version_column,
            ],
            schema=self.schema,
        )
        return table, unexplained

    def _judge(self, anomaly, feature_nll, discrete_nll, judged_by) -> tuple:
        """(is_anomaly, score_percentile) of each record under the baseline that judges it
        (`judged_by`: the index of its calibration in `self._judges`), at the run's quantile
        and rule."""
        n = len(anomaly)
        flagged, percentile = np.zeros(n, dtype=bool), np.zeros(n)
        for index in np.unique(judged_by):
            rows = np.flatnonzero(judged_by == index) if len(self._judges) > 1 else slice(None)
            judge = self._judges[index]
            flagged[rows] = judge.flags(
                anomaly[rows], feature_nll[rows], self.threshold_quantile, self.flag_rule,
                discrete_nll=None if discrete_nll is None else discrete_nll[rows],
            )  # fmt: skip
            percentile[rows] = judge.percentile(anomaly[rows])
        return flagged, percentile


# the resolved overrides were a type of their own in 0.1.0
__getattr__ = renamed(__name__, {"ScoringSettings": "vaewatch.model.scoring.ScoringOverrides"})
