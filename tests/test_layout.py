"""The package's structure, read from its source (every import, in-function ones included): layers that
import only downward, Ray only at the edge, no import circle, every file and function readable in one
sitting, and the commands light to import. docs/architecture.md says what each layer owns."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raydist"

# Bottom up. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("foundations", ["raydist", "raydist.errors", "raydist.storage"]),
    ("config", ["raydist.config", "raydist.presets"]),
    ("data, models, parallelism", ["raydist.data", "raydist.models", "raydist.parallel"]),
    ("pre-flight checks", ["raydist.preflight"]),
    ("file formats and studies", ["raydist.runs", "raydist.study"]),
    ("output", ["raydist.output"]),
    ("the loop", ["raydist.loop"]),
    ("a run's preparation and final evaluation", ["raydist.run_config", "raydist.cli", "raydist.final_eval"]),
    ("the Ray edge", ["raydist.ray_edge"]),
    ("the commands", ["raydist.train", "raydist.tune", "raydist.scaling", "raydist.predict", "raydist.cluster",
                      "raydist.export"]),
]
EDGE = "raydist.ray_edge"
MAX_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every import in the file, at any depth; `from raydist.x import y` is
    raydist.x.y when y is a module, else raydist.x."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append((sub if sub in MODULES else node.module, node.lineno))
    return out


def _layer(module: str) -> int:
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of tests/test_layout.py (and docs/architecture.md): place it"
    return max(matches)[1]


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_layout_reads_every_module_and_places_each_in_a_layer():
    assert len(MODULES) > 40 and "raydist.loop.run" in MODULES and "raydist.ray_edge.worker" in MODULES
    for module in MODULES:
        _layer(module)


def test_no_import_runs_in_a_circle():
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_one():
    """The check above can fail: a circle of three and one of two, beside a module that only imports."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert sorted(_circles(graph)) == [["a", "b", "c"], ["d", "e"]]


def test_every_import_of_raydist_points_down_or_sideways():
    upward = [f"{m} (layer {LAYERS[_layer(m)][0]}) imports {t} (layer {LAYERS[_layer(t)][0]}), line {line}"
              for m, path in MODULES.items() for t, line in _imports(path)
              if t in MODULES and t != m and _layer(t) > _layer(m)]
    assert upward == []


def test_only_the_ray_edge_imports_ray():
    outside = [f"{m}, line {line}: {t}" for m, path in MODULES.items() for t, line in _imports(path)
               if (t == "ray" or t.startswith("ray.")) and not (m == EDGE or m.startswith(EDGE + "."))]
    assert outside == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_and_function_reads_in_one_sitting(module):
    path = MODULES[module]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path}: {lines} lines; split it by responsibility"
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == [], f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_commands_import_without_torch_or_ray_where_they_did():
    """`import raydist.tune` (and cluster, scaling, predict, export) loads neither torch nor Ray: their --help and
    every bad-input error come before either loads."""
    code = ("import sys, raydist.tune, raydist.cluster, raydist.scaling, raydist.predict, raydist.export; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_ray_datas_decode_function_imports_without_torch():
    """The streamed folder path's map function starts in fresh Ray worker processes: its module (and the
    folder and registry modules under it) must not pull torch in."""
    code = "import sys, raydist.ray_edge.decode; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
