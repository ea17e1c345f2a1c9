"""Airflow DAGs for vaewatch: retrain weekly, score nightly (Airflow 3; 2.x with the standard
provider installed).

Each task runs the `vaewatch` CLI (installed in the worker's environment or its image), so the
DAG holds no model code. `nightly` is idempotent, so Airflow's retries and backfills are safe:
a retried or re-run day replaces its partition, never duplicates it.

The nightly DAG's schedule is an explicit data-interval timetable: the run that starts at
02:30 UTC on day D covers [D-1 02:30, D 02:30), so `data_interval_start | ds` is D-1, the day
whose partition is complete. (On Airflow 3 a plain cron string is a trigger timetable whose
`ds` is the run's own day: its partition would still be filling.)
"""

from __future__ import annotations

import datetime as dt
import shlex

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG
from airflow.timetables.interval import CronDataIntervalTimetable

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
    "--date", "{{ data_interval_start | ds }}",
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
    BashOperator(task_id="train", bash_command=shlex.join(TRAIN_COMMAND))

with DAG(
    dag_id="vaewatch_score_nightly",
    schedule=CronDataIntervalTimetable("30 2 * * *", timezone="UTC"),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=True,  # backfills are safe: each day is replaced atomically
    max_active_runs=1,  # one day at a time: runs of the same day would wait on its lock
    default_args=DEFAULTS,
    tags=["vaewatch"],
) as nightly_dag:
    BashOperator(
        task_id="score",
        # shell-quoted; Jinja renders the date inside its quotes
        bash_command=shlex.join(NIGHTLY_COMMAND),
        execution_timeout=dt.timedelta(hours=6),
    )
