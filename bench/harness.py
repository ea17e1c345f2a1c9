"""What every benchmark shares: its command line, its record, timers and child processes.

- `parser(doc, quick=...)`: an ArgumentParser with the common options: `--quick` (the smaller
  run `make bench-quick` uses), `--json PATH` (write the run's record there) and `--out DIR`
  (write the record as DIR/NAME-DATE.json, and any figure the benchmark draws, into DIR).
- `start(args, name)`: the run's Record. What the benchmark prints is kept, and its `results`
  dict filled in; at exit (and at each `save()`, so an interrupted run keeps what it measured)
  the record is written where --json/--out say: the command, date, commit, machine, torch
  version, the printed output and the results.
- `best_of(fn, repeats)`: the shortest of `repeats` timed calls (the least disturbed one on a
  shared machine); `Stopwatch`: elapsed seconds of a block.
- `export(commit, work)`, `child_env(pythonpath)`, `child_command(NAME, ...)`, `run_child(...)`:
  another commit's code in a child process, for the benchmarks that compare against one.

Run benchmarks from the repository root as modules (`python -m bench.NAME`): the repository root
is then on sys.path, so `bench` and `tests` import as packages.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_failed: list = []  # what ended the run early (an exception, a failed child)


def parser(doc: str | None, *, quick: str) -> argparse.ArgumentParser:
    """The benchmark's ArgumentParser: its description is the docstring's first paragraph;
    `quick` says what --quick leaves out."""
    out = argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    out.add_argument("--quick", action="store_true", help=f"smaller (make bench-quick): {quick}")
    out.add_argument("--json", default=None, metavar="PATH", help="write the run's record here")
    out.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write the record as DIR/NAME-DATE.json, and any figure, into DIR",
    )
    return out


@dataclass
class Record:
    """One run of a benchmark: where it is written and what it found."""

    name: str
    args: argparse.Namespace
    results: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    # read when the run starts: at exit, importing (torch, for the machine) is too late
    commit: str = field(default_factory=lambda: commit())
    machine: dict = field(default_factory=lambda: machine())
    _printed: io.StringIO = field(default_factory=io.StringIO)

    def paths(self) -> list[Path]:
        paths = [Path(self.args.json)] if self.args.json else []
        if self.args.out:
            paths.append(Path(self.args.out) / f"{self.name}-{dt.date.today()}.json")
        return paths

    def figure(self, filename: str) -> Path | None:
        """Where a figure goes: DIR/filename under --out, else None."""
        return Path(self.args.out) / filename if self.args.out else None

    def save(self, finished: bool = False) -> None:
        entry = {
            "benchmark": self.name,
            "command": "python -m bench." + " ".join([self.name, *sys.argv[1:]]),
            "date": dt.date.today().isoformat(),
            "commit": self.commit,
            "machine": self.machine,
            "finished": finished,
            "seconds": round(time.perf_counter() - self.started, 1),
            "results": self.results,
            "printed": self._printed.getvalue(),
        }
        for path in self.paths():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(entry, indent=1, default=str) + "\n")


class _Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def start(args: argparse.Namespace, name: str) -> Record:
    """The run's Record, started after the arguments are parsed (a child process, which prints
    its JSON for the parent, starts none). From here stdout is kept in it as well as printed;
    the record is written when the process exits, with finished: false when it failed or was
    interrupted."""
    run = Record(name, args)
    sys.stdout = _Tee(sys.stdout, run._printed)
    hook = sys.excepthook

    def excepthook(kind, value, tb):
        _failed.append(kind)
        hook(kind, value, tb)

    sys.excepthook = excepthook

    def finish() -> None:
        run.save(finished=not _failed)
        for path in run.paths():
            print(f"record: {path}", file=sys.__stdout__)

    atexit.register(finish)
    return run


def commit() -> str:
    """The checkout's commit, with "+changes" when the tree differs from it ("" outside git)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+changes" if dirty else "")


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ------------------------------------------------------------------------------------ timers
def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of `fn`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class Stopwatch:
    """`with Stopwatch() as watch: ...`, then `watch.seconds`."""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *_exc) -> None:
        self.seconds = time.perf_counter() - self._start


# --------------------------------------------------------------------------- child processes
def export(commit: str, work: Path) -> Path:
    """`commit`'s tree as WORK/vaewatch (the repository root is the package); the folder to put
    first on PYTHONPATH."""
    target = work / "vaewatch"
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return work


def child_env(pythonpath: Path | None) -> dict:
    """The environment of a child process that imports the vaewatch under `pythonpath` (None:
    the installed one); the benchmark's own modules come from this checkout either way."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def child_command(name: str, *args: str) -> list[str]:
    """The command line of benchmark NAME run as a child (from the repository root)."""
    return [sys.executable, "-m", f"bench.{name}", *args]


def run_child(cmd: list[str], env: dict, code: str) -> subprocess.CompletedProcess:
    """A child process for `code`, run from the repository root; the end of its stderr in the
    message if it fails."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        _failed.append(code)
        raise SystemExit(
            f"the child process for {code} failed (exit {done.returncode}):\n{tail}\n"
            "an older --baseline may lack a module this bench's driver imports; try a later one"
        )
    return done


# modules of the layout by concept (0.2.0) whose 0.1.0 name is not their last component
_FLAT_NAMES = {
    "training.loop": "training",
    "data.inputs": "data",
    "calibration.scores": "calibration",
}


def model_module(name: str):
    """`vaewatch.model.NAME` ("estimation.estimators") of the importable vaewatch, or the same
    module under its 0.1.0 name ("estimators") when that vaewatch predates the layout by
    concept. A child running an older commit must ask this way: the installed (editable)
    vaewatch would otherwise serve it the modules the older code lacks, by name."""
    import importlib

    import vaewatch.model

    if (Path(vaewatch.model.__file__).parent / "estimation").is_dir():
        return importlib.import_module(f"vaewatch.model.{name}")
    flat = _FLAT_NAMES.get(name, name.rpartition(".")[2])
    return importlib.import_module(f"vaewatch.model.{flat}")


def last_json(done: subprocess.CompletedProcess) -> dict:
    """The JSON object a child printed on its last line."""
    return json.loads(done.stdout.strip().splitlines()[-1])
