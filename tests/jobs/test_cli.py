"""CLI conventions, enforced: help everywhere, one env-var pattern, exit codes."""

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from vaewatch.jobs.cli import main
from vaewatch.jobs.params import ENV_PREFIX, SHARED


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
            flag = param.opts[0].lstrip("-").split("/")[0].replace("-", "_").upper()
            scope = "" if param.name in SHARED else "_".join(path).upper() + "_"
            expected = ENV_PREFIX + scope + flag
            # the vaewatch variable first; a tool's own (MLFLOW_TRACKING_URI) may follow it
            assert param.envvar[0] == expected, f"{param.opts}: {param.envvar}, not {expected}"


def test_env_var_is_read(monkeypatch):
    demo = main.commands["demo"]
    assert demo.make_context("demo", []).params["days"] == 5
    monkeypatch.setenv("VAEWATCH_DEMO_DAYS", "3")
    assert demo.make_context("demo", []).params["days"] == 3
    assert demo.make_context("demo", ["--days", "6"]).params["days"] == 6  # the flag wins


REQUIRED = {
    "train": ["--data", "d", "--model-name", "m"],
    "score": ["--input", "i", "--output", "o", "--model", "m"],
    "nightly": ["--input-root", "i", "--output-root", "o", "--model", "m"],
    "query": ["out", "SELECT 1"],
    "top": ["out"],
    "summary": ["out"],
    "report": ["out"],
    "promote": ["name", "1"],
}
VALUES = {click.INT: "7", click.FLOAT: "0.5", click.STRING: "x", click.BOOL: "true"}


def _value(param: click.Option) -> str:
    """A valid value for the option that differs from its default."""
    if isinstance(param.type, click.Choice):
        return next(c for c in param.type.choices if c != param.default)
    if isinstance(param.type, click.IntRange | click.FloatRange):
        low = param.type.min if param.type.min is not None else 0
        return str(low + 1 if isinstance(param.type, click.IntRange) else 0.25)
    if param.is_flag:
        return "false" if param.default else "true"
    if param.name in ("hidden",):
        return "7,7"
    return VALUES.get(param.type, "a,b")


def test_each_variable_changes_only_its_own_commands_option(monkeypatch):
    """Set each command's variables one at a time: the option changes for that command, and no
    option of any other command moves."""
    commands = dict(_commands(main))

    def all_params():
        out = {}
        for path, command in commands.items():
            if isinstance(command, click.Group):
                continue
            args = REQUIRED.get(path[-1], [])
            out[path] = command.make_context(path[-1], list(args)).params
        return out

    baseline = all_params()
    for path, command in commands.items():
        for param in command.params:
            if not isinstance(param, click.Option) or param.name == "help" or param.required:
                continue
            variable = param.envvar[0]
            with monkeypatch.context() as m:
                m.setenv(variable, _value(param))
                now = all_params()
            moved = {(p, n) for p in now for n in now[p] if now[p][n] != baseline[p][n]}
            if param.name in SHARED:
                assert all(n == param.name for _, n in moved), (variable, moved)
            else:
                assert moved == {(path, param.name)}, (variable, moved)


