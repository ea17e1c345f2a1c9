import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from vaewatch.model.synthetic import LABEL_COLUMNS, segmented, transactions

TRAIN_EXCLUDE = tuple(c for c in LABEL_COLUMNS if c != "record_id")


def write_days(root: Path, days: int, rows: int, anomaly_rate: float, seed: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(days):
        table = transactions(rows, anomaly_rate=anomaly_rate, seed=seed + i, first_id=i * rows)
        pq.write_table(table, root / f"part-{i}.parquet", row_group_size=2_000)
    return root


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A working directory with training data, a scoring day and a local MLflow (SQLite) store.
    MLflow writes ./mlruns relative to the working directory, so tests run from here."""
    root = tmp_path_factory.mktemp("workspace")
    write_days(root / "train", days=3, rows=5_000, anomaly_rate=0.005, seed=100)
    write_days(root / "holdout", days=1, rows=5_000, anomaly_rate=0.05, seed=200)
    return root


@pytest.fixture(scope="session")
def trained(workspace):
    """One model trained and registered through the training job (shared by the tests)."""
    from vaewatch.jobs.train import TrainJob, run
    from vaewatch.model import registry
    from vaewatch.model.training.fit import FitConfig
    from vaewatch.model.training.loop import TrainConfig

    previous = Path.cwd()
    os.chdir(workspace)
    try:
        job = TrainJob(
            data=str(workspace / "train" / "*.parquet"),
            model_name="transactions",
            tracking_uri=registry.default_tracking_uri(workspace),
            fit=FitConfig(
                id_column="record_id",
                exclude=TRAIN_EXCLUDE,
                train=TrainConfig(epochs=25, seed=0, device="cpu"),
            ),
            progress=False,
        )
        outcome = run(job, echo=lambda _: None)
    finally:
        os.chdir(previous)
    return job, outcome


@pytest.fixture
def in_workspace(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    return workspace


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def segmented_model(tmp_path_factory):
    """Kiosks and markets with enough validation rows for their own baselines, outlets too
    few (model/synthetic.py `segmented`), 8,000 rows, half held out."""
    from vaewatch.model.training.fit import FitConfig, fit
    from vaewatch.model.training.loop import TrainConfig

    folder = tmp_path_factory.mktemp("segmented")
    pq.write_table(segmented(8000, seed=1), folder / "train.parquet")
    train = TrainConfig(epochs=6, device="cpu", validation_fraction=0.5)
    config = FitConfig(id_column="record_id", exclude=["is_injected_anomaly"],
                       segment_column="store", train=train)  # fmt: skip
    return fit(str(folder), config).artifact
