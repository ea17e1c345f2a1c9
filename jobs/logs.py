"""Where the operator's log goes: stderr, as text or one JSON object per line, at a level set by
`-v`/`-q`. vaewatch's own loggers (progress, nightly's day lines) speak at INFO by default; the
libraries' (Beam, MLflow) only from WARNING unless `-v`."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MLFLOW_LEVEL = "MLFLOW_LOGGING_LEVEL"
# MLflow gives its logger a handler of its own, at the level this variable names (INFO unless
# set), when it is first imported: its INFO lines ("Successfully registered model ...") reached
# stderr under -q. A level the user set stays theirs.
_USER_MLFLOW_LEVEL = MLFLOW_LEVEL in os.environ
# ... and writes text lines through a handler of its own unless this says not to: under
# --log-format json its records go to ours instead, as JSON
MLFLOW_OWN_HANDLER = "MLFLOW_CONFIGURE_LOGGING"
_USER_MLFLOW_HANDLER = MLFLOW_OWN_HANDLER in os.environ


class _QuietBeamImports(logging.Filter):
    """Beam's GCP modules warn at import time when the GCP client libraries are absent; that
    is expected here and says nothing about the job, so it is kept off the user's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


class _OneLineBeamErrors(logging.Filter):
    """Beam logs a failing step's traceback before re-raising it; vaewatch turns the failures
    a user can cause (a corrupt file, a full disk) into one clear message, so the log keeps
    Beam's one-line summary and drops the stack. VAEWATCH_DEBUG=1 keeps it; an unexpected
    error still ends in its own traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not os.environ.get("VAEWATCH_DEBUG"):
            record.exc_info, record.exc_text = None, None
        return True


def install_log_filters() -> None:
    """The CLI's filters for Beam's noise (above); installed by the process that owns the log
    (the `vaewatch` command), never by importing vaewatch. Idempotent."""
    root = logging.getLogger()
    if not any(isinstance(f, _QuietBeamImports) for f in root.filters):
        root.addFilter(_QuietBeamImports())
    for name in ("apache_beam.runners.common", "apache_beam.runners.worker.sdk_worker"):
        named = logging.getLogger(name)
        if not any(isinstance(f, _OneLineBeamErrors) for f in named.filters):
            named.addFilter(_OneLineBeamErrors())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _Rewritten(logging.Formatter):
    """`formatter`'s text passed through `rewrite` (the CLI names a library's settings as its
    options: cli.as_options). The text, not the record: other handlers (a test's, a user's)
    see the record as the library wrote it."""

    def __init__(self, formatter: logging.Formatter, rewrite: Callable[[str], str]) -> None:
        super().__init__()
        self.formatter, self.rewrite = formatter, rewrite

    def format(self, record: logging.LogRecord) -> str:
        text = self.formatter.format(record)
        return self.rewrite(text) if "`" in text else text


def configure(verbosity: int, log_format: str, rewrite: Callable[[str], str] | None = None) -> None:
    """verbosity: -1 quiet, 0 default, 1 or more verbose; `rewrite`: applied to every message
    the handler writes."""
    install_log_filters()
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter if rewrite is None else _Rewritten(formatter, rewrite))
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "vaewatch", False):  # ours from an earlier call; others stay
            root.removeHandler(existing)
    handler.vaewatch = True
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbosity >= 1 else logging.WARNING)
    own = logging.DEBUG if verbosity >= 1 else logging.INFO if verbosity == 0 else logging.WARNING
    logging.getLogger("vaewatch").setLevel(own)
    if not _USER_MLFLOW_HANDLER:  # for an import still to come
        if log_format == "json":
            os.environ[MLFLOW_OWN_HANDLER] = "false"
        else:
            os.environ.pop(MLFLOW_OWN_HANDLER, None)
    level = logging.getLevelName(logging.INFO if verbosity >= 1 else logging.WARNING)
    if _USER_MLFLOW_LEVEL:
        level = os.environ[MLFLOW_LEVEL].upper()
    else:
        os.environ[MLFLOW_LEVEL] = level  # for an import still to come
    try:
        logging.getLogger("mlflow").setLevel(level)  # for one already done, or with no handler
    except ValueError:  # the user's MLFLOW_LOGGING_LEVEL is no level name: MLflow's own default
        logging.getLogger("mlflow").setLevel(logging.INFO)
