"""The package's layers: each imports only those below it, and nothing imports in a
circle. Lazy imports (inside functions) and TYPE_CHECKING imports count too: they
are dependencies all the same, only deferred."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("scaling", "analysis", "studies")

# Bottom to top. A module may import its own layer's modules (without a cycle) and
# any layer below; never one above.
LAYERS = [
    ("base", ("scaling.atomic", "scaling.catalog", "scaling.config", "scaling.configure",
              "scaling.storage", "scaling.records", "scaling.stage_result")),
    ("model", ("scaling.model",)),
    ("data", ("scaling.data",)),
    ("train", ("scaling.train",)),
    ("stages", ("scaling.stages",)),
    ("runtime", ("scaling.runtime",)),
    ("study", ("scaling.study",)),
    ("cli", ("scaling.pipeline",)),
    ("analysis", ("analysis",)),
    ("studies", ("studies",)),
]


def layer(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _runs_at_import(node: ast.AST) -> bool:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return False
    return not (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING")


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """Nodes that run when the module is imported: outside function bodies and
    ``if TYPE_CHECKING:`` blocks."""
    out: list[ast.AST] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        todo += [c for c in ast.iter_child_nodes(node) if _runs_at_import(c)]
    return out


def imports(path: Path, known: set[str], nested: bool = True) -> set[str]:
    """The project modules ``path`` imports: anywhere in the file, or (``nested``
    false) outside function bodies."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree) if nested else _module_level(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from scaling.study import results` imports the module scaling.study.results
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and not name.endswith("__init__") and name in known:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    # A package's __init__ (empty here) is what `from pkg import x` names too; skip it.
    return {m: {d for d in imports(p, known)
                if d != m and d not in PACKAGES and not _is_package(d, mods)}
            for m, p in mods.items()}


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def test_every_import_points_down_or_sideways():
    upward = [f"{m} (layer {LAYERS[layer(m)][0]}) imports {d} (layer {LAYERS[layer(d)][0]})"
              for m, deps in graph().items() for d in sorted(deps) if layer(d) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_an_upward_and_a_circular_import(tmp_path):
    # The walk itself, on two modules written to break both rules.
    (tmp_path / "a.py").write_text("def f():\n    from scaling.study import sweep\n")
    (tmp_path / "b.py").write_text("from scaling.config import ExperimentConfig\n")
    known = {"scaling.study.sweep", "scaling.config"}
    assert imports(tmp_path / "a.py", known) == {"scaling.study.sweep"}
    assert imports(tmp_path / "a.py", known, nested=False) == set()  # a registry's loader
    assert imports(tmp_path / "b.py", known) == {"scaling.config"}
    assert layer("scaling.study.sweep") > layer("scaling.model.resnet") > layer("scaling.config")


def test_planning_and_the_registry_load_without_torch():
    # A study's plan, dry run and keys need no deep-learning stack on the driver.
    code = ("import sys, scaling.catalog, scaling.config, scaling.stages.registry, "
            "scaling.study.plan, scaling.study.results; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')); "
            "print(bad); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
