"""End-to-end scoring throughput: `vaewatch score` (the Beam pipeline) against, in the same run,
(a) the pure-torch estimator loop over the same Arrow batches with the same model, and
(b) pyarrow read + write of the same data (the IO floor).

    python -m bench.beam_pipeline                  # 1M rows x 32 features, K=64; K sweep; workers
    python -m bench.beam_pipeline --rows 200000 --sweep-rows 50000   # quicker

Data: Parquet files of 32 features (24 continuous with a low-rank structure, 4 boolean, 4
categorical with 10 values) plus an id, 64k-row row groups. The model is the default VAEConfig
(latent 8, hidden [128, 128]) trained briefly: throughput does not depend on how well it fits.
Its calibration holds the leave-one-out baseline `fit` stores, so the flagged records' top
features cost what they cost a trained model's.
Each configuration is timed once (these runs are long), baselines right next to the pipeline.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench import harness
from vaewatch.model.artifact import ModelArtifact, ScoringDefaults
from vaewatch.model.calibration.scores import Calibration
from vaewatch.model.data.features import FeatureSpec
from vaewatch.model.estimation.estimators import score_records
from vaewatch.model.network.vae import VAE, VAEConfig
from vaewatch.model.scoring import ScoringOverrides
from vaewatch.model.training.loop import TrainConfig, train
from vaewatch.pipeline.score import ScoreJob, ScoreOptions, run

N_CONTINUOUS, N_BOOLEAN, N_CATEGORICAL = 24, 4, 4
ROW_GROUP = 65_536


def make_table(rows: int, seed: int, first_id: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, 4))
    loading = np.random.default_rng(0).normal(size=(4, N_CONTINUOUS))
    cont = z @ loading + 0.3 * rng.normal(size=(rows, N_CONTINUOUS))
    columns = {"record_id": pa.array(np.arange(first_id, first_id + rows, dtype=np.int64))}
    for j in range(N_CONTINUOUS):
        columns[f"c{j:02d}"] = pa.array(cont[:, j])
    for j in range(N_BOOLEAN):
        columns[f"b{j}"] = pa.array(z[:, j % 4] + 0.5 * rng.normal(size=rows) > 0)
    letters = np.array(list("abcdefghij"), dtype=object)
    for j in range(N_CATEGORICAL):
        codes = np.clip(((z[:, j % 4] + 2.5) * 2).astype(int), 0, 9)
        columns[f"k{j}"] = pa.array(letters[codes].tolist(), pa.string())
    return pa.table(columns)


def write_input(root: Path, rows: int, files: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // files)
    for i in range(files):
        n = min(per_file, rows - i * per_file)
        if n <= 0:
            break
        table = make_table(n, seed=100 + i, first_id=i * per_file)
        pq.write_table(table, root / f"part-{i:03d}.parquet", row_group_size=ROW_GROUP)
    return root


def make_model(folder: Path, k: int) -> ModelArtifact:
    table = make_table(20_000, seed=1)
    spec = FeatureSpec.fit(table, exclude=["record_id"])
    enc = spec.encode(table)
    model = VAE(VAEConfig.for_spec(spec))
    train(model, enc.x, enc.mask, TrainConfig(epochs=2, device="cpu"))
    # calibrated at the model's own K, as `fit` does (a model saved with K=1 and calibrated at
    # K=8 flagged 21 % of these rows at K=1)
    s = score_records(model, enc.x[:4096], enc.mask[:4096], log_std=spec.continuous_log_std, k=k)
    calibration = Calibration.fit(s.anomaly_score.numpy(), s.feature_nll.numpy())
    try:  # the flagged records' leave-one-out baseline, as `fit` stores it (since 2026-12-04)
        from vaewatch.model.estimation.attribution import conditional_baseline
    except ImportError:  # an earlier commit's code (bench/small_k.py runs this file with it)
        pass
    else:
        baseline = conditional_baseline(
            model, enc.x[:512], enc.mask[:512], k=k, seed=ScoringDefaults().seed,
            log_std=spec.continuous_log_std, proposal_scale=1.0, memory_budget=1 << 26,
        )  # fmt: skip
        calibration = dataclasses.replace(calibration, conditional_baseline=baseline.tolist())
    artifact = ModelArtifact.from_model(
        model, spec, calibration, scoring=ScoringDefaults(k=k), id_column="record_id"
    )
    artifact.save(folder)
    return artifact


def io_floor(source: Path, out: Path, columns: list[str], strings_only: bool = False) -> float:
    """Seconds to read the projected columns batch by batch and write them back (zstd), with
    pyarrow's default dictionary encoding (every column), or with `strings_only` the one the
    scored output is written with (string columns only)."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.parquet")):
        reader = pq.ParquetFile(path)
        schema = pa.schema([reader.schema_arrow.field(c) for c in columns])
        # the input's strings are top-level columns; not pipeline/tables.py's `string_columns`,
        # which a baseline commit run by bench/small_k.py may not have
        dictionary = (
            [f.name for f in schema if pa.types.is_string(f.type)] if strings_only else True
        )
        with pq.ParquetWriter(
            out / path.name, schema, compression="zstd", use_dictionary=dictionary
        ) as writer:
            for batch in reader.iter_batches(batch_size=ROW_GROUP, columns=columns):
                writer.write_batch(batch)
    return time.perf_counter() - started


