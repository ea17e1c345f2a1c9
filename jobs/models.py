"""`vaewatch models`: what is registered, and moving an alias."""

from __future__ import annotations

import datetime as dt

from mlflow.exceptions import MlflowException

from vaewatch.model import registry
from vaewatch.model.errors import UserError

COLUMNS = [
    "name",
    "version",
    "aliases",
    "created",
    "val_iwae",
    "threshold",
    "kept_epoch",
    "data_rows",
    "fingerprint",
]


def list_versions(tracking_uri: str) -> tuple[list[str], list[tuple]]:
    client = registry.configure(tracking_uri)
    rows = []
    try:
        for model in sorted(client.search_registered_models(), key=lambda m: m.name):
            versions = client.search_model_versions(f"name = '{_quoted(model.name)}'")
            aliases = client.get_registered_model(model.name).aliases  # alias -> version
            for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
                metrics = client.get_run(v.run_id).data.metrics if v.run_id else {}
                created = dt.datetime.fromtimestamp(v.creation_timestamp / 1000, dt.timezone.utc)
                val_iwae, epochs = _kept_epoch(client, v.run_id, metrics)
                rows.append(
                    (
                        model.name,
                        str(v.version),
                        ",".join(sorted(a for a, n in aliases.items() if str(n) == str(v.version))),
                        created.strftime("%Y-%m-%d %H:%M"),
                        val_iwae,
                        metrics.get("calibration_threshold"),
                        epochs,
                        v.tags.get("data_rows", ""),
                        v.tags.get("data_fingerprint", ""),
                    )
                )
    except MlflowException as err:
        raise UserError(f"cannot list models at {tracking_uri!r}: {err.message}") from err
    return COLUMNS, rows


def _kept_epoch(client, run_id: str, metrics: dict) -> tuple[float | None, str | None]:
    """(the registered weights' validation IWAE, "EPOCH of RUN": the epoch whose weights were
    kept, of the epochs run; best_epoch -1, none chosen inside the KL warm-up, keeps the last).
    A run's `val_iwae` metric is its last epoch's, not necessarily the kept one's; runs logged
    before `best_val_iwae` and `epochs_run` existed are read from the per-epoch history."""
    if "best_epoch" not in metrics:
        return metrics.get("val_iwae"), None
    best = int(metrics["best_epoch"])
    if "best_val_iwae" in metrics:
        run = int(metrics["epochs_run"])
        return metrics["best_val_iwae"], f"{best if best >= 0 else run - 1} of {run}"
    history = sorted(client.get_metric_history(run_id, "val_iwae"), key=lambda m: m.step)
    if not history:
        return metrics.get("val_iwae"), None
    kept = history[best] if -len(history) <= best < len(history) else history[-1]
    return kept.value, f"{kept.step} of {len(history)}"


def promote(tracking_uri: str, name: str, version: str, alias: str) -> None:
    client = registry.configure(tracking_uri)
    try:
        client.get_model_version(name, version)
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as err:
        raise UserError(
            f"cannot point {alias!r} at version {version} of {name!r} at {tracking_uri!r}: "
            f"{err.message}; `vaewatch models` lists what exists"
        ) from err


def _quoted(name: str) -> str:
    return name.replace("'", "''")
