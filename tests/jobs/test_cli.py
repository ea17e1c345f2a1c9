"""CLI conventions, enforced: help everywhere, one env-var pattern, exit codes."""

import click
from click.testing import CliRunner

from vaewatch.jobs.cli import main
from vaewatch.jobs.params import ENV_PREFIX


def _commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


def test_every_command_and_option_has_help_and_env_var():
    for path, command in _commands(main):
        assert command.help, f"command {' '.join(path)} has no help"
        for param in command.params:
            if not isinstance(param, click.Option) or param.name == "help":
                continue
            assert param.help, f"{' '.join(path)} {param.opts} has no help"
            expected = (
                ENV_PREFIX + param.opts[0].lstrip("-").split("/")[0].replace("-", "_").upper()
            )
            # the vaewatch variable first; a tool's own (MLFLOW_TRACKING_URI) may follow it
            envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar)
            assert envvars[0] == expected, (
                f"{param.opts}: envvar {param.envvar}, expected {expected}"
            )


def test_env_var_is_read(monkeypatch):
    demo = main.commands["demo"]
    assert demo.make_context("demo", []).params["days"] == 4
    monkeypatch.setenv("VAEWATCH_DAYS", "3")
    assert demo.make_context("demo", []).params["days"] == 3
    assert demo.make_context("demo", ["--days", "5"]).params["days"] == 5  # the flag wins


def test_usage_error_is_exit_2_and_unwritable_workdir_is_exit_1(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["demo", "--days", "zero"]).exit_code == 2
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = runner.invoke(main, ["demo", "--workdir", str(blocker / "sub")])
    assert result.exit_code == 1
    assert "cannot create the demo directory" in result.output and "--workdir" in result.output
    assert "Traceback" not in result.output


def test_demo_end_to_end_small(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "demo",
            "--workdir",
            str(tmp_path),
            "--rows-per-day",
            "4000",
            "--days",
            "2",
            "--epochs",
            "12",
        ],
    )
    assert result.exit_code == 0, result.output
    auc = float(result.output.rsplit("ROC-AUC against the injected labels:", 1)[1].split()[0])
    assert auc > 0.9, result.output
    assert (tmp_path / "input" / "dt=2026-01-02" / "part-0.parquet").exists()
    assert (tmp_path / "scores" / "dt=2026-01-02" / "_SUCCESS").exists()  # nightly committed it
    assert (tmp_path / "report.html").stat().st_size > 50_000
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlruns").is_dir()
    assert "summary (vaewatch summary)" in result.output and "vaewatch top" in result.output
