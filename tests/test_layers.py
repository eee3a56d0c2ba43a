"""The package's layers, checked from the source: every import (at the top of a module or inside a
function) goes to the same or a lower layer, and there is no import cycle anywhere.

    python tests/test_layers.py      # prints every module's layer and what it imports
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "noisystudent"

#: Bottom to top. A module may import its own layer and those below it; within one layer only
#: its own package (no sideways imports between, say, the loop and the experiments).
LAYERS = [
    ("base", ["noisystudent", "noisystudent.errors", "noisystudent.io", "noisystudent.plots", "noisystudent.records"]),
    ("storage", ["noisystudent.storage"]),  # local paths and URLs (fsspec): every file the data layer opens
    (
        "resume",
        ["noisystudent.resume", "noisystudent.run_lock"],
    ),  # done markers: a record written last, locally or in object storage
    ("config", ["noisystudent.config"]),
    ("data", ["noisystudent.data"]),
    ("models and noise", ["noisystudent.models", "noisystudent.noise", "noisystudent.prepare"]),
    ("engine", ["noisystudent.engine"]),
    ("deploy", ["noisystudent.deploy"]),  # ONNX export, int8, measuring the deployable forms
    ("labeling", ["noisystudent.labeling"]),
    ("tracking", ["noisystudent.tracking"]),
    ("stages", ["noisystudent.stages"]),
    ("analysis", ["noisystudent.analysis"]),
    ("annotation", ["noisystudent.annotation"]),
    ("loop and experiments", ["noisystudent.loop", "noisystudent.experiments"]),
    ("console", ["noisystudent.console"]),
    ("cli", ["noisystudent.cli"]),
    ("python -m", ["noisystudent.__main__"]),
]


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules ``name`` imports anywhere in its source (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from . import console`` imports the module console; ``from .x import f`` imports module x
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def layer_of(name: str) -> tuple[int, str]:
    """(layer index, the layer entry it belongs to): the longest matching prefix."""
    best = (-1, "")
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > len(best[1]):
                best = (i, p)
    return best


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(edges.items()):
        (src_layer, src_entry) = layer_of(src)
        for dst in sorted(targets):
            dst_layer, dst_entry = layer_of(dst)
            if dst == "noisystudent" and src != "noisystudent":
                bad.append(f"{src} imports the package root (import the module it needs)")
            elif dst_layer > src_layer:
                bad.append(f"{src} ({LAYERS[src_layer][0]}) imports {dst} from a higher layer ({LAYERS[dst_layer][0]})")
            elif dst_layer == src_layer and src_entry != dst_entry:
                bad.append(f"{src} imports {dst} sideways within the layer '{LAYERS[src_layer][0]}'")
    return bad


#: The size rules of the library: a function reads in one screen, and takes few enough arguments
#: that a call names what it passes (group the rest into a typed record).
MAX_FUNCTION_LINES, MAX_PARAMETERS = 60, 8


def oversized_functions() -> list[str]:
    """Functions of the package longer than MAX_FUNCTION_LINES (``def`` to last line) or with more
    than MAX_PARAMETERS parameters (``self``/``cls`` not counted; ``*args``/``**kwargs`` count one each)."""
    found = []
    for name, path in sorted(modules().items()):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, [a.vararg, a.kwarg])]
            count = len(params) - (1 if a.args and a.args[0].arg in ("self", "cls") else 0)
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES or count > MAX_PARAMETERS:
                found.append(f"{name}.{node.name}: {lines} lines, {count} parameters")
    return found


def unresolved_relative_imports() -> list[str]:
    """Relative imports (at the top or inside a function) that name no module of the package: they
    fail only when that line runs, which for a command's lazy import is at the command."""
    known = modules()
    found = []
    for name, path in sorted(known.items()):
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = base[: len(base) - node.level + 1] + ([node.module] if node.module else [])
                if ".".join(parts) not in known:
                    found.append(f"{name}: from {'.' * node.level}{node.module or ''} import ...")
    return found


def test_every_relative_import_names_a_module_of_the_package():
    assert unresolved_relative_imports() == []


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m)[0] < 0] == []


def test_no_import_cycles_counting_imports_inside_functions():
    assert cycles(graph()) == []


def test_each_layer_imports_only_the_layers_below_it():
    assert violations(graph()) == []


def test_no_function_is_longer_than_a_screen_or_takes_more_than_eight_parameters():
    assert oversized_functions() == []


def test_the_checker_sees_a_function_level_cycle(tmp_path, monkeypatch):
    """The checks would fail on the kind of cycle this layout removed (hidden in a function)."""
    pkg = tmp_path / "noisystudent"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "stages" / "student.py").write_text("def f():\n    from ..loop import iterate\n")
    (pkg / "loop.py").write_text("from .stages.student import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    edges = graph()
    assert cycles(edges) == [["noisystudent.loop", "noisystudent.stages.student"]]
    assert violations(edges) == [
        "noisystudent.stages.student (stages) imports noisystudent.loop from a higher layer (loop and experiments)"
    ]


if __name__ == "__main__":
    edges = graph()
    for name in sorted(edges, key=lambda m: (layer_of(m)[0], m)):
        print(f"{LAYERS[layer_of(name)[0]][0]:>20}  {name}  <- {', '.join(sorted(edges[name])) or '-'}")
    problems = [f"cycle: {' <-> '.join(c)}" for c in cycles(edges)] + violations(edges)
    print("\n".join(problems) if problems else "no cycles, no layer violations")
    sys.exit(1 if problems else 0)
