"""The old import paths of the modules that moved in 0.2.0 keep working for one release, with a
DeprecationWarning naming the new path, and serve the very same objects."""

import importlib
import subprocess
import sys
import warnings

import pytest

MOVED = {
    "vaewatch.model.vae": ("vaewatch.model.network.vae", "VAE"),
    "vaewatch.model.categorical": ("vaewatch.model.network.categorical", "layout"),
    "vaewatch.model.fused": ("vaewatch.model.network.fused", "__doc__"),
    "vaewatch.model.estimators": ("vaewatch.model.estimation.estimators", "score_records"),
    "vaewatch.model.reductions": ("vaewatch.model.estimation.estimators", "replicate_error"),
    "vaewatch.model.noise": ("vaewatch.model.estimation.noise", "noise"),
    "vaewatch.model.proposal": ("vaewatch.model.estimation.proposal", "__doc__"),
    "vaewatch.model.attribution": ("vaewatch.model.estimation.attribution", "EXPLAINED_SHARE"),
    "vaewatch.model.columns": ("vaewatch.model.data.columns", "__doc__"),
    "vaewatch.model.features": ("vaewatch.model.data.features", "FeatureSpec"),
    "vaewatch.model.training_data": ("vaewatch.model.data.training_data", "__doc__"),
    "vaewatch.model.fit": ("vaewatch.model.training.fit", "fit"),
    "vaewatch.model.sizing": ("vaewatch.model.training.sizing", "capacity"),
    "vaewatch.model.drift": ("vaewatch.model.calibration.drift", "__doc__"),
    "vaewatch.model.registry.notices": ("vaewatch.model.registry", "registration_notices_off"),
}
# modules whose name is a package now: their names resolve from the module that holds them
BECAME_PACKAGES = {
    "vaewatch.model.data": ("vaewatch.model.data.inputs", "resolve_files"),
    "vaewatch.model.training": ("vaewatch.model.training.loop", "TrainConfig"),
    "vaewatch.model.calibration": ("vaewatch.model.calibration.scores", "Calibration"),
}


def _fresh(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done.stderr


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_warns_and_serves_the_new_module(old):
    new, name = MOVED[old]
    # importing it in a fresh process with warnings as errors fails, naming the new path
    assert f"moved to {new}" in _fresh(f"import {old}")
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    if name != "__doc__":
        assert getattr(module, name) is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("old", sorted(BECAME_PACKAGES))
def test_a_module_that_became_a_package_still_serves_its_names(old):
    new, name = BECAME_PACKAGES[old]
    package = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{new}.{name}".replace(".", r"\.")):
        value = getattr(package, name)
    assert value is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="no_such_name"):
        package.no_such_name  # noqa: B018


def test_the_code_itself_imports_nothing_from_an_old_path():
    """vaewatch's own modules and the CLI import without a DeprecationWarning."""
    code = (
        "import vaewatch.jobs.cli, vaewatch.jobs.train, vaewatch.jobs.demo, vaewatch.jobs.report,"
        " vaewatch.jobs.nightly, vaewatch.jobs.query, vaewatch.jobs.models,"
        " vaewatch.pipeline.score, vaewatch.pipeline.inference, vaewatch.model.registry"
    )
    assert "Error" not in _fresh(code), _fresh(code)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        from vaewatch.model.data import columns  # a submodule of a package: no warning

        assert columns.__name__ == "vaewatch.model.data.columns"


def test_each_set_of_choices_is_one_enum_that_the_cli_and_the_checks_share():
    """The CLI's click.Choice lists are the enums' values, and the model's checks name the
    field, the value and the same choices."""
    from vaewatch.jobs.cli import main
    from vaewatch.model.choices import FlagRule, Missingness, Objective, Precision, TrainingProfile
    from vaewatch.model.errors import UserError

    by_option = {
        "--flag-rule": FlagRule,
        "--precision": Precision,
        "--objective": Objective,
        "--missingness": Missingness,
        "--training-profile": TrainingProfile,
    }
    seen = set()
    for command in main.commands.values():
        for param in command.params:
            for opt in param.opts:
                if opt in by_option:
                    assert tuple(param.type.choices) == by_option[opt].values(), opt
                    seen.add(opt)
    assert seen == set(by_option)
    with pytest.raises(UserError, match="objective must be one of elbo, iwae, got 'elbow'"):
        Objective.check("objective", "elbow")
    assert FlagRule.check("flag_rule", "any") == "any" and FlagRule.ANY == "any"


@pytest.mark.parametrize(
    "module, alias, name",
    [
        ("vaewatch.model.estimation.estimators", "DEFAULT_K", "K"),
        ("vaewatch.model.calibration.scores", "DEFAULT_THRESHOLD_QUANTILE", "THRESHOLD_QUANTILE"),
        ("vaewatch.model.data.features", "DEFAULT_MAX_CATEGORIES", "MAX_CATEGORIES"),
        ("vaewatch.model.registry", "DEFAULT_ALIAS", "ALIAS"),
        ("vaewatch.pipeline.transforms", "DEFAULT_BATCH_SIZE", "SCORE_BATCH_SIZE"),
    ],
)
def test_a_default_has_one_name_and_the_old_alias_warns(module, alias, name):
    from vaewatch.model import defaults

    with pytest.warns(DeprecationWarning, match=f"vaewatch.model.defaults.{name}"):
        value = getattr(importlib.import_module(module), alias)
    assert value == getattr(defaults, name)


def test_the_resolved_settings_type_folded_into_the_overrides_warns():
    """0.1.0 resolved ScoringOverrides into a ScoringSettings; the resolved overrides are it now:
    every field filled in from the model, and the threshold the model's calibration gives."""
    from vaewatch.model import scoring

    with pytest.warns(DeprecationWarning, match="scoring.ScoringOverrides"):
        assert scoring.ScoringSettings is scoring.ScoringOverrides
