"""Named crash points for the reliability suite (tests/reliability/).

`point("commit:manifest")` does nothing unless the environment names that point:

    VAEWATCH_CRASH_AT=commit:manifest        # SIGKILL this process the first time it is reached
    VAEWATCH_CRASH_AT=score:batch@3          # ... the third time
    VAEWATCH_CRASH_MARK=/path/file           # first append the point's name there, so a test
                                             # can prove the kill happened where it meant to

SIGKILL, not an exception: nothing in the process gets to clean up, exactly as when the
kernel's OOM killer or a node preemption ends a job. The check is one dictionary lookup, so
the points stay in production code (the approach of etcd's and TiKV's failpoints).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

CRASH_ENV = "VAEWATCH_CRASH_AT"
MARK_ENV = "VAEWATCH_CRASH_MARK"

# Every point, in the order a run reaches them; the reliability suite kills at each one.
POINTS = (
    "launch:planned",  # model resolved and downloaded, inputs checked; nothing written yet
    "launch:staged",  # staging folder created, pipeline not started
    "read:batch",  # an input batch has been read, before it is scored
    "score:batch",  # a batch has been scored, before its rows go to the writers
    "write:scored",  # scored rows handed to the Parquet writer (temporary files open)
    "write:rejected",  # rejected rows handed to the rejected writer
    "commit:counted",  # every file final in staging and rows in = scored + rejected checked
    "commit:manifest",  # manifest written in staging, _SUCCESS not yet
    "commit:success",  # _SUCCESS written in staging, not yet published
    "commit:exchanged",  # published by the atomic exchange; previous output not yet deleted
    "nightly:day-committed",  # a nightly/backfill day committed, the next day not started
)

_hits: Counter = Counter()


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    name, _, nth = spec.partition("@")
    return name, int(nth or 1)


def point(name: str) -> None:
    target = _target()
    if target is None or target[0] != name:
        return
    _hits[name] += 1
    if _hits[name] < target[1]:
        return
    mark = os.environ.get(MARK_ENV)
    if mark:
        with open(mark, "a") as handle:
            handle.write(f"{name}@{_hits[name]}\n")
            handle.flush()
            os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
