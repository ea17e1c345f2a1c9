"""Real servers for the tests, each in its own process group on 127.0.0.1: started, waited
for, and stopped (SIGTERM, then SIGKILL) by the fixture that asked for them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_tool(name: str) -> str:
    """A console script installed beside this interpreter."""
    return str(Path(sys.executable).with_name(name))


@contextlib.contextmanager
def serve(command: list[str], ready: str | int, log_path: Path, timeout: float = 120, env=None):
    """Run `command` until the block ends; ready when `ready` (a URL) answers any HTTP status,
    or when `ready` (a port, for gRPC services) accepts a TCP connection on 127.0.0.1."""
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if _answers(ready):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"{command[0]} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield process
    finally:
        stop(process)
        log.close()


def _answers(ready: str | int) -> bool:
    try:
        if isinstance(ready, int):
            socket.create_connection(("127.0.0.1", ready), timeout=2).close()
        else:
            with urllib.request.urlopen(ready, timeout=2):
                pass
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False
    return True


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def s3_server(root: Path):
    """An S3-protocol server (moto's standalone server); yields the standard AWS environment
    variables a client needs to reach it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [venv_tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with serve(command, f"{url}/moto-api/", root / "moto.log"):
        yield {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }


@contextlib.contextmanager
def gcs_server(root: Path):
    """A GCS emulator (gcp-storage-emulator, in memory); yields STORAGE_EMULATOR_HOST, the
    variable Google's clients read to talk to one."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        venv_tool("gcp-storage-emulator"), "start",
        "--host", "127.0.0.1", "--port", str(port), "--in-memory",
    ]  # fmt: skip
    with serve(command, f"{url}/storage/v1/b", root / "gcs.log"):
        yield {"STORAGE_EMULATOR_HOST": url, "GOOGLE_CLOUD_PROJECT": "test"}


@contextlib.contextmanager
def mlflow_server(root: Path, backend: str | None = None, artifacts: str | None = None, env=None):
    """An MLflow tracking and registry server with proxied artifacts; yields its URL. Defaults:
    a SQLite backend and a local artifact folder under `root`."""
    port = free_port()
    command = [
        venv_tool("mlflow"), "server",
        "--backend-store-uri", backend or f"sqlite:///{root / 'backend.db'}",
        "--artifacts-destination", artifacts or str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with serve(command, f"{url}/health", root / "mlflow.log", env=env):
        yield url
