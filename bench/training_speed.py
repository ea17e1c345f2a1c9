"""Training speed per device and batch size: seconds per epoch and training rows/s, with a
profile of where a GPU step's time goes.

    python -m bench.training_speed                   # CPU only
    python -m bench.training_speed --device cuda     # CUDA against this machine's CPU
    python -m bench.training_speed --profile         # also the top operators of one epoch
    python -m bench.training_speed --quick           # 10,000 rows (make bench-quick)

Data: the demo's synthetic transactions (50,000 rows, 1 % anomalies), the default network for
that spec, the default objective and mixed precision (bfloat16 autocast on CUDA). Every
configuration trains 3 epochs from the same seed in this process; the first epoch is reported
apart (CUDA context, cuBLAS handles and autocast caches are set up in it) and the rate comes from
the other two. One epoch is at least `min_steps_per_epoch` optimiser steps, so a large batch
means more passes over the rows per epoch: rows/s counts every row seen, passes included.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform

import torch

from bench import harness
from vaewatch.model.data.features import FeatureSpec
from vaewatch.model.network.vae import VAE, VAEConfig
from vaewatch.model.synthetic import LABEL_COLUMNS, transactions
from vaewatch.model.training.loop import TrainConfig, train

EPOCHS = 3


def measure(spec, enc, device: str, batch_size: int) -> dict:
    config = TrainConfig(epochs=EPOCHS, batch_size=batch_size, device=device, seed=0)
    result = train(VAE(VAEConfig.for_spec(spec)), enc.x, enc.mask, config)
    rows_train = round(enc.x.shape[0] * (1 - config.validation_fraction))
    passes = config.passes_per_epoch(rows_train)
    steps = passes * math.ceil(rows_train / batch_size)
    later = [e.seconds for e in result.history[1:]]
    seconds = sum(later) / len(later)
    return {
        "device": device,
        "batch": batch_size,
        "first": result.history[0].seconds,
        "seconds": seconds,
        "steps": steps,
        "ms_per_step": 1000 * seconds / steps,
        "rows_per_s": passes * rows_train / seconds,
    }


def profile_epoch(spec, enc, device: str, batch_size: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    config = TrainConfig(epochs=1, batch_size=batch_size, device=device, seed=0)
    train(VAE(VAEConfig.for_spec(spec)), enc.x, enc.mask, config)  # warm-up, not profiled
    with profile(activities=activities) as prof:
        train(VAE(VAEConfig.for_spec(spec)), enc.x, enc.mask, config)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def main() -> None:
    parser = harness.parser(__doc__, quick="10,000 rows, batches 256 and 1024")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda also runs the CPU rows)")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batches", default="256,1024,8192", help="batch sizes, comma-separated")
    parser.add_argument("--profile", action="store_true", help="profile one epoch at batch 1024")
    args = parser.parse_args()
    harness.start(args, "training_speed")
    if args.quick:
        args.rows, args.batches = 10_000, "256,1024"
    table = transactions(args.rows, anomaly_rate=0.01, seed=0)
    spec = FeatureSpec.fit(table, exclude=LABEL_COLUMNS)
    enc = spec.encode(table)
    batches = [int(b) for b in args.batches.split(",")]
    devices = ["cpu"] if args.device == "cpu" else [args.device, "cpu"]
    rows = [measure(spec, enc, d, b) for d in devices for b in batches]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(
        f"date {dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores, {gpu}, torch "
        f"{torch.__version__}, {args.rows:,} rows x {len(spec.features)} features, "
        f"{EPOCHS} epochs per configuration\n"
    )
    cpu_rate = {r["batch"]: r["rows_per_s"] for r in rows if r["device"] == "cpu"}
    print("| device | batch | first epoch (s) | later epochs (s) | steps/epoch | ms/step | "
          "rows/s | vs CPU, same batch |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['device']} | {r['batch']:,} | {r['first']:.2f} | {r['seconds']:.2f} | "
            f"{r['steps']} | {r['ms_per_step']:.2f} | {r['rows_per_s']:,.0f} | "
            f"{r['rows_per_s'] / cpu_rate[r['batch']]:.2f}x |"
        )
    if args.profile:
        print(f"\nOne epoch on {args.device} at batch 1024, by self CPU time:\n")
        print(profile_epoch(spec, enc, args.device, 1024))


if __name__ == "__main__":
    main()
