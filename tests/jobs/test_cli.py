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


def _defaults(command: str, *args: str) -> dict:
    return main.commands[command].make_context(command, list(args)).params


def test_option_defaults_are_the_code_defaults():
    """What --help shows is what the code does: every default an option has equals the field
    of the dataclass (or constant) that receives it."""
    from dataclasses import asdict

    from vaewatch.model.artifact import ScoringDefaults
    from vaewatch.model.fit import FitConfig
    from vaewatch.model.training import TrainConfig
    from vaewatch.pipeline.plan import ScoreOptions

    train = _defaults("train", "--data", "d", "--model-name", "m")
    fit, train_config, scoring = FitConfig(), TrainConfig(), ScoringDefaults()
    for name, value in asdict(train_config).items():
        if name in train:
            assert train[name] == value, name
    not_options = {"min_delta", "validation_k", "validation_trim"}
    assert {n for n in asdict(train_config) if n not in train} == not_options
    for name in ("latent_dim", "max_categories", "min_category_count", "max_validation_rows"):
        assert train[name] == getattr(fit, name), name
    assert tuple(train["hidden"]) == tuple(fit.hidden)
    assert train["cache_mib"] * 2**20 == fit.cache_bytes
    assert train["threshold_quantile"] == fit.threshold_quantile
    assert (train["k"], train["seed"]) == (scoring.k, train_config.seed)
    assert train_config.validation_k == scoring.k  # validation IWAE at the scoring K
    from vaewatch.model import registry

    assert (train["experiment"], train["alias"]) == (
        registry.DEFAULT_EXPERIMENT,
        registry.DEFAULT_ALIAS,
    )
    options = ScoreOptions()
    for command, args in (
        ("score", ["--input", "i", "--output", "o", "--model", "m"]),
        ("nightly", ["--input-root", "i", "--output-root", "o", "--model", "m"]),
    ):
        given = _defaults(command, *args)
        for name in ("batch_size", "keep", "runner", "workers", "shards", "threads", "precision"):
            assert given[name] == getattr(options, name), (command, name)
        for name in ("k", "seed", "threshold_quantile"):
            assert given[name] == getattr(options.overrides, name), (command, name)
    demo = _defaults("demo")
    assert demo["k"] == scoring.k and demo["seed"] == train_config.seed
