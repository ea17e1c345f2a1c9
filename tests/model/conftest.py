import pytest

from vaewatch.model.synthetic import transactions


@pytest.fixture(scope="session")
def transactions_table():
    return transactions(5_000, anomaly_rate=0.02, seed=0)
