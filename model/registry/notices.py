"""MLflow's registration notices, kept out of vaewatch's log unless MLflow's INFO lines are on."""

from __future__ import annotations

import contextlib
import logging

from mlflow.utils import logging_utils

REGISTRATION_NOTICES = ("Successfully registered model", "Registered model ", "Created version")


@contextlib.contextmanager
def registration_notices_off():
    """MLflow prints "Successfully registered model 'NAME'." (or "Registered model 'NAME'
    already exists. ...") and "Created version 'N' of model 'NAME'." on stderr whatever its log
    level (its `eprint`): under -q, which promises only
    warnings and errors, and beside `vaewatch train`'s own "registered models:/NAME/N" line.
    Those two notices are dropped from MLflow's stream unless its INFO lines are on (-v);
    everything else it writes passes."""
    stream = logging_utils.MLFLOW_LOGGING_STREAM
    if logging.getLogger("mlflow").isEnabledFor(logging.INFO):
        yield
        return
    write, dropped = stream.write, [False]

    def filtered(text: str) -> None:
        if text.startswith(REGISTRATION_NOTICES):
            dropped[0] = True  # print() writes the line's newline in a call of its own
        elif dropped[0] and text == "\n":
            dropped[0] = False
        else:
            dropped[0] = False
            write(text)

    stream.write = filtered
    try:
        yield
    finally:
        del stream.write  # the class's own method again
