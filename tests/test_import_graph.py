"""The import graph of d3fast/ and kernels/: no circle, and no import from a lower layer up to
a higher one (CONTRIBUTING.md "Module map" lists the layers; ../shared/ARCHITECTURE.md is
the design they follow).

Every import counts, also the ones inside functions: a deferred import still ties two modules
together, and a circle hidden that way comes back as soon as someone moves the import up.
Imports under `if TYPE_CHECKING:` are for annotations only and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# bottom up; a module may import from its own layer and the ones below it. A module listed
# by its package prefix ("d3fast.data.") takes that layer unless named on its own.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("d3fast.errors", "d3fast.io", "d3fast.paths", "d3fast.runtime", "d3fast.progress",
                     "d3fast.phases", "d3fast.compiling", "d3fast.gpu_model", "d3fast.kernels", "d3fast.kernels.",
                     "d3fast._ext",
                     "d3fast.data.cache",
                     "d3fast.data.decode", "d3fast.data.datasets", "d3fast.data.hf")),
    ("config", ("d3fast.config", "d3fast.presets")),
    ("components", ("d3fast.data", "d3fast.data.", "d3fast.models", "d3fast.models.", "d3fast.losses", "d3fast.coresets", "d3fast.quantize", "d3fast.dist",
                    "d3fast.ledger", "d3fast.trackers", "d3fast.report")),
    ("engine", ("d3fast.distilled", "d3fast.storage", "d3fast.exports", "d3fast.unroll", "d3fast.embed",
                "d3fast.state", "d3fast.run", "d3fast.trajectories", "d3fast.mtt_buffers", "d3fast.training", "d3fast.visualize",
                "d3fast.mmd_update", "d3fast.health", "d3fast.soft_labels")),
    ("preflight", ("d3fast.preflight",)),
    ("recipes", ("d3fast.recipes", "d3fast.recipes.")),
    ("faces", ("d3fast", "d3fast.api", "d3fast.cli", "d3fast.doctor", "d3fast.__main__")),
]


def layer_of(module: str) -> int:
    exact = [i for i, (_, names) in enumerate(LAYERS) if module in names]
    if exact:
        return exact[0]
    prefixed = [(len(p), i) for i, (_, names) in enumerate(LAYERS) for p in names
                if p.endswith(".") and module.startswith(p)]
    if prefixed:
        return max(prefixed)[1]
    raise KeyError(module)


def modules() -> dict[str, Path]:
    """Module name -> file, for d3fast/ and kernels/ (installed as d3fast.kernels)."""
    out: dict[str, Path] = {}
    for base, package in ((ROOT / "d3fast", "d3fast"), (ROOT / "kernels", "d3fast.kernels")):
        for p in sorted(base.rglob("*.py")):
            rel = p.relative_to(base).with_suffix("").parts
            if rel and rel[0] == "kernels" and package == "d3fast":  # a link to kernels/, if any
                continue
            parts = [package, *rel]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = p
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def edges() -> dict[str, set[str]]:
    mods = modules()
    out: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        package = m if path.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                # the package itself is every submodule's parent (Python imports it first), not an edge
                if t in mods and t != m and t != "d3fast":
                    out[m].add(t)
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
            for m in sorted(graph) for t in sorted(graph[m]) if layer_of(t) > layer_of(m)]


def test_every_module_has_a_layer() -> None:
    missing = []
    for m in modules():
        try:
            layer_of(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"add these modules to LAYERS: {missing}"


def test_no_import_circles() -> None:
    found = circles(edges())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_upward_imports() -> None:
    found = upward(edges())
    assert not found, f"{len(found)} imports from a lower layer up:\n" + "\n".join(found)


def test_the_checks_see_a_circle_and_an_upward_import() -> None:
    """The two checks above on a graph made for them: they can fail."""
    graph = {"d3fast.io": {"d3fast.run"}, "d3fast.run": {"d3fast.io"}, "d3fast.config": set()}
    assert circles(graph) == [["d3fast.io", "d3fast.run"]]
    assert upward(graph) == ["d3fast.io (foundations) imports d3fast.run (engine)"]
    with pytest.raises(KeyError):
        layer_of("d3fast.nowhere")
