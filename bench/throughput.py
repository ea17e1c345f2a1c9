"""Scoring throughput and peak memory: vaewatch (estimator loop and the full Beam pipeline) at
K = 1, 16, 64, 256 next to PyOD's VAE and scikit-learn's IsolationForest, in one run.

    python -m bench.throughput            # 200,000 rows
    python -m bench.throughput --quick    # 50,000 rows
    python -m bench.throughput --device cuda   # GPU figures (estimator, pipeline, IO rate)

Every configuration runs in its own fresh Python process (so peak RSS, `ru_maxrss`, is that
configuration's alone), one after another, on the same Parquet files: 32 features (24
continuous, 4 boolean, 4 categorical with 10 values), the data of bench/beam_pipeline.py.

  pyarrow IO           read the feature columns + write them back (zstd): the IO floor
  vaewatch loop, K     read -> encode -> model.estimators.score_records (ELBO, IWAE_K,
                       contributions) per 64k-row batch; nothing written
  vaewatch score, K    `vaewatch score` (pipeline.score.run, local runner): read, score, write
                       scored Parquet + rejected output + manifest, atomic commit
  PyOD VAE             pyod.models.vae.VAE with vaewatch's network size (encoder and decoder
                       [128, 128], latent 8), decision_function(X, batch_size=4096); X is the
                       same rows as a float matrix (categoricals one-hot, 68 columns) already
                       in memory: its time does not include reading Parquet
  IsolationForest      scikit-learn, 100 trees, score_samples on the same in-memory matrix

Models are trained briefly (1-2 epochs): throughput does not depend on the fit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import harness

K_VALUES = (1, 16, 64, 256)


def _bench_pipeline():
    """bench/beam_pipeline.py's data and model helpers."""
    from bench import beam_pipeline

    return beam_pipeline


def _matrix(table, spec):
    """The rows as PyOD/scikit-learn take them: numbers, booleans 0/1, categoricals one-hot."""
    import numpy as np
    import pyarrow.compute as pc

    from vaewatch.model.data.features import FeatureKind

    parts = []
    for f in spec.features:
        column = table[f.name]
        if f.kind is FeatureKind.CATEGORICAL:
            codes = pc.index_in(column, value_set=pc.cast(f.vocabulary, column.type)).to_numpy(
                zero_copy_only=False
            )
            parts.append(
                np.eye(len(f.vocabulary) + 1)[
                    np.nan_to_num(codes, nan=len(f.vocabulary)).astype(int)
                ]
            )
        else:
            parts.append(column.to_numpy(zero_copy_only=False).astype(np.float64)[:, None])
    return np.hstack(parts).astype(np.float32)


class _RSSSampler:
    """Peak resident memory of this process during a block, sampled every 5 ms from /proc
    (ru_maxrss alone would report the import peak when the block stays below it)."""

    def __enter__(self):
        import threading

        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:  # not Linux: the lifetime peak is the best available
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    """One configuration in this (fresh) process; returns rows, seconds, peak RSS."""
    import pyarrow.parquet as pq
    import torch

    bp = _bench_pipeline()
    work = Path(args.workdir)
    source, model_dir = work / "input", work / "model"
    from vaewatch.model.artifact import ModelArtifact

    artifact = ModelArtifact.load(model_dir)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in source.glob("*.parquet"))
    method, k, device = args.method, args.k, args.device
    x = None
    if method in ("pyod-vae", "iforest", "memory"):
        table = pq.read_table(source, columns=artifact.spec.names())
        if method == "memory":
            enc = artifact.spec.encode(table)
            x = (enc.x.to(device), enc.mask.to(device))
        else:
            x = _matrix(table, artifact.spec)
            fitted = _fit_peer(method, x)
        del table
    # one untimed call on 4,096 rows first, for every in-process scorer (first-call allocation
    # and thread start-up are not throughput); the pipeline's fixed cost stays in its figure
    if method in ("memory", "loop"):
        first = next(pq.ParquetFile(sorted(source.glob("*.parquet"))[0]).iter_batches(4096))
        enc = artifact.spec.encode(first)
        _in_memory(enc.x.to(device), enc.mask.to(device), artifact, k, device)
    elif method == "pyod-vae":
        fitted.decision_function(x[:4096], batch_size=4096)
    elif method == "iforest":
        fitted.score_samples(x[:4096])
    with _RSSSampler() as rss:
        started = time.perf_counter()
        if method == "io":
            bp.io_floor(source, work / f"io-{os.getpid()}", [*artifact.spec.names()])
        elif method == "loop":
            bp.torch_loop(source, artifact, k, device)
        elif method == "memory":
            _in_memory(*x, artifact, k, device)
        elif method == "pipeline":
            out = work / f"out-k{k}-{device}"
            bp.pipeline_run(source, model_dir, out, k=k)
            shutil.rmtree(out, ignore_errors=True)
        elif method == "pyod-vae":
            fitted.decision_function(x, batch_size=4096)
        else:
            fitted.score_samples(x)
        seconds = time.perf_counter() - started
    return {
        "rows": rows,
        "seconds": seconds,
        "peak_mib": rss.peak,
        "added_mib": rss.peak - rss.start,
        "threads": torch.get_num_threads(),
    }


