"""The README and docs/ point only at what exists: links and images, make targets, pipeline modules, no path outside
the repository (a clone has nothing beside it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")   # [text](target) and ![alt](target)


def targets_of(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]   # not http:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_image_exists(page):
    missing = [t for t in targets_of(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.name}: {missing}"


def test_the_readme_names_no_path_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert not re.findall(r"(?<![\w.])\.\./", text)
    assert "shared/notes" not in text


def test_the_readmes_make_targets_and_modules_exist():
    text = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    defined = {name for line in re.findall(r"^([\w.-]+(?: [\w.-]+)*):", makefile, re.M) for name in line.split()}
    used = set(re.findall(r"`make ([\w-]+)", text)) | set(re.findall(r"^make ([\w-]+)", text, re.M))
    assert used and used <= defined, used - defined
    modules = set(re.findall(r"python -m pipeline\.(\w+)", text))
    assert modules and all((ROOT / "pipeline" / f"{m}.py").is_file() for m in modules), modules
