"""The lock (requirements/vaewatch.lock) is the tested set: it agrees with pyproject's ranges,
pins every package with hashes, leaves torch out (installed by version, CPU or CUDA build), and
is what the virtual environment, the images and the Flex Template install from (the images
through requirements/constraints.txt, the same pins without hashes)."""

import os
import re
import sys
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

import pytest
import tomllib
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "vaewatch.lock"
CONSTRAINTS = REPO / "requirements" / "constraints.txt"
AIRFLOW_LOCK = REPO / "requirements" / "airflow.lock"
DOCKERFILES = sorted((REPO / "infra").rglob("Dockerfile*"))
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def test_the_constraints_are_the_lock_without_hashes():
    """The images and the wheel install with `pip install -c requirements/constraints.txt`."""
    pins = [(name, v, str(marker)) for name, v, marker, _ in parse_lock(LOCK)]
    plain = [(name, v, str(marker)) for name, v, marker, _ in parse_lock(CONSTRAINTS)]
    assert plain == pins, "requirements/constraints.txt is stale: make lock"
    assert "--hash" not in CONSTRAINTS.read_text()


def parse_lock(path: Path) -> list[tuple[str, str, Marker | None, int]]:
    """(name, version, marker, number of hashes) per entry of a `uv pip compile` output."""
    entries, lines = [], path.read_text().splitlines()
    for i, line in enumerate(lines):
        match = ENTRY.match(line)
        if not match:
            continue
        hashes = 0
        for following in lines[i + 1 :]:
            if not following.startswith("    --hash="):
                break
            hashes += 1
        name, pinned, marker = match.groups()
        entries.append(
            (canonicalize_name(name), pinned, Marker(marker) if marker else None, hashes)
        )
    return entries


def environment(python: str) -> dict[str, str]:
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }


def pins_for(python: str) -> dict[str, str]:
    env = environment(python)
    pins: dict[str, str] = {}
    for name, pinned, marker, _ in parse_lock(LOCK):
        if marker is None or marker.evaluate(env):
            assert name not in pins, f"{name} is pinned twice for Python {python}"
            pins[name] = pinned
    return pins


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def declared() -> list[Requirement]:
    meta = project()
    found = [Requirement(r) for r in meta["dependencies"]]
    for extra in meta["optional-dependencies"].values():
        found += [Requirement(r) for r in extra]
    return found


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert match, f"Makefile sets no {name}"
    return match.group(1)


def test_every_entry_is_pinned_with_hashes():
    entries = parse_lock(LOCK)
    assert len(entries) > 100
    assert [name for name, _, _, hashes in entries if hashes == 0] == []


@pytest.mark.parametrize("python", PYTHONS)
def test_the_lock_satisfies_every_range_in_pyproject(python):
    """Every dependency of every extra is in the lock, at a version its range allows, on each
    Python the project supports (the lock is universal)."""
    pins, env = pins_for(python), environment(python)
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        if name == "torch" or (requirement.marker and not requirement.marker.evaluate(env)):
            continue
        assert name in pins, f"{requirement} is in pyproject.toml but not in the lock: make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"the lock pins {name}=={pins[name]}, outside pyproject's {requirement}: make lock"
        )


def test_torch_is_left_out_and_its_own_requirements_are_locked():
    pins = pins_for("3.11")
    assert "torch" not in pins and not any(name.startswith("nvidia-") for name in pins)
    torch_pin = makefile_variable("TORCH")
    torch_range = next(r for r in declared() if r.name == "torch")
    assert torch_range.specifier.contains(torch_pin.split("==")[1]), torch_pin
    listed = {
        canonicalize_name(Requirement(line).name)
        for line in (REPO / "requirements" / "torch-cpu.in").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    needed = {
        canonicalize_name(Requirement(r).name)
        for r in requires("torch") or []
        if "extra ==" not in r and not Requirement(r).name.startswith(("nvidia-", "triton"))
    }
    assert needed - listed == set(), "torch needs these: add them to requirements/torch-cpu.in"
    assert listed <= set(pins)


@pytest.mark.skipif(
    os.environ.get("VAEWATCH_UNLOCKED") == "1",
    reason="make test-latest / test-oldest install without the lock",
)
def test_this_environment_is_the_lock():
    """What the suite runs on is what the lock says (for this interpreter)."""
    env = environment(f"{sys.version_info.major}.{sys.version_info.minor}")
    env["python_full_version"] = ".".join(map(str, sys.version_info[:3]))
    wrong = []
    for name, pinned, marker, _ in parse_lock(LOCK):
        if marker is not None and not marker.evaluate(env):
            continue
        try:
            installed = version(name)
        except PackageNotFoundError:
            wrong.append(f"{name}: not installed (lock: {pinned})")
            continue
        if installed != pinned:
            wrong.append(f"{name}: {installed} installed, lock: {pinned}")
    assert wrong == [], "rebuild the virtual environment (make clean test):\n" + "\n".join(wrong)
    assert version("torch").split("+")[0] == makefile_variable("TORCH").split("==")[1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_image_installs_from_the_lock(dockerfile):
    text = dockerfile.read_text()
    assert "COPY requirements/constraints.txt" in text, dockerfile
    installs = [line for line in text.splitlines() if "pip install" in line]
    project_installs = [line for line in installs if '".[' in line or "pip install ." in line]
    assert project_installs, f"{dockerfile} installs no vaewatch"
    for line in project_installs:
        if "--no-deps" not in line:
            assert "-c requirements/constraints.txt" in line, line
    torch = [line for line in installs if "torch==" in line]
    assert torch and all(makefile_variable("TORCH") in line for line in torch), torch


def test_the_dataflow_image_runs_the_locked_beam():
    beam = pins_for("3.11")["apache-beam"]
    text = (REPO / "infra" / "dataflow" / "Dockerfile").read_text()
    assert f"FROM apache/beam_python3.11_sdk:{beam}" in text


def test_the_airflow_lock_pins_what_the_tests_install():
    pinned = {name: v for name, v, _, _ in parse_lock(AIRFLOW_LOCK)}
    wanted = Requirement(
        next(
            line
            for line in (REPO / "requirements" / "airflow.in").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        )
    )
    assert wanted.specifier.contains(pinned["apache-airflow"])
    assert all(hashes for _, _, _, hashes in parse_lock(AIRFLOW_LOCK))
