"""The documentation: the site builds in strict mode (a broken link, a page left out of the nav or a
stale API reference fails it), the CLI reference is generated from the click commands, and the
README stays a front page whose links resolve."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vaewatch.jobs.cli import main

REPO = Path(__file__).resolve().parents[1]
RUN = {"capture_output": True, "text": True, "timeout": 600}


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    # python -m: the console scripts folder stays off sys.path (its `vaewatch` script would
    # shadow the package for the API reader)
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=REPO, **RUN,
    )  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    done = _build(REPO / "mkdocs.yml", site)
    assert done.returncode == 0, done.stderr[-4000:]
    return site


def test_the_cli_reference_names_every_option_of_every_command(site):
    page = (site / "cli" / "index.html").read_text()
    missing = []
    for name, command in main.commands.items():
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt not in page:
                    missing.append(f"{name} {opt}")
    assert missing == []


def test_the_api_reference_documents_the_exported_names(site):
    import vaewatch.pipeline

    page = (site / "api" / "index.html").read_text()
    documented = [n for n in vaewatch.pipeline.__all__ if not n.isupper()]
    assert [n for n in documented if n not in page] == []
    assert "for_model" in page and "keep_large_blocks" in page


def test_a_broken_link_fails_the_build(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for page in (REPO / "docs").glob("*.md"):
        (docs / page.name).write_text(page.read_text())
    with (docs / "index.md").open("a") as index:
        index.write("\nSee [the missing page](no-such-page.md).\n")
    config = (REPO / "mkdocs.yml").read_text()
    config = config.replace("docs_dir: docs", f"docs_dir: {docs}")
    config = config.replace("  - mkdocs_hooks.py", f"  - {REPO / 'mkdocs_hooks.py'}")
    config = config.replace("paths: [build/api-src]", f"paths: [{REPO / 'build' / 'api-src'}]")
    (tmp_path / "mkdocs.yml").write_text(config)
    done = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-page.md" in done.stderr


def test_the_readme_is_a_front_page_whose_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert local, "the README links nowhere"
    assert [t for t in local if not (REPO / t).exists()] == []
