"""The release a user installs: `python -m build` makes a wheel and an sdist; the wheel, installed
into a fresh virtual environment with the lock as constraints and no source tree on the path,
runs `vaewatch --version` and `vaewatch demo`."""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from vaewatch.model.version import __version__

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "requirements" / "constraints.txt"  # the lock's pins, no hashes
RUN = {"capture_output": True, "text": True, "timeout": 1200}


def _torch_pin() -> str:
    import re

    return re.search(r"^TORCH\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend (setuptools) is in the locked environment already
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        cwd=out, **RUN,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_the_wheel_and_sdist_carry_the_package_and_the_version(dist):
    wheel = next(dist.glob(f"vaewatch-{__version__}-py3-none-any.whl"))
    sdist = next(dist.glob(f"vaewatch-{__version__}.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in (
        "model/version.py",
        "pipeline/score.py",
        "jobs/cli.py",
        "jobs/templates/report.html.j2",
    ):
        assert f"vaewatch/{module}" in names, module
    metadata = zipfile.ZipFile(wheel).read(f"vaewatch-{__version__}.dist-info/METADATA").decode()
    assert f"Version: {__version__}" in metadata
    assert "Requires-Dist: apache-beam" in metadata
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
    assert f"vaewatch-{__version__}/pyproject.toml" in members
    assert f"vaewatch-{__version__}/model/version.py" in members


def test_the_wheel_runs_the_demo_in_a_fresh_venv(dist, tmp_path):
    wheel = next(dist.glob("vaewatch-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet"]
    for step in ([*pip, _torch_pin()], [*pip, "-c", str(CONSTRAINTS), str(wheel)]):
        done = subprocess.run(step, **RUN)
        assert done.returncode == 0, done.stderr[-3000:]
    # outside the source tree, with nothing of it on the path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [python, "-c", "import vaewatch.model, sys; print(vaewatch.model.__file__)"],
        cwd=tmp_path, env=env, **RUN,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr

    vaewatch = str(venv / "bin" / "vaewatch")
    version = subprocess.run([vaewatch, "--version"], cwd=tmp_path, env=env, **RUN)
    assert version.returncode == 0, version.stderr
    line = version.stdout.strip()
    assert line.startswith(f"vaewatch {__version__} (torch "), line
    for library in ("apache-beam", "mlflow", "pyarrow"):
        assert f"{library} " in line and "not installed" not in line, line

    demo = subprocess.run(
        [vaewatch, "demo", "--workdir", str(tmp_path / "demo")], cwd=tmp_path, env=env, **RUN
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "ROC-AUC against the injected labels" in demo.stdout