def torch_loop(source: Path, artifact: ModelArtifact, k: int, device: str = "cpu") -> float:
    """Seconds for read -> encode -> score_records over the same batches, nothing written."""
    model = artifact.build(device)
    spec = artifact.spec
    log_std = spec.continuous_log_std.to(device)
    started = time.perf_counter()
    for path in sorted(source.glob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP, columns=spec.names()):
            enc = spec.encode(batch)
            s = score_records(model, enc.x.to(device), enc.mask.to(device), log_std=log_std, k=k)
            s.log_likelihood.cpu()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def pipeline_run(source: Path, model: Path, out: Path, k: int, workers: int = 1) -> float:
    started = time.perf_counter()
    result = run(
        ScoreJob(
            input=str(source),
            output=str(out),
            model=str(model),
            tracking_uri="unused",
            options=ScoreOptions(overrides=ScoringOverrides(k=k), workers=workers),
        )
    )
    seconds = time.perf_counter() - started
    assert result.manifest.rows.rows_in == result.manifest.rows.scored
    return seconds


def main() -> None:
    parser = harness.parser(__doc__, quick="200k rows, 50k in the K sweep")
    parser.add_argument("--rows", type=int, default=None, help="default 1,000,000")
    parser.add_argument("--sweep-rows", type=int, default=None, help="default 200,000")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="K=64 loop/pipeline pairs")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    harness.start(args, "beam_pipeline")
    args.rows = args.rows or (200_000 if args.quick else 1_000_000)
    args.sweep_rows = args.sweep_rows or (50_000 if args.quick else 200_000)
    if args.quick:
        args.repeats = 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vaewatch-bench-"))
    threads = torch.get_num_threads()
    print(
        f"Run: date {dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {threads} threads, {args.rows:,} rows x 32 features\n"
    )
    full = write_input(work / "full", args.rows, args.files)
    sweep = write_input(work / "sweep", args.sweep_rows, max(1, args.files // 2))
    model_dir = work / "model"
    artifact = make_model(model_dir, k=64)
    columns = artifact.spec.names()

    print("| configuration | rows | seconds | rows/s | vs torch loop | vs IO floor |")
    print("|---|---:|---:|---:|---:|---:|")

    def row(name, rows, seconds, loop=None, floor=None):
        rate = rows / seconds
        vs_loop = f"{loop / seconds:.2f}x" if loop else ""
        vs_floor = f"{floor / seconds:.2f}x" if floor else ""
        print(
            f"| {name} | {rows:,} | {seconds:.1f} | {rate:,.0f} | {vs_loop} | {vs_floor} |",
            flush=True,
        )

    floor = io_floor(full, work / "io", [*columns, "record_id"])
    row("pyarrow read + write (IO floor)", args.rows, floor)
    # K=64: the loop and the pipeline alternate `--repeats` times; the best of each is kept
    loops, pipes = [], []
    for _ in range(args.repeats):
        loops.append(torch_loop(full, artifact, k=64))
        pipes.append(pipeline_run(full, model_dir, work / "out", k=64))
    loop, seconds = min(loops), min(pipes)
    row("torch estimator loop, K=64", args.rows, loop, floor=floor)
    row("vaewatch score, K=64", args.rows, seconds, loop=loop, floor=floor)
    repeats = f"loop {[round(t, 1) for t in loops]}, pipeline {[round(t, 1) for t in pipes]}"
    print(f"<!-- all repeats, seconds: {repeats} -->")
    seconds = pipeline_run(full, model_dir, work / "out-mp", k=64, workers=2)
    row("vaewatch score, K=64, 2 worker processes", args.rows, seconds, loop=loop, floor=floor)
    for k in (1, 16, 256):
        loop_k = torch_loop(sweep, artifact, k=k)
        row(f"torch estimator loop, K={k}", args.sweep_rows, loop_k)
        seconds = pipeline_run(sweep, model_dir, work / f"out-k{k}", k=k)
        row(f"vaewatch score, K={k}", args.sweep_rows, seconds, loop=loop_k)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
