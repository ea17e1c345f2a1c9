"""MLflow: log a training run, register the model, resolve `models:/...` back to a model.

- Tracking: the URI the caller gives (the CLI: --tracking-uri or MLFLOW_TRACKING_URI), else a
  SQLite file `mlflow.db` in the working directory (`default_tracking_uri`).
- A training run logs every hyper-parameter and the data fingerprint as params, per-epoch
  diagnostics as metrics, plots and JSON as artifacts, and the model as an MLflow pyfunc model
  (models-from-code: `pyfunc_model.py` + the artifact folder; nothing pickled). The model
  carries the code it runs: `vaewatch/model/` is logged as MLflow code_paths, and its
  requirements list only published packages (torch, pyarrow, ...), so a serving host that
  installs the model's requirements.txt can load it without vaewatch from a package index.
- Registration adds a model version under the name, points an alias (default `champion`) at it
  and tags it with the data fingerprint and the vaewatch version.
- `resolve` turns `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/NAME` (latest) into
  one concrete version, once; `load` downloads that version and builds the model on a device.
  A local folder holding config.json + weights.safetensors is accepted too (no MLflow needed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ParamSchema, ParamSpec
from mlflow.utils import logging_utils

from vaewatch.model import defaults
from vaewatch.model._moved import deprecated_defaults
from vaewatch.model.artifact import CONFIG_FILE, ArtifactError, ModelArtifact, sha256_file
from vaewatch.model.errors import DependencyUnavailable, UserError, setting
from vaewatch.model.registry.pyfunc_model import ARTIFACT_KEY

ARTIFACT_DIGEST_TAG = "artifact_sha256"  # sha256 of the registered config.json
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_PACKAGE = Path(__file__).parents[1]  # the installed vaewatch.model package
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))?/?$")


# ------------------------------------------------------------ MLflow's registration notices
REGISTRATION_NOTICES = ("Successfully registered model", "Registered model ", "Created version")


@contextlib.contextmanager
def registration_notices_off():
    """MLflow prints "Successfully registered model 'NAME'." (or "Registered model 'NAME'
    already exists. ...") and "Created version 'N' of model 'NAME'." on stderr whatever its log
    level (its `eprint`): under -q, which promises only
    warnings and errors, and beside `vaewatch train`'s own "registered models:/NAME/N" line.
    Those two notices are dropped from MLflow's stream unless its INFO lines are on (-v);
    everything else it writes passes."""
    stream = logging_utils.MLFLOW_LOGGING_STREAM
    if logging.getLogger("mlflow").isEnabledFor(logging.INFO):
        yield
        return
    write, dropped = stream.write, [False]

    def filtered(text: str) -> None:
        if text.startswith(REGISTRATION_NOTICES):
            dropped[0] = True  # print() writes the line's newline in a call of its own
        elif dropped[0] and text == "\n":
            dropped[0] = False
        else:
            dropped[0] = False
            write(text)

    stream.write = filtered
    try:
        yield
    finally:
        del stream.write  # the class's own method again


class RegistryError(UserError):
    """The tracking server refuses a request."""


class TrackingServerUnavailable(RegistryError, DependencyUnavailable):
    """The tracking server does not answer at all."""


class ModelNotFoundError(UserError):
    """No model at the given URI."""


def default_tracking_uri(directory: str | Path = ".") -> str:
    return f"sqlite:///{(Path(directory).absolute() / 'mlflow.db').as_posix()}"


REACH_ATTEMPTS = 3  # tries of the server's /health before giving up
REACH_TIMEOUT = 5.0  # seconds per try; the waits between tries are 1 s, then 2 s
_reachable: set[str] = set()


def check_reachable(tracking_uri: str, attempts: int = REACH_ATTEMPTS) -> None:
    """For an http(s) tracking URI, make sure a server answers before any real request, with a
    few quick tries. Without this, MLflow's own retry policy takes minutes to report a server
    that is down (measured: 8 min 17 s) and the error reads like a missing model."""
    if not tracking_uri.startswith(("http://", "https://")) or tracking_uri in _reachable:
        return
    url = tracking_uri.rstrip("/") + "/health"
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=REACH_TIMEOUT):
                _reachable.add(tracking_uri)
                return
        except urllib.error.HTTPError:
            _reachable.add(tracking_uri)  # it answered (auth, no /health route): reachable
            return
        except (urllib.error.URLError, OSError) as err:
            last = err
            if attempt + 1 < attempts:
                time.sleep(2**attempt)
    reason = getattr(last, "reason", last)
    raise TrackingServerUnavailable(
        f"cannot reach the MLflow tracking server at {tracking_uri!r} ({reason}; {attempts} "
        f"tries). Check {setting('tracking_uri')} (or MLFLOW_TRACKING_URI) and that the server "
        "is up; nothing was written."
    )


def configure(tracking_uri: str) -> MlflowClient:
    check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        # a database store checks its schema here, as the client opens it
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except MlflowException as err:
        mismatch = _schema_mismatch(tracking_uri, err)
        if mismatch is None:
            raise
        raise mismatch from err
    return client


_SCHEMA = re.compile(r"found version (\w+), but expected (\w+)")


def _schema_mismatch(tracking_uri: str, err: MlflowException) -> RegistryError | None:
    """A database store whose schema another MLflow version wrote: a configuration problem,
    named with both versions and the fix that applies (a newer client for a store written by a
    newer MLflow, `mlflow db upgrade` for an older store)."""
    found = _SCHEMA.search(str(err.message))
    if found is None:
        return None
    revision, expected = found.groups()
    migrations = Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions"
    known = {path.name.split("_")[0] for path in migrations.glob("*.py")}
    here = f"MLflow {mlflow.__version__} (schema {expected})"
    if revision not in known:
        return RegistryError(
            f"the MLflow store at {tracking_uri!r} has schema {revision}, written by a newer "
            f"MLflow than this environment's {here}. Use an MLflow at least as new as the one "
            "that wrote it (pip install --upgrade mlflow), or point vaewatch at another tracking "
            "store."
        )
    return RegistryError(
        f"the MLflow store at {tracking_uri!r} has schema {revision}, written by an older "
        f"MLflow than this environment's {here}. Back it up, then upgrade it in place: "
        f"mlflow db upgrade {tracking_uri}; or point vaewatch at another tracking store."
    )


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # registered model name ("" for a local folder)
    version: str  # concrete version number ("" for a local folder)
    run_id: str
    requested: str  # what the user asked for: models:/NAME@ALIAS, a path, ...
    local_path: str = ""  # set for a local folder

    @property
    def uri(self) -> str:
        """The pinned URI: models:/NAME/VERSION (or the folder's path)."""
        return self.local_path or f"models:/{self.name}/{self.version}"

    @property
    def label(self) -> str:
        """What the model_version output column holds: NAME/VERSION (or the folder's path)."""
        return self.local_path or f"{self.name}/{self.version}"


class TrainingRun:
    """An MLflow run for one training job; use as a context manager (a failure marks the run
    FAILED). Log params and epochs as they come, then `register` the artifact."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        artifact_location: str | None = None,
    ):
        """`artifact_location` is used only when the experiment is created (MLflow's default
        for a SQLite store is ./mlruns in the working directory)."""
        self.tracking_uri = tracking_uri
        self.client = configure(tracking_uri)
        try:
            if artifact_location and mlflow.get_experiment_by_name(experiment) is None:
                mlflow.create_experiment(experiment, artifact_location=artifact_location)
            mlflow.set_experiment(experiment)
        except MlflowException as err:
            raise RegistryError(
                f"cannot use experiment {experiment!r} at tracking URI {tracking_uri!r}: "
                f"{err.message}. Check {setting('tracking_uri')} (or MLFLOW_TRACKING_URI)."
            ) from err
        self._run_name = run_name
        self.run = None

    def __enter__(self) -> TrainingRun:
        self.run = mlflow.start_run(run_name=self._run_name)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        mlflow.end_run(status="FAILED" if exc_type else "FINISHED")

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def where(self) -> str:
        """The run's web page on a tracking server (the address MLflow itself prints), else
        "run ID" (a SQLite or file store has no web page)."""
        uri = urllib.parse.urlsplit(str(self.tracking_uri or ""))
        if uri.scheme not in ("http", "https"):
            return f"run {self.run_id}"
        # never a user:password@ from the URI into a log line
        base = uri._replace(netloc=uri.netloc.rpartition("@")[2], query="", fragment="")
        experiment = self.run.info.experiment_id
        return f"{base.geturl().rstrip('/')}/#/experiments/{experiment}/runs/{self.run_id}"

    def log_params(self, params: dict) -> None:
        """Flat str -> scalar params; long values are cut to MLflow's limit (the full values
        are in config.json)."""
        flat = {k: str(v)[:6000] for k, v in params.items()}
        items = list(flat.items())
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params(dict(items[start : start + 100]))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_files(self, files: dict[str, Path]) -> None:
        """files: artifact subdirectory -> local file."""
        for subdir, path in files.items():
            mlflow.log_artifact(str(path), artifact_path=subdir or None)

    def register(
        self,
        artifact: ModelArtifact,
        model_name: str,
        *,
        alias: str = defaults.ALIAS,
        tags: dict | None = None,
        pip_requirements: list[str] | None = None,
    ) -> ResolvedModel:
        """Log the pyfunc model, register a new version under `model_name`, point `alias` at
        it and tag it. Returns the concrete version."""
        with tempfile.TemporaryDirectory(prefix="vaewatch-artifact-") as tmp:
            folder = artifact.save(Path(tmp) / ARTIFACT_KEY)
            code = _model_code(Path(tmp) / "code")
            # config.json carries the weights' sha256, so its own digest pins both files;
            # kept in the registry, apart from the artifact store it protects
            tags = {**(tags or {}), ARTIFACT_DIGEST_TAG: sha256_file(folder / CONFIG_FILE)}
            signature = ModelSignature(
                # params only: the input columns are checked by the model itself, which reports
                # missing columns and bad types by name (MLflow's enforcement would reject
                # nullable integers and dictionary columns that are valid here)
                params=ParamSchema(
                    [
                        ParamSpec(
                            "model_version",
                            "string",
                            artifact.metadata.get("model_label", model_name),
                        )
                    ]
                )
            )
            try:
                with warnings.catch_warnings(), registration_notices_off():
                    # no input example on purpose: it would run the model at logging time
                    warnings.filterwarnings("ignore", message=".*input example was not provided")
                    info = mlflow.pyfunc.log_model(
                        name="model",
                        python_model=str(PYFUNC_CODE),
                        artifacts={ARTIFACT_KEY: str(folder)},
                        registered_model_name=model_name,
                        pip_requirements=pip_requirements,
                        code_paths=[str(code / "vaewatch")],
                        signature=signature,
                    )
            except MlflowException as err:
                raise RegistryError(
                    f"could not log or register model {model_name!r} at {self.tracking_uri!r}: "
                    f"{err.message}"
                ) from err
        version = str(info.registered_model_version)
        self.client.set_registered_model_alias(model_name, alias, version)
        for key, value in tags.items():
            self.client.set_model_version_tag(model_name, version, key, str(value))
        return ResolvedModel(
            name=model_name,
            version=version,
            run_id=self.run_id,
            requested=f"models:/{model_name}@{alias}",
        )


def _model_code(root: Path) -> Path:
    """root/vaewatch/model/...: the package the pyfunc model imports, sources only. MLflow puts
    the folder given as code_paths on sys.path at load time, so `vaewatch.model` imports from
    the model itself (vaewatch is a namespace package: no __init__ is needed above it)."""
    shutil.copytree(
        MODEL_PACKAGE,
        root / "vaewatch" / "model",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    return root


def resolve(uri: str, tracking_uri: str) -> ResolvedModel:
    """Pin `uri` to one concrete model version (or accept a local model folder)."""
    path = Path(uri)
    if not uri.startswith("models:/"):
        if (path / CONFIG_FILE).is_file():
            return ResolvedModel("", "", "", requested=uri, local_path=str(path.absolute()))
        raise ModelNotFoundError(
            f"model {uri!r} is neither a models:/NAME@ALIAS (or models:/NAME/VERSION) URI nor a "
            f"folder with a vaewatch config.json; pass e.g. "
            f"{setting('model_uri', 'models:/transactions@champion')}"
        )
    match = MODEL_URI.match(uri)
    if match is None:
        raise ModelNotFoundError(
            f"model URI {uri!r} is malformed; use models:/NAME@ALIAS, models:/NAME/VERSION or "
            "models:/NAME"
        )
    name, alias, version = match.group("name", "alias", "version")
    client = configure(tracking_uri)
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        elif version is not None:
            mv = client.get_model_version(name, version)
        else:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ModelNotFoundError(
                    f"registered model {name!r} has no versions at {tracking_uri!r}; "
                    f"train one first: `vaewatch train` with {setting('model_name', name)}"
                )
            mv = max(versions, key=lambda v: int(v.version))
    except MlflowException as err:
        model_missing = False
        if alias is not None and err.error_code in ("INVALID_PARAMETER_VALUE", MISSING):
            model_missing = _raise_if_alias_missing(client, name, alias, uri, tracking_uri, err)
        # MLflow before 3.10 reports a missing model's alias as an invalid parameter
        if err.error_code != MISSING and not model_missing:
            raise RegistryError(
                f"the MLflow server at {tracking_uri!r} failed to resolve {uri!r}: {err.message}"
            ) from err
        known = _known_models(client)
        raise ModelNotFoundError(
            f"model {uri!r} not found at tracking URI {tracking_uri!r} ({err.message}). "
            f"Registered models there: {known or 'none'}. Train one first: `vaewatch train` "
            f"with {setting('model_name', name)}, or point {setting('tracking_uri')} (or "
            "MLFLOW_TRACKING_URI) at the right server."
        ) from err
    return ResolvedModel(name=name, version=str(mv.version), run_id=mv.run_id or "", requested=uri)


MISSING = "RESOURCE_DOES_NOT_EXIST"


def _raise_if_alias_missing(client, name, alias, uri, tracking_uri, err) -> bool:
    """MLflow reports an alias the model does not have as an invalid parameter, not as missing:
    where the model exists, say so and list the aliases it has. Returns whether the model itself
    is missing (the caller's message then)."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as missing:
        return missing.error_code == MISSING
    aliases = ", ".join(f"@{a} -> version {v}" for a, v in sorted(model.aliases.items()))
    raise ModelNotFoundError(
        f"model {uri!r}: registered model {name!r} at {tracking_uri!r} has no alias {alias!r} "
        f"(its aliases: {aliases or 'none'}). Point it at a version with `vaewatch models "
        f"promote {name} VERSION --alias {alias}`, or pass models:/{name}/VERSION"
    ) from err


def _known_models(client: MlflowClient) -> list[str]:
    try:
        return sorted(m.name for m in client.search_registered_models())
    except MlflowException:
        return []


_fetched: dict[tuple[str, str], Path] = {}  # (pinned URI, tracking URI) -> artifact folder


def fetch(resolved: ResolvedModel, tracking_uri: str, destination: str | Path) -> Path:
    """Download the pinned version and return the artifact folder (config.json inside).

    Once per process: a version is immutable (its digest is checked), so a later fetch of the
    same version reuses the folder while it exists. A Beam pipeline that builds a detector, a
    handler and a transform over one model downloads it once per worker process, not per use.
    MLflow's download progress bars stay off unless MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR says
    otherwise: a library's log on every worker is not the place for them."""
    if resolved.local_path:
        return Path(resolved.local_path)
    cached = _fetched.get((resolved.uri, tracking_uri))
    if cached is not None and (cached / CONFIG_FILE).is_file():
        return cached
    configure(tracking_uri)
    try:
        with _no_progress_bars():
            root = mlflow.artifacts.download_artifacts(
                artifact_uri=resolved.uri, dst_path=str(destination)
            )
    except MlflowException as err:
        raise RegistryError(
            f"cannot download {resolved.uri} from {tracking_uri!r}: {err.message}"
        ) from err
    candidates = sorted(Path(root).rglob(CONFIG_FILE))
    if not candidates:
        raise ModelNotFoundError(
            f"{resolved.uri} has no vaewatch {CONFIG_FILE}: it was not registered by vaewatch"
        )
    _verify_digest(resolved, candidates[0], tracking_uri)
    _fetched[(resolved.uri, tracking_uri)] = candidates[0].parent
    return candidates[0].parent


@contextlib.contextmanager
def _no_progress_bars():
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if name in os.environ:  # the user's choice
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _verify_digest(resolved: ResolvedModel, config: Path, tracking_uri: str) -> None:
    """The downloaded config.json must be the one registered (it pins the weights' digest)."""
    try:
        tags = configure(tracking_uri).get_model_version(resolved.name, resolved.version).tags
    except MlflowException as err:
        raise RegistryError(f"cannot read the tags of {resolved.uri}: {err.message}") from err
    expected = tags.get(ARTIFACT_DIGEST_TAG)
    if expected is None:
        return  # registered before digests were recorded
    found = sha256_file(config)
    if found != expected:
        raise ArtifactError(
            f"the artifact of {resolved.uri} was modified after registration: its {CONFIG_FILE} "
            f"has sha256 {found}, the registry recorded {expected} (tag {ARTIFACT_DIGEST_TAG}). "
            "Do not score with it: restore the artifact store, or train and register again."
        )


@dataclass
class LoadedModel:
    resolved: ResolvedModel
    artifact: ModelArtifact
    path: Path  # the local artifact folder


def load(uri: str, tracking_uri: str, destination: str | Path | None = None) -> LoadedModel:
    """Resolve once, download, read the artifact (no unpickling). Build the VAE on any device
    with `loaded.artifact.build(device)`."""
    resolved = resolve(uri, tracking_uri)
    destination = destination or tempfile.mkdtemp(prefix="vaewatch-model-")
    path = fetch(resolved, tracking_uri, destination)
    return LoadedModel(resolved=resolved, artifact=ModelArtifact.load(path), path=path)


# Names before 0.2.0 for defaults that live in vaewatch.model.defaults (until 0.3.0).
__getattr__ = deprecated_defaults(
    __name__, {"DEFAULT_EXPERIMENT": "EXPERIMENT", "DEFAULT_ALIAS": "ALIAS"}
)
