"""Every deployment file parses, and every vaewatch command line in infra/ is accepted by the
real CLI (click's parser with the real command tree, required options and types included)."""

import ast
import json
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from vaewatch.jobs.cli import main

INFRA = Path(__file__).resolve().parents[2] / "infra"
SUBCOMMANDS = "|".join(sorted(main.commands))
COMMAND_LINE = re.compile(rf"(?:^|[\s/\"'])vaewatch\s+(?:{SUBCOMMANDS})\b[^\n>]*")


def _accepts(argv: list[str], env: dict, monkeypatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert argv[0] == "vaewatch", argv
    command = main.commands.get(argv[1])
    assert command is not None, f"unknown command in {argv}"
    with command.make_context(argv[1], list(argv[2:])) as ctx:  # raises on bad usage
        assert ctx.params


def _lines(path: Path) -> tuple[list[list[str]], dict]:
    """vaewatch command lines in a text file, and the environment the file itself sets."""
    text = path.read_text()
    env = dict(re.findall(r"^([A-Z_]+)=(\S+)$", text, re.M))
    env.update(re.findall(r"^Environment=([A-Z_]+)=(\S+)$", text, re.M))
    commands = []
    for match in COMMAND_LINE.finditer(text):
        line = match.group(0).strip(" /\"'")
        commands.append(shlex.split(line))
    return commands, env


def _yaml_commands(node) -> list[list[str]]:
    found = []
    if isinstance(node, dict):
        for value in node.values():
            found += _yaml_commands(value)
    elif isinstance(node, list):
        if node and node[0] == "vaewatch":
            found.append([str(v) for v in node])
        for value in node:
            found += _yaml_commands(value)
    return found


def test_every_yaml_and_json_file_parses():
    yamls = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert len(yamls) >= 2
    for path in yamls:
        assert [d for d in yaml.safe_load_all(path.read_text()) if d], path
    metadata = json.loads((INFRA / "dataflow" / "metadata.json").read_text())
    names = {p["name"] for p in metadata["parameters"]}
    assert {"input", "output", "model", "tracking_uri"} <= names


def test_kubernetes_and_compose_shapes():
    jobs = list(yaml.safe_load_all((INFRA / "kubernetes" / "cronjob.yaml").read_text()))
    assert {d["kind"] for d in jobs} == {"CronJob"}
    assert all(d["spec"]["concurrencyPolicy"] == "Forbid" for d in jobs)
    compose = yaml.safe_load((INFRA / "compose" / "docker-compose.yml").read_text())
    assert {"mlflow", "postgres", "minio"} <= set(compose["services"])
    mlflow = compose["services"]["mlflow"]
    assert mlflow["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "healthcheck" in mlflow and "pip install" not in str(mlflow["command"])


@pytest.mark.parametrize(
    "relative",
    ["cron/vaewatch.crontab", "systemd/vaewatch-nightly.service"],
)
def test_text_command_lines_are_accepted(relative, monkeypatch):
    commands, env = _lines(INFRA / relative)
    assert commands, f"no vaewatch command found in {relative}"
    for argv in commands:
        _accepts(argv, env, monkeypatch)


def test_kubernetes_command_lines_are_accepted(monkeypatch):
    documents = yaml.safe_load_all((INFRA / "kubernetes" / "cronjob.yaml").read_text())
    commands = [c for d in documents for c in _yaml_commands(d)]
    assert {c[1] for c in commands} == {"nightly", "train"}
    for argv in commands:
        _accepts(argv, {}, monkeypatch)


def test_airflow_dag_parses_and_its_commands_are_accepted(monkeypatch):
    tree = ast.parse((INFRA / "airflow" / "vaewatch_dag.py").read_text())
    constants = {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    model = ast.literal_eval(constants["MODEL"])
    for name in ("TRAIN_COMMAND", "NIGHTLY_COMMAND"):
        argv = [
            model if isinstance(e, ast.Name) and e.id == "MODEL" else ast.literal_eval(e)
            for e in constants[name].elts
        ]
        argv = [a.replace("{{ data_interval_start | ds }}", "2026-01-05") for a in argv]
        _accepts(argv, {}, monkeypatch)
    dag_ids = {
        kw.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "DAG"
        for kw in node.keywords
        if kw.arg == "dag_id"
    }
    assert dag_ids == {"vaewatch_train_weekly", "vaewatch_score_nightly"}


def test_dataflow_launcher_builds_an_accepted_command(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch", INFRA / "dataflow" / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    argv = launch.command(
        ["--input=gs://b/in/*.parquet", "--output=gs://b/out", "--model=models:/m@champion",
         "--tracking_uri=https://mlflow", "--k=128", "--project=p", "--region=r"]
    )  # fmt: skip
    assert argv[argv.index("--") + 1 :] == ["--project=p", "--region=r"]
    command = main.commands["score"]
    with command.make_context("score", argv[1:]) as ctx:
        assert ctx.params["runner"] == "DataflowRunner" and ctx.params["k"] == 128
        assert ctx.meta["beam_args"] == ("--project=p", "--region=r")


def test_a_broken_command_line_would_be_caught(monkeypatch):
    """Control: the checker rejects what the CLI rejects."""
    with pytest.raises(click.UsageError):
        _accepts(["vaewatch", "nightly", "--model", "m", "--input-root", "a"], {}, monkeypatch)
    with pytest.raises(click.BadParameter):
        _accepts(["vaewatch", "train", "--data", "d", "--model-name", "n", "--epochs", "x"], {},
                 monkeypatch)  # fmt: skip
