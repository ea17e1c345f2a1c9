"""Airflow DAGs for vaewatch: retrain weekly, score nightly.

Each task runs the `vaewatch` CLI (installed in the worker's environment or its image), so the
DAG holds no model code. `nightly` is idempotent, so Airflow's retries and backfills are safe:
a retried or re-run day replaces its partition, never duplicates it.
"""

from __future__ import annotations

import datetime as dt

from airflow import DAG
from airflow.operators.bash import BashOperator

MODEL = "models:/transactions@champion"
# The command lines, kept as data so tests can check them against the real CLI.
TRAIN_COMMAND = [
    "vaewatch", "train",
    "--data", "/data/events/dt=*/*.parquet",
    "--model-name", "transactions",
    "--id-column", "record_id",
    "--exclude", "event_time",
    "--alias", "candidate",
]  # fmt: skip
NIGHTLY_COMMAND = [
    "vaewatch", "nightly",
    "--date", "{{ ds }}",
    "--input-root", "/data/events",
    "--output-root", "/data/scores",
    "--model", MODEL,
]  # fmt: skip

DEFAULTS = {
    "owner": "data-platform",
    "retries": 3,
    "retry_delay": dt.timedelta(minutes=10),
    "retry_exponential_backoff": True,
    "env": {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"},
    "append_env": True,
}

with DAG(
    dag_id="vaewatch_train_weekly",
    schedule="0 4 * * 0",
    start_date=dt.datetime(2026, 1, 4, tzinfo=dt.timezone.utc),
    catchup=False,
    default_args=DEFAULTS,
    tags=["vaewatch"],
) as train_dag:
    BashOperator(task_id="train", bash_command=" ".join(f"'{a}'" for a in TRAIN_COMMAND))

with DAG(
    dag_id="vaewatch_score_nightly",
    schedule="30 2 * * *",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=True,  # backfills are safe: each day is replaced atomically
    max_active_runs=1,  # one day at a time: runs of the same day would wait on its lock
    default_args=DEFAULTS,
    tags=["vaewatch"],
) as nightly_dag:
    BashOperator(
        task_id="score",
        # {{ ds }} is the run's logical date; quoted so Jinja's output stays one argument
        bash_command=" ".join(f"'{a}'" for a in NIGHTLY_COMMAND),
        execution_timeout=dt.timedelta(hours=6),
    )
