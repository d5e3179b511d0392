"""The files a user reads before the code: licence, citation, and links that resolve."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_licence_and_citation_agree_with_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert project["license"] == cff["license"] == "Apache-2.0"
    assert str(cff["version"]) == project["version"]
    # The fields CFF 1.2.0 requires, and the paper the software reproduces.
    assert cff["cff-version"] == "1.2.0" and cff["message"] and cff["title"] and cff["authors"]
    paper = cff["preferred-citation"]
    assert paper["title"] == "Big Self-Supervised Models are Strong Semi-Supervised Learners"
    assert paper["year"] == 2020 and paper["authors"][0]["family-names"] == "Chen"


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = [f"{page.relative_to(ROOT)} -> {target}"
              for page in pages
              for target in LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert not broken, broken
    readme = (ROOT / "README.md").read_text()
    for doc in ("docs/data.md", "LICENSE", "CITATION.cff"):
        assert f"]({doc})" in readme, doc
