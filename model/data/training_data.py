"""Training data: a seeded per-row split and shuffled mini-batches, from memory or Parquet.

`TrainingData` holds the validation sample in memory and serves shuffled mini-batches of the
training rows, either from memory (when the encoded rows fit `cache_bytes`: an exact shuffle
each epoch) or streamed from Parquet each epoch (files in a fresh seeded order, rows shuffled
inside a buffer of `shuffle_buffer_rows`), so training data larger than memory works. Which rows
are held out is decided per row by a seeded hash of its position in the sorted file list: the
split does not depend on batch boundaries, the read order or the cache.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from vaewatch.model import defaults
from vaewatch.model._moved import deprecated_defaults
from vaewatch.model.data.features import FeatureSpec
from vaewatch.model.data.inputs import ParquetSource
from vaewatch.model.errors import UserError, setting


# ---------------------------------------------------------------------------------- the split
def row_uniforms(ordinals: np.ndarray, seed: int) -> np.ndarray:
    """A uniform in [0, 1) per row ordinal: splitmix64 of (ordinal, seed). Vectorised."""
    with np.errstate(over="ignore"):
        z = ordinals.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def held_out_fraction(rows: int, fraction: float) -> float:
    """The share of rows held out: `fraction`, raised on small tables towards
    MIN_VALIDATION_ROWS rows, but never above a quarter of the table."""
    if rows <= 0:
        return fraction
    return max(fraction, min(defaults.MIN_VALIDATION_ROWS / rows, 0.25))


def split_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) row indices of range(n): row i is held out iff its uniform < fraction."""
    u = row_uniforms(np.arange(n), seed)
    held = u < fraction
    return torch.from_numpy(np.flatnonzero(~held)), torch.from_numpy(np.flatnonzero(held))


# ---------------------------------------------------------------------------------- the data
@dataclass
class DataCounts:
    rows_read: int = 0
    rows_unusable: int = 0  # rows the encoder flags (all features missing, +-inf)
    rows_train: int = 0
    rows_held_out: int = 0  # the validation split
    rows_validation: int = 0  # the held-out rows kept in memory for validation and calibration

    def to_json(self) -> dict:
        return asdict(self)


