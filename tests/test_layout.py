"""The layering and naming rules of the code base, checked on the source itself.

There is no cap on a file's length: files end where a concept ends. A file past about 800 lines
is a prompt, in review, to look for a second concept in it."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "pipeline", "jobs")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _sources(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


def _offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _sources(folder)
        for name in sorted(_imports(path))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_model_imports_neither_beam_click_nor_the_cli():
    forbidden = ("apache_beam", "click", "vaewatch.jobs", "vaewatch.pipeline")
    assert _offenders("model", forbidden) == []


def test_pipeline_imports_neither_click_nor_the_cli():
    assert _offenders("pipeline", ("click", "vaewatch.jobs")) == []


def test_model_tests_do_not_reach_into_the_cli():
    assert _offenders("tests/model", ("vaewatch.jobs", "vaewatch.pipeline")) == []


def test_code_imports_itself_only_under_the_vaewatch_name():
    bare = tuple(PACKAGES)
    offenders = [o for folder in (*PACKAGES, "tests", "bench") for o in _offenders(folder, bare)]
    assert offenders == []


def test_installed_names_are_vaewatch_only(tmp_path):
    """From a neutral directory, the generic names are not importable; vaewatch.* is."""
    probe = (
        "import importlib\n"
        "for name in ('model', 'pipeline', 'jobs'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    raise SystemExit(f'{name} is importable')\n"
        "import vaewatch.model.contract, vaewatch.pipeline.commit, vaewatch.jobs.params\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
