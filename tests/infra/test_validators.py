"""infra/ checked by real validators, each with a control that shows it rejects a broken file:
hadolint (Dockerfiles), the Kubernetes OpenAPI schema of a pinned version and the "restricted"
Pod Security Standard (CronJobs), yamllint (every YAML file), a real Airflow (the DAGs, in a
virtual environment of their own: Airflow's pins clash with vaewatch's), and the compose file
(`docker compose config` where docker has compose, else every referenced variable defined)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.33.0"
AIRFLOW_LOCK = REPO / "requirements" / "airflow.lock"  # apache-airflow and its pins (make lock)
AIRFLOW_VENV = REPO / ".venv-airflow"  # built once by the test (gitignored)
DOCKERFILES = [
    INFRA / "docker" / "Dockerfile",
    INFRA / "docker" / "Dockerfile.cuda",
    INFRA / "dataflow" / "Dockerfile",
    INFRA / "compose" / "mlflow.Dockerfile",
]


def _run(*argv, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)


# ------------------------------------------------------------------------------ Dockerfiles
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_dockerfiles_pass_hadolint(dockerfile):
    done = _run(str(BIN / "hadolint"), "--failure-threshold", "info", str(dockerfile))
    assert done.returncode == 0, done.stdout + done.stderr
    text = dockerfile.read_text()
    for image in re.findall(r"^FROM\s+(\S+)", text, re.M):
        name = image.split("@")[0]
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", f"{dockerfile.name}: {image} is not pinned by version"
    if "COPY model ./model" in text:  # vaewatch's images: dependencies before the source
        dependencies = re.search(r'pip install -c \S+ "\.\[', text)
        assert dependencies and dependencies.start() < text.index("COPY model ./model")
    if dockerfile.parent.name != "dataflow":  # Beam's SDK container starts as root by design
        users = re.findall(r"^USER\s+(\S+)", text, re.M)
        assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), (dockerfile, users)


def test_hadolint_rejects_a_broken_dockerfile(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:latest\nRUN apt-get install -y curl\nRUN pip install requests\n")
    done = _run(str(BIN / "hadolint"), "--failure-threshold", "info", str(broken))
    assert done.returncode != 0 and "DL3007" in done.stdout and "DL3013" in done.stdout


# ------------------------------------------------------------------------------- Kubernetes
def _kubernetes_validate(path: Path):
    return _run(str(BIN / "kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path))


def test_cronjobs_match_the_kubernetes_schema():
    done = _kubernetes_validate(INFRA / "kubernetes" / "cronjob.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == 2


def test_the_schema_check_rejects_an_unknown_field(tmp_path):
    documents = list(yaml.safe_load_all((INFRA / "kubernetes" / "cronjob.yaml").read_text()))
    documents[0]["spec"]["jobTemplate"]["spec"]["backofLimit"] = 2  # a typo
    broken = tmp_path / "cronjob.yaml"
    broken.write_text(yaml.safe_dump_all(documents))
    done = _kubernetes_validate(broken)
    assert done.returncode != 0 and "backofLimit" in done.stdout + done.stderr


RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def restricted_violations(pod: dict) -> list[str]:
    """The checks of the "restricted" Pod Security Standard (Kubernetes docs, Pod Security
    Standards, baseline + restricted) that a pod template can fail."""
    found = []
    pod_context = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            found.append(f"{flag} must be unset")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: type {kinds} is not allowed")
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        name, context = container["name"], container.get("securityContext", {})

        def setting(key, container_context=context):
            return container_context.get(key, pod_context.get(key))

        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities must drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: only NET_BIND_SERVICE may be added")
        if setting("runAsNonRoot") is not True:
            found.append(f"{name}: runAsNonRoot must be true")
        if setting("runAsUser") == 0:
            found.append(f"{name}: runAsUser must not be 0")
        seccomp = setting("seccompProfile") or {}
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if any(p.get("hostPort") for p in container.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


def _pods(path: Path) -> list[dict]:
    return [
        d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        for d in yaml.safe_load_all(path.read_text())
    ]


def test_cronjobs_meet_the_restricted_pod_security_standard():
    for pod in _pods(INFRA / "kubernetes" / "cronjob.yaml"):
        assert restricted_violations(pod) == []
        assert pod["securityContext"].get("fsGroup"), "volumes need an fsGroup"
        for container in pod["containers"]:
            assert container["resources"]["requests"].get("cpu"), container["name"]


def test_the_restricted_check_rejects_a_baseline_pod():
    pod = _pods(INFRA / "kubernetes" / "cronjob.yaml")[0]
    del pod["securityContext"]["seccompProfile"]
    pod["containers"][0]["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    problems = " | ".join(restricted_violations(pod))
    assert "seccompProfile" in problems and "drop ALL" in problems and "hostPath" in problems


# ------------------------------------------------------------------------------------- YAML
def test_yaml_passes_yamllint():
    done = _run(str(BIN / "yamllint"), "-c", str(REPO / ".yamllint.yaml"), str(INFRA), cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_yamllint_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: 1\na: 2\nb:   [1,2]\n")  # a duplicated key, bad spacing
    done = _run(str(BIN / "yamllint"), "-c", str(REPO / ".yamllint.yaml"), str(broken))
    assert done.returncode != 0 and "duplication" in done.stdout


# ---------------------------------------------------------------------------------- Airflow
@pytest.fixture(scope="module")
def airflow_python():
    """Airflow in a virtual environment of its own, from its own lock (its pins clash with
    vaewatch's), built once per version of that lock (about a minute)."""
    import hashlib

    digest = hashlib.sha256(AIRFLOW_LOCK.read_bytes()).hexdigest()[:16]
    stamp = AIRFLOW_VENV / f".installed-{digest}"
    if not stamp.exists():
        shutil.rmtree(AIRFLOW_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(AIRFLOW_VENV)], check=True)
        done = _run(str(AIRFLOW_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--require-hashes", "-r", str(AIRFLOW_LOCK))  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        stamp.touch()
    return str(AIRFLOW_VENV / "bin" / "python")


RENDER = """
import json, sys
import pendulum
from airflow.dag_processing.dagbag import DagBag
from airflow.timetables.base import TimeRestriction

bag = DagBag(dag_folder=sys.argv[1])
out = {"errors": {k: str(v)[-500:] for k, v in bag.import_errors.items()},
       "dags": sorted(bag.dag_ids)}
if "vaewatch_score_nightly" in bag.dags:
    dag = bag.dags["vaewatch_score_nightly"]
    task = dag.get_task("score")
    # the scheduled run that starts at 2026-01-06 02:30 UTC
    info = dag.timetable.next_dagrun_info(
        last_automated_data_interval=None,
        restriction=TimeRestriction(earliest=pendulum.datetime(2026, 1, 5, tz="UTC"),
                                    latest=None, catchup=True))
    out["run_after"] = info.run_after.isoformat()
    out["command"] = dag.get_template_env().from_string(task.bash_command).render(
        data_interval_start=info.data_interval.start, data_interval_end=info.data_interval.end)
    out["retries"] = task.retries
print(json.dumps(out))
"""


def _dagbag(python: str, folder: Path, tmp_path: Path) -> dict:
    import json

    env = dict(os.environ, AIRFLOW_HOME=str(tmp_path / "airflow"),
               AIRFLOW__CORE__LOAD_EXAMPLES="False")  # fmt: skip
    done = _run(python, "-c", RENDER, str(folder), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_airflow_imports_the_dags_and_renders_yesterday(airflow_python, tmp_path, monkeypatch):
    import shlex

    from tests.infra.test_infra import _accepts

    found = _dagbag(airflow_python, INFRA / "airflow", tmp_path)
    assert found["errors"] == {}
    assert found["dags"] == ["vaewatch_score_nightly", "vaewatch_train_weekly"]
    assert found["run_after"].startswith("2026-01-06T02:30")
    argv = shlex.split(found["command"])
    assert argv[argv.index("--date") + 1] == "2026-01-05"  # the complete day before the run
    assert found["retries"] == 3
    _accepts(argv, {}, monkeypatch)  # and the real vaewatch CLI accepts the rendered line


def test_airflow_reports_a_broken_dag(airflow_python, tmp_path):
    folder = tmp_path / "dags"
    folder.mkdir()
    text = (INFRA / "airflow" / "vaewatch_dag.py").read_text()
    broken = text.replace("airflow.providers.standard.operators.bash", "airflow.operators.nope")
    (folder / "vaewatch_dag.py").write_text(broken)
    found = _dagbag(airflow_python, folder, tmp_path)
    assert found["dags"] == [] and len(found["errors"]) == 1


# ---------------------------------------------------------------------------------- compose
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")


def compose_problems(compose_file: Path, env_file: Path) -> list[str]:
    """What `docker compose config` would refuse, checked without docker: a variable the file
    references but the env file does not define, a dependency on an undefined service, a
    build context that does not exist."""
    text = compose_file.read_text()
    defined = {
        line.split("=", 1)[0]
        for line in env_file.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    problems = [f"${{{v}}} is not defined in {env_file.name}"
                for v in sorted(set(VARIABLE.findall(text)) - defined)]  # fmt: skip
    services = yaml.safe_load(text)["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            if dependency not in services:
                problems.append(f"{name} depends on undefined service {dependency}")
        build = service.get("build")
        if build:
            context = compose_file.parent / build.get("context", ".")
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                problems.append(f"{name}: no Dockerfile at {context}")
    return problems


def _has_docker_compose() -> bool:
    return (
        shutil.which("docker") is not None and _run("docker", "compose", "version").returncode == 0
    )


def test_compose_file_is_complete(tmp_path):
    compose_file, env_file = (
        INFRA / "compose" / "docker-compose.yml",
        INFRA / "compose" / "env.example",
    )
    if _has_docker_compose():
        done = _run("docker", "compose", "--env-file", str(env_file), "-f", str(compose_file),
                    "config", "--quiet")  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert compose_problems(compose_file, env_file) == []


def test_the_compose_check_rejects_an_undefined_variable(tmp_path):
    compose_file = tmp_path / "docker-compose.yml"
    text = (INFRA / "compose" / "docker-compose.yml").read_text()
    compose_file.write_text(text.replace("${MLFLOW_DB_PASSWORD:?", "${MLFLOW_DB_PASWORD:?", 1))
    shutil.copy(INFRA / "compose" / "mlflow.Dockerfile", tmp_path / "mlflow.Dockerfile")
    problems = compose_problems(compose_file, INFRA / "compose" / "env.example")
    assert problems == ["${MLFLOW_DB_PASWORD} is not defined in env.example"]
