import pytest

from vaewatch.model.synthetic import LABEL_COLUMNS, transactions


@pytest.fixture(scope="session")
def transactions_table():
    return transactions(5_000, anomaly_rate=0.02, seed=0)


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """A model fitted on CPU to 6,000 synthetic transactions (8 epochs) and 8,000 held-out
    records: the precision tests' model, on CPU and on CUDA."""
    import pyarrow.parquet as pq

    from vaewatch.model.training.fit import FitConfig, fit
    from vaewatch.model.training.loop import TrainConfig

    folder = tmp_path_factory.mktemp("fitted")
    pq.write_table(transactions(6000, seed=11), folder / "train.parquet")
    config = FitConfig(
        id_column="record_id",
        exclude=[c for c in LABEL_COLUMNS if c != "record_id"],
        train=TrainConfig(epochs=8, device="cpu"),
    )
    return fit(str(folder), config).artifact, transactions(8000, seed=12)