@pytest.mark.parametrize(
    "args",
    [
        ["nightly", "--input-root", "i", "--output-root", "o", "--model", "m", "--catchup"],
        ["score", "--input", "i", "--output", "o", "--model", "m", "--jsn"],
        ["score", "--input", "i", "--output", "o", "--model", "m", "stray"],
    ],
)
def test_a_typo_is_a_usage_error_not_a_beam_option(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert ("No such option" in result.output) or ("unexpected extra argument" in result.output)


def _defaults(command: str, *args: str) -> dict:
    return main.commands[command].make_context(command, list(args)).params


def test_option_defaults_are_the_code_defaults():
    """What --help shows is what the code does: every default an option has equals the field
    of the dataclass (or constant) that receives it."""
    from dataclasses import asdict

    from vaewatch.model import defaults
    from vaewatch.model.artifact import ScoringDefaults
    from vaewatch.model.training.fit import FitConfig
    from vaewatch.model.training.loop import TrainConfig
    from vaewatch.pipeline.plan import ScoreOptions

    train = _defaults("train", "--data", "d", "--model-name", "m")
    fit, train_config, scoring = FitConfig(), TrainConfig(), ScoringDefaults()
    for name, value in asdict(train_config).items():
        if name in train:
            assert train[name] == value, name
    not_options = {"min_delta", "validation_k", "validation_trim"}
    assert {n for n in asdict(train_config) if n not in train} == not_options
    for name in (
        "latent_dim",
        "hidden",  # None: scaled to the training rows
        "max_categories",
        "min_category_count",
        "min_category_share",
        "missingness",
        "max_validation_rows",
        "flag_rule",
    ):
        assert train[name] == getattr(fit, name), name
    assert train["cache_mib"] * 2**20 == fit.cache_bytes
    assert train["threshold_quantile"] == fit.threshold_quantile
    # --k unset: chosen per model from the ladder, starting at the default
    assert (train["k"], train["seed"]) == (None, train_config.seed)
    assert fit.k_budget == defaults.K_BUDGET and scoring.k == defaults.K_LADDER[0]
    assert train_config.validation_k == scoring.k  # validation IWAE at the scoring K

    assert (train["experiment"], train["alias"]) == (defaults.EXPERIMENT, defaults.ALIAS)
    options = ScoreOptions()
    for command, args in (
        ("score", ["--input", "i", "--output", "o", "--model", "m"]),
        ("nightly", ["--input-root", "i", "--output-root", "o", "--model", "m"]),
    ):
        given = _defaults(command, *args)
        for name in ("batch_size", "keep", "runner", "workers", "shards", "threads", "precision"):
            assert given[name] == getattr(options, name), (command, name)
        for name in ("k", "seed", "threshold_quantile", "flag_rule"):
            assert given[name] == getattr(options.overrides, name), (command, name)
    demo = _defaults("demo")
    assert demo["k"] is None and demo["seed"] == train_config.seed  # K chosen, as train does


def test_log_levels_and_json_lines(capsys):
    import json
    import logging

    from vaewatch.jobs import logs

    own, beam = logging.getLogger("vaewatch.progress"), logging.getLogger("apache_beam.x")
    try:
        logs.configure(0, "json")
        own.info("progress: 10 rows read")
        beam.info("beam chatter")
        lines = capsys.readouterr().err.strip().splitlines()
        assert [json.loads(line)["message"] for line in lines] == ["progress: 10 rows read"]
        assert json.loads(lines[0])["logger"] == "vaewatch.progress"
        logs.configure(-1, "text")  # -q
        own.info("hidden")
        own.warning("shown")
        assert capsys.readouterr().err.strip().endswith("WARNING vaewatch.progress: shown")
        logs.configure(1, "text")  # -v: the libraries' info too
        beam.info("beam detail")
        assert "INFO apache_beam.x: beam detail" in capsys.readouterr().err
    finally:
        logs.configure(0, "text")
    result = CliRunner().invoke(main, ["-q", "--log-format", "json", "summary", "/nonexistent"])
    assert result.exit_code == 1 and "no committed vaewatch output" in result.output


def test_an_unexpected_crash_is_one_line_and_exit_70(monkeypatch, tmp_path):
    import tempfile

    from vaewatch.jobs import query

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def boom(output):
        raise ZeroDivisionError("a bug in vaewatch")

    monkeypatch.setattr(query, "connect", boom)
    result = CliRunner().invoke(main, ["summary", "anything"])
    assert result.exit_code == 70, result.output
    assert "vaewatch crashed (ZeroDivisionError: a bug in vaewatch)" in result.output
    assert "Traceback" not in result.output
    [report] = list(tmp_path.glob("vaewatch-crash-*.txt"))  # the traceback, kept
    assert "ZeroDivisionError" in report.read_text() and str(report) in result.output
    verbose = CliRunner().invoke(main, ["-v", "summary", "anything"])
    assert verbose.exit_code == 70 and "Traceback (most recent call last)" in verbose.output


def test_the_robust_training_options_reach_the_training_config(monkeypatch, tmp_path):
    """--robust-trim, --trim-weight, --robust-drop, --trim-from-start, --weight-prior, --refit and
    --refit-fence end up in the TrainConfig that `vaewatch train` runs (and the registered
    model's train_config)."""
    import vaewatch.jobs.train as train_module

    seen = {}

    def fake_run(job, echo):
        seen["train"] = job.fit.train
        raise SystemExit(0)

    monkeypatch.setattr(train_module, "run", fake_run)
    args = ["train", "--data", str(tmp_path), "--model-name", "m", "--robust-trim", "0.2"]
    args += ["--trim-weight", "0.2", "--robust-drop", "0.05", "--trim-from-start"]
    args += ["--weight-prior", "2", "--no-refit", "--refit-fence", "1.5"]
    CliRunner().invoke(main, args)
    train = seen["train"]
    assert train.refit is False and train.for_rows(5000).refit is False
    assert train.refit_fence == 1.5
    assert (train.robust_trim, train.trim_weight, train.robust_drop) == (0.2, 0.2, 0.05)
    assert train.trim_from_start and train.weight_prior == 2.0
    assert train.decay_per_record(100) == pytest.approx(0.02)
    result = CliRunner().invoke(
        main, ["train", "--data", "d", "--model-name", "m", "--trim-weight", "2"]
    )
    assert result.exit_code == 2 and "--trim-weight" in result.output
    # a profile by name; unset options take its values, whatever the table's size
    args = ["train", "--data", str(tmp_path), "--model-name", "m", "--training-profile", "large"]
    CliRunner().invoke(main, args)
    train = seen["train"]
    assert train.profile == "large" and train.robust_trim is None
    assert train.for_rows(50).robust_trim == 0.05 and not train.for_rows(50).trim_from_start
    assert train.for_rows(50).refit and train.refit is None
    result = CliRunner().invoke(main, [*args[:-1], "smal"])
    assert result.exit_code == 2 and "--training-profile" in result.output
    assert "'smal' is not one of 'auto', 'small', 'large'" in result.output


def _fresh_python(code: str, **environment: str):
    """`code` in a new interpreter (MLflow not yet imported) with none of this process's MLFLOW_
    variables, plus `environment`."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, **environment},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("user_level, info_shown", [(None, False), ("INFO", True)])
def test_mlflow_info_lines_follow_our_level_unless_the_user_set_one(user_level, info_shown):
    """MLflow gives its logger a handler of its own when it is first imported, at the level of
    MLFLOW_LOGGING_LEVEL (INFO unless set): after our default configuration, an MLflow imported
    later speaks from WARNING, unless the user's environment names a level."""
    done = _fresh_python(
        "import logging, sys\n"
        "from vaewatch.jobs import logs\n"
        "assert 'mlflow' not in sys.modules\n"
        "logs.configure(0, 'text')\n"
        "import mlflow\n"
        "print(logging.getLogger('mlflow').isEnabledFor(logging.INFO))\n",
        **({"MLFLOW_LOGGING_LEVEL": user_level} if user_level else {}),
    )
    assert done.stdout.strip() == str(info_shown)


def test_mlflow_warnings_are_json_lines_under_log_format_json():
    """With --log-format json every stderr line is a JSON object, MLflow's warnings included
    (by default MLflow installs a handler of its own, which writes text)."""
    import json

    done = _fresh_python(
        "import logging\n"
        "from vaewatch.jobs import logs\n"
        "logs.configure(0, 'json')\n"
        "import mlflow\n"
        "logging.getLogger('mlflow.tracking').warning('the server is slow')\n"
        "logging.getLogger('mlflow.tracking').info('not at the default level')\n"
    )
    lines = [json.loads(line) for line in done.stderr.strip().splitlines()]
    assert [(e["logger"], e["level"], e["message"]) for e in lines] == [
        ("mlflow.tracking", "WARNING", "the server is slow")
    ]


def test_library_messages_name_settings_and_the_cli_shows_options():
    """model/ and pipeline/ name a setting as the keyword a Python caller passes
    (`exclude=amount`); the CLI shows the option that sets it. Every setting the library names
    is an option of some command, so no message points a CLI user at a flag that is not there."""
    from vaewatch.jobs.cli import _options_by_name, as_options

    message = (
        "leave it out (`exclude=amount`), check `tracking_uri`, pass e.g. "
        "`model_uri=models:/t@champion`; `vaewatch train` with `model_name=t`; `no_such` stays"
    )
    assert as_options(message) == (
        "leave it out (--exclude amount), check --tracking-uri, pass e.g. "
        "--model models:/t@champion; `vaewatch train` with --model-name t; `no_such` stays"
    )
    root = Path(__file__).parents[2]
    named = set()
    for path in [*root.joinpath("model").rglob("*.py"), *root.joinpath("pipeline").rglob("*.py")]:
        named |= set(re.findall(r"""setting\(\s*["']([a-z_]+)["']""", path.read_text()))
    assert len(named) >= 12, named
    assert named <= set(_options_by_name()), named - set(_options_by_name())
