"""Thread counts from the cores a process may use, and the OpenMP default vaewatch sets."""

import os
import subprocess
import sys

import pytest

from vaewatch.model import threads


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


def _cgroup(tmp_path, v2=None, quota=None, period=100_000):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if quota is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


def test_cgroup_v2_quota_caps_the_affinity_mask(tmp_path, eight_cores):
    assert threads.available_cores(_cgroup(tmp_path, v2="150000 100000")) == 2  # 1.5 CPUs
    assert threads.threads_for(2, tmp_path) == 1


def test_cgroup_v2_without_quota_leaves_the_affinity_mask(tmp_path, eight_cores):
    assert threads.available_cores(_cgroup(tmp_path, v2="max 100000")) == 8
    assert threads.threads_for(3, tmp_path) == 2


def test_cgroup_v1_quota(tmp_path, eight_cores):
    assert threads.available_cores(_cgroup(tmp_path, quota=400_000)) == 4
    other = tmp_path / "other"
    other.mkdir()
    assert threads.available_cores(_cgroup(other, quota=-1)) == 8  # -1: no quota


def test_no_cgroup_files_means_the_affinity_mask(tmp_path, eight_cores):
    assert threads.available_cores(tmp_path / "missing") == 8
    assert threads.threads_for(16, tmp_path / "missing") == 1  # never zero


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "1000"),  # vaewatch's default: a short spin
        ({"GOMP_SPINCOUNT": "50"}, "50"),  # the user's own value is kept
        ({"OMP_WAIT_POLICY": "ACTIVE"}, None),  # a chosen policy is not second-guessed
    ],
)
def test_short_openmp_spin_unless_the_user_chose(env, expected):
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    probe = (
        "import os; from vaewatch.model import process; process.tune(); "
        "print(os.environ.get('GOMP_SPINCOUNT'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env={**clean, **env}, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    assert out.stdout.strip() == str(expected)
