"""Two vaewatch jobs on the same cores: does each get about half, or do they collapse?

    python -m bench.contention            # scoring and training, alone and two at once
    python -m bench.contention --quick    # shorter windows

Each configuration runs in fresh processes: one job alone, then two identical jobs started
together. Jobs: scoring (score_records at the default K on 4,096-record batches, as many as fit
in a fixed window: records/s) and training (a 2,000-row synthetic table, fixed epochs: seconds).
OpenMP (libgomp) settings for idle threads: its default, 300,000 spins before sleeping (what
vaewatch ran with before), OMP_WAIT_POLICY=PASSIVE (sleep at once), and short spins of 3,000
and 1,000; the vaewatch command sets 1,000 (vaewatch/model/process.py). Threads: the cores this
process may use (model/threads.py), as vaewatch sets them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from bench import harness
from vaewatch.model import defaults


def child(job: str, seconds: float) -> dict:
    import torch

    from vaewatch.model import threads  # the OpenMP setting comes from this process's env

    threads.apply(int(os.environ.get("VAEWATCH_BENCH_THREADS", 0)) or threads.threads_for(1))
    if job == "score":
        from bench.datasets import model_and_batch
        from vaewatch.model.estimation.estimators import score_records

        model, x, mask = model_and_batch(4096, torch.device("cpu"))
        score_records(model, x, mask, log_std=None, k=defaults.K)  # warm-up
        started, records = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            score_records(model, x, mask, log_std=None, k=defaults.K)
            records += 4096
        elapsed = time.perf_counter() - started
        return {"rate": records / elapsed, "unit": "records/s"}
    from vaewatch.model.data.features import FeatureSpec
    from vaewatch.model.network.vae import VAE, VAEConfig
    from vaewatch.model.synthetic import LABEL_COLUMNS, transactions
    from vaewatch.model.training.loop import TrainConfig, train

    table = transactions(2000, seed=3)
    spec = FeatureSpec.fit(table, exclude=LABEL_COLUMNS)
    enc = spec.encode(table)
    epochs = max(2, int(seconds // 2))
    config = TrainConfig(epochs=epochs, patience=epochs, device="cpu", min_steps_per_epoch=50)
    started = time.perf_counter()
    train(VAE(VAEConfig.for_spec(spec)), enc.x[enc.ok], enc.mask[enc.ok], config)
    elapsed = time.perf_counter() - started
    return {"rate": epochs / elapsed, "unit": "epochs/s"}


POLICIES = {
    # libgomp's default: idle threads spin 300,000 times before sleeping
    "spin 300k (torch's default)": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "300000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": ""},
    "spin 3k": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "3000"},
    "spin 1k": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "1000"},
}


def run(job: str, policy: str, copies: int, seconds: float) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in POLICIES[policy]}
    env.update({k: v for k, v in POLICIES[policy].items() if v})
    env["VAEWATCH_BENCH_POLICY_SET"] = "1"
    command = harness.child_command("contention", "--child", job, "--seconds", str(seconds))
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, cwd=harness.ROOT)
        for _ in range(copies)
    ]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in processes]


def main() -> None:
    parser = harness.parser(__doc__, quick="a shorter run")
    parser.add_argument("--child", choices=["score", "train"])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--policy", action="append", choices=sorted(POLICIES), help="only these")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seconds)))
        return
    harness.start(args, "contention")
    seconds = 4.0 if args.quick else 10.0
    print(f"{os.cpu_count()} cores; each window {seconds:.0f} s\n")
    print("| job | OpenMP idle threads | alone | each of two at once | two at once / alone |")
    print("|---|---|---:|---:|---:|")
    for job in ("score", "train"):
        for policy in args.policy or POLICIES:
            alone = run(job, policy, 1, seconds)[0]
            pair = run(job, policy, 2, seconds)
            each = sum(r["rate"] for r in pair) / 2
            unit = alone["unit"]
            print(
                f"| {job} | {policy} | {alone['rate']:,.1f} {unit} | {each:,.1f} {unit} | "
                f"{each / alone['rate']:.2f} |"
            )


if __name__ == "__main__":
    main()