class TrainingData:
    """Training rows served as shuffled mini-batches, plus an in-memory validation sample."""

    def __init__(self) -> None:  # use from_tensors / from_parquet
        self.x_val = self.m_val = None
        self._x = self._m = None  # cached training rows, when they fit
        self._stream = None  # (source, spec, fraction, seed, buffer rows, read rows) otherwise
        # rows that serve no batch (`excluding`): a predicate on (x, mask) -> bool per row
        self._exclude: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.excluded_rows = 0  # rows `excluding` left out (streamed: in the last epoch)
        self.counts = DataCounts()

    @property
    def cached(self) -> bool:
        return self._x is not None

    @classmethod
    def from_tensors(
        cls, x: torch.Tensor, mask: torch.Tensor, validation_fraction: float, seed: int
    ) -> TrainingData:
        fraction = held_out_fraction(x.shape[0], validation_fraction)
        train_idx, val_idx = split_indices(x.shape[0], fraction, seed)
        data = cls()
        data._x, data._m = x[train_idx], mask[train_idx]
        data.x_val, data.m_val = x[val_idx], mask[val_idx]
        data.counts = DataCounts(
            rows_read=x.shape[0],
            rows_train=len(train_idx),
            rows_held_out=len(val_idx),
            rows_validation=len(val_idx),
        )
        data._check()
        return data

    @classmethod
    def from_parquet(
        cls,
        source: ParquetSource,
        spec: FeatureSpec,
        *,
        validation_fraction: float,
        seed: int,
        max_validation_rows: int = defaults.MAX_VALIDATION_ROWS,
        cache_bytes: int = defaults.CACHE_BYTES,
        shuffle_buffer_rows: int = 262_144,
        read_batch_rows: int = 65_536,
    ) -> TrainingData:
        """One pass over the files: count, keep the validation sample, cache training rows if
        their encoded size is within `cache_bytes` (else they are streamed every epoch)."""
        data = cls()
        validation_fraction = held_out_fraction(source.num_rows(), validation_fraction)
        expected_held = max(1.0, source.num_rows() * validation_fraction)
        keep = validation_fraction * min(1.0, max_validation_rows / expected_held)
        columns = spec.names()
        xs, ms, xv, mv = [], [], [], []
        bytes_per_row = len(columns) * 5  # float32 value + bool mask
        counts = data.counts
        for first, batch in source.batches(columns, batch_rows=read_batch_rows):
            enc = spec.encode(batch)
            u = row_uniforms(np.arange(first, first + batch.num_rows), seed)
            ok = enc.ok
            train = ok & (u >= validation_fraction)
            validation = ok & (u < keep)
            counts.rows_read += batch.num_rows
            counts.rows_unusable += int((~ok).sum())
            counts.rows_train += int(train.sum())
            counts.rows_held_out += int((ok & (u < validation_fraction)).sum())
            counts.rows_validation += int(validation.sum())
            xv.append(enc.x[torch.from_numpy(validation)])
            mv.append(enc.mask[torch.from_numpy(validation)])
            if counts.rows_train * bytes_per_row <= cache_bytes:
                xs.append(enc.x[torch.from_numpy(train)])
                ms.append(enc.mask[torch.from_numpy(train)])
            else:
                xs, ms = None, None
        if xs is not None and xs:
            data._x, data._m = torch.cat(xs), torch.cat(ms)
        else:
            data._stream = (
                source,
                spec,
                validation_fraction,
                seed,
                shuffle_buffer_rows,
                read_batch_rows,
            )
        n_features = len(columns)
        data.x_val = torch.cat(xv) if xv else torch.zeros((0, n_features))
        data.m_val = torch.cat(mv) if mv else torch.zeros((0, n_features), dtype=torch.bool)
        data._check()
        return data

    def excluding(
        self, predicate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], chunk: int = 8192
    ) -> TrainingData:
        """These rows without the training rows where `predicate(x, mask)` (a bool per row) is
        true; the validation sample and the counts stay. Cached rows are tested once, here;
        streamed rows as each batch is read, so `excluded_rows` is then the last epoch's."""
        out = copy.copy(self)
        if self._x is None:
            out._exclude = predicate
            return out
        drop = torch.cat(
            [
                predicate(self._x[start : start + chunk], self._m[start : start + chunk]).cpu()
                for start in range(0, self._x.shape[0], chunk)
            ]
        )
        out._x, out._m = self._x[~drop], self._m[~drop]
        out.excluded_rows = int(drop.sum())
        return out

    def _check(self) -> None:
        c = self.counts
        if c.rows_train < 1 or c.rows_validation < 1:
            raise UserError(
                f"too little usable data to train: {c.rows_read} rows read, {c.rows_unusable} "
                f"unusable, {c.rows_train} for training and {c.rows_validation} for validation; "
                f"give more rows or a larger {setting('validation_fraction')}"
            )

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (x, mask) mini-batches in a seeded random order."""
        if self._x is not None:
            order = torch.randperm(self._x.shape[0], generator=generator)
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                yield self._x[index], self._m[index]
            return
        source, spec, fraction, seed, buffer_rows, read_rows = self._stream
        file_order = torch.randperm(len(source.files), generator=generator).tolist()
        pending_x, pending_m, pending = [], [], 0

        def drain(final: bool):
            x, m = torch.cat(pending_x), torch.cat(pending_m)
            order = torch.randperm(x.shape[0], generator=generator)
            usable = x.shape[0] if final else (x.shape[0] // batch_size) * batch_size
            for start in range(0, usable, batch_size):
                index = order[start : min(start + batch_size, usable)]
                yield x[index], m[index]
            rest = order[usable:]
            pending_x[:], pending_m[:] = [x[rest]], [m[rest]]

        self.excluded_rows = 0
        for first, batch in source.batches(spec.names(), read_rows, file_order=file_order):
            enc = spec.encode(batch)
            u = row_uniforms(np.arange(first, first + batch.num_rows), seed)
            train = torch.from_numpy(enc.ok & (u >= fraction))
            if self._exclude is not None:
                dropped = self._exclude(enc.x, enc.mask).cpu() & train
                self.excluded_rows += int(dropped.sum())
                train &= ~dropped
            pending_x.append(enc.x[train])
            pending_m.append(enc.mask[train])
            pending += int(train.sum())
            if pending >= buffer_rows:
                yield from drain(final=False)
                pending = pending_x[0].shape[0]
        if pending:
            yield from drain(final=True)


# Names before 0.2.0 for defaults that live in vaewatch.model.defaults (until 0.3.0).
__getattr__ = deprecated_defaults(
    __name__,
    {"DEFAULT_MAX_VALIDATION_ROWS": "MAX_VALIDATION_ROWS", "DEFAULT_CACHE_BYTES": "CACHE_BYTES"},
)
