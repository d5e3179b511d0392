"""The files a user reads before the code: licence, citation, and links that resolve."""

import re
from pathlib import Path

import pytest
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


def _grid_text(cfg) -> tuple[str, str]:
    """A config's (supervised, fine-tuning) LR grids as docs/protocol.md writes them."""
    def text(grid) -> str:
        return ", ".join(f"{v:g}" for v in grid)

    if cfg.finetune.lr_grid:
        ft = text(cfg.finetune.lr_grid)
    elif any(v.base_lr is not None for v in cfg.finetune.per_fraction.values()):
        ft = "one LR per label fraction"
    else:
        ft = f"one LR ({cfg.finetune.optim.base_lr:g})"
    return text(cfg.supervised.lr_grid), ft


def test_the_lr_grids_quoted_in_the_protocol_are_the_presets():
    """Issue 36: docs/protocol.md quoted grids the code did not run."""
    import importlib

    from scaling.configure import load_config, resolve
    from studies.cli import build, parser

    text = (ROOT / "docs" / "protocol.md").read_text()
    block = text.split("<!-- lr-grids -->")[1].split("<!-- /lr-grids -->")[0]
    rows = {r[0]: (r[1], r[2]) for r in
            ([c.strip() for c in line.strip("|").split("|")]
             for line in block.strip().splitlines()[2:])}
    want = {f"configs/{n}.yaml": _grid_text(load_config(resolve(n)))
            for n in ("fmnist-cpu", "cifar10-gpu", "imagenet-gpu")}
    studies = {n: importlib.import_module(f"studies.{n}").STUDY
               for n in ("model_size", "head_depth", "distillation")}

    def preset(study: str, name: str) -> tuple[str, str]:
        defn = studies[study]
        return _grid_text(build(defn, parser(defn).parse_args(["--preset", name])).base)

    want["model_size --preset local"] = preset("model_size", "local")
    fmnist = {preset(s, "fmnist-cpu") for s in studies}
    assert len(fmnist) == 1  # the three findings studies share their grids
    want["model_size, head_depth, distillation --preset fmnist-cpu"] = fmnist.pop()
    assert rows == want


def test_the_analysis_docs_python_names_what_exists():
    """docs/analysis.md's example once imported a module that does not exist."""
    import importlib

    text = (ROOT / "docs" / "analysis.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        modules = {}
        for line in block.splitlines():
            m = re.match(r"from (\w+) import (.+)", line)
            if m:
                for name in m.group(2).split(","):
                    modules[name.strip()] = importlib.import_module(f"{m.group(1)}.{name.strip()}")
        for mod, attr in re.findall(r"\b(\w+)\.(\w+)\(", block):
            if mod in modules:
                assert hasattr(modules[mod], attr), f"{mod}.{attr}"


def _documented_commands() -> list[list[str]]:
    """Every `python -m MODULE` and `python DIR/SCRIPT.py` the README and docs/ show."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    found = sorted(set(re.findall(
        r"python (-m [A-Za-z_.]+|(?:studies|bench|analysis)/[a-z_]+\.py)", text)))
    return [c.split(" ") for c in found]


HELP_ALL = """
import contextlib, io, json, runpy, sys
out = {}
for command in json.loads(sys.argv[1]):
    buf = io.StringIO()
    sys.argv = [command[-1], "--help"]
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        try:
            if command[0] == "-m":
                runpy.run_module(command[1], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(command[0], run_name="__main__")
        except SystemExit as e:
            code = e.code or 0
        except Exception as e:  # a broken command: say which
            code = f"{type(e).__name__}: {e}"
    out[" ".join(command)] = [code, "usage:" in buf.getvalue()]
print(json.dumps(out))
"""


def test_every_documented_command_answers_help():
    """Issue 37: a documented command that no longer runs is a broken doc. All of them
    in one process (each would import torch on its own: 29 s instead of a few)."""
    import json
    import subprocess
    import sys

    commands = _documented_commands()
    assert len(commands) >= 10
    proc = subprocess.run([sys.executable, "-c", HELP_ALL, json.dumps(commands)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {c: r for c, r in got.items() if r != [0, True]}
    assert not bad and len(got) == len(commands), bad


def _python_blocks(doc: str) -> list[str]:
    import textwrap

    text = (ROOT / "docs" / doc).read_text()
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", text, re.S)]


@pytest.mark.parametrize(("doc", "module"), [("data.md", "scaling.catalog"),
                                             ("stages.md", "scaling.stages.registry")])
def test_the_docs_code_to_paste_runs_where_it_goes(doc, module):
    """Issue 37: every code snippet in docs/ runs. The worked examples are code to add
    to a module: each runs in that module's namespace (a catalog entry, a stage), so a
    changed signature breaks this test, not a reader's afternoon."""
    import __future__

    import importlib

    blocks = _python_blocks(doc)
    assert blocks
    lazy = __future__.annotations.compiler_flag  # as the module itself compiles
    for block in blocks:
        code = compile(block, f"docs/{doc}", "exec", flags=lazy, dont_inherit=True)
        exec(code, dict(vars(importlib.import_module(module))))
