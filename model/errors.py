"""Errors a user can cause and fix. The CLI turns each into a one-paragraph message, exit 1."""


class UserError(ValueError):
    """Bad input, bad configuration or a missing model: the message names the thing, the value
    and the fix. Anything else that escapes is a bug and keeps its traceback."""


class DependencyUnavailable(UserError):
    """A service the job needs (the tracking server, an object store, a worker pool) did not
    answer, and nothing was committed: the same job may succeed later (the CLI exits 75)."""


def setting(name: str, value: object | None = None) -> str:
    """A setting as a message from the library names it: `name` or `name=value` in backticks,
    the keyword a Python caller passes (FitConfig(exclude=...), ScoreRecords.for_model(...)).
    The CLI shows each as its option instead (jobs/cli.py `as_options`): `exclude=amount` reads
    --exclude amount there, so one message serves both."""
    return f"`{name}`" if value is None else f"`{name}={value}`"