def _in_memory(x, mask, artifact, k: int, device: str) -> None:
    """score_records over already-encoded tensors in 64k-row batches: the same footing as
    PyOD's decision_function on an in-memory matrix."""
    import torch

    from vaewatch.model.estimation.estimators import score_records

    model = artifact.build(device)
    log_std = artifact.spec.continuous_log_std.to(device)
    for start in range(0, x.shape[0], 65_536):
        s = score_records(
            model, x[start : start + 65_536], mask[start : start + 65_536], log_std=log_std, k=k
        )
        s.log_likelihood.cpu()
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _fit_peer(method: str, x):
    import contextlib
    import io
    import warnings

    fit_rows = x[:20_000]
    if method == "iforest":
        from sklearn.ensemble import IsolationForest

        return IsolationForest(n_estimators=100, random_state=0).fit(fit_rows)
    from pyod.models.vae import VAE

    detector = VAE(
        encoder_neuron_list=[128, 128],
        decoder_neuron_list=[128, 128],
        latent_dim=8,
        epoch_num=1,
        batch_size=256,
        verbose=0,
        random_state=0,
    )
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector.fit(fit_rows)
    return detector


def prepare(work: Path, rows: int) -> None:
    bp = _bench_pipeline()
    bp.write_input(work / "input", rows, files=4)
    bp.make_model(work / "model", k=64)


def main() -> None:
    parser = harness.parser(__doc__, quick="50,000 rows")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where vaewatch scores")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(child(args)))
        return
    harness.start(args, "throughput")
    rows = args.rows or (50_000 if args.quick else 200_000)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vaewatch-throughput-"))
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(
        f"Run: date {dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores, {gpu}, "
        f"torch {torch.__version__}, vaewatch on {args.device}, {rows:,} rows x 32 features, "
        f"command: python -m bench.throughput{' --quick' if args.quick else ''}"
        f"{' --device ' + args.device if args.device != 'cpu' else ''}\n",
        flush=True,
    )
    prepare(work, rows)
    configs = [("pyarrow IO (read + write)", "io", 0)]
    for k in K_VALUES:
        configs += [
            (f"vaewatch in memory, K={k}", "memory", k),
            (f"vaewatch loop, K={k}", "loop", k),
            (f"vaewatch score, K={k}", "pipeline", k),
        ]
    configs += [("PyOD VAE, batch 4096", "pyod-vae", 0), ("IsolationForest", "iforest", 0)]
    results = {}
    for name, method, k in configs:
        command = harness.child_command(
            "throughput", "--one", "1", "--method", method, "--k", str(k),
            "--device", args.device, "--workdir", str(work),
        )  # fmt: skip
        done = harness.run_child(command, harness.child_env(None), name)
        results[name] = harness.last_json(done)
        r = results[name]
        print(f"  {name}: {r['rows'] / r['seconds']:,.0f} rows/s", file=sys.stderr, flush=True)
    pyod = results["PyOD VAE, batch 4096"]
    pyod_rate = pyod["rows"] / pyod["seconds"]
    io = results["pyarrow IO (read + write)"]
    io_rate = io["rows"] / io["seconds"]
    print(
        "| configuration | rows/s | vs PyOD VAE | vs IO floor | peak RSS (MiB) | added while "
        "scoring (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        rate = r["rows"] / r["seconds"]
        print(
            f"| {name} | {rate:,.0f} | {rate / pyod_rate:.2f}x | {rate / io_rate:.2f}x | "
            f"{r['peak_mib']:,.0f} | {r['added_mib']:,.0f} |"
        )
    m1 = results["vaewatch in memory, K=1"]
    k1 = results["vaewatch loop, K=1"]
    p1 = results["vaewatch score, K=1"]
    mem_x = m1["rows"] / m1["seconds"] / pyod_rate
    loop_x = k1["rows"] / k1["seconds"] / pyod_rate
    pipe_x = p1["rows"] / p1["seconds"] / pyod_rate
    print(
        f"\nvaewatch K=1 vs PyOD VAE (goal >= 5x): in memory {mem_x:.1f}x, estimator loop with "
        f"Parquet reading {loop_x:.1f}x, full pipeline with reading and writing {pipe_x:.1f}x"
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
