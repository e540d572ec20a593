"""The code's layout rules, checked from source (no imports of the project, so this runs in a second):

- no import cycle among the project's modules, function-level imports included (``TYPE_CHECKING``
  imports excluded: they never run);
- ``tokentune/`` never imports ray or mlflow;
- the orchestrator names no method (a new method never means editing ``orchestrator/``);
- Ray private APIs appear only in the isolated, explained functions listed here;
- production modules stay at about 400 lines or less (the exceptions say why).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tokentune", "orchestrator")
MAX_LINES = 420
#: module -> why it may be longer
LONG_MODULES = {
    "tokentune/assets/build_assets.py": "a one-off script that rebuilds the shipped assets, read top to bottom",
}
#: (module, function) -> the one Ray private API it uses and why no public one does the job
PRIVATE_RAY_USES: dict[tuple[str, str], str] = {
    ("orchestrator/ray_cluster.py", "placement_group_records"): (
        "no public API says which actor created a placement group or whether that actor died"
    ),
    (
        "orchestrator/trial.py",
        "_stop_requested",
    ): "no public API tells a function trainable Tune asked it to stop",
    (
        "orchestrator/cluster_check.py",
        "_prepare_and_validate",
    ): "Ray has no public offline validator of `ray up` files",
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Project modules ``module`` imports anywhere in its file (except under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(p, m, set(mods)) for m, p in mods.items()}
    # a package's __init__ importing its own submodules is how registration works; a submodule
    # importing its package is the implicit parent import Python always does: neither is a cycle
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not (d.startswith(m + ".") or m.startswith(d + "."))}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_tokentune_never_imports_ray_or_mlflow():
    bad = []
    for m, path in _modules().items():
        if not m.startswith("tokentune"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            bad += [f"{m}: {n}" for n in names if n.split(".")[0] in ("ray", "mlflow")]
    assert not bad, bad


def _string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """String literals that are not docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


def test_orchestrator_names_no_method():
    from tokentune.methods import REGISTRY

    # "tokentune" is also the package's and the command's name (tags tokentune.*, prog="tokentune")
    names = set(REGISTRY) - {"tokentune"}
    found = []
    for m, path in _modules().items():
        if m.startswith("orchestrator"):
            found += [
                f"{m}:{line} {s!r}"
                for line, s in _string_constants(ast.parse(path.read_text()))
                if s in names
            ]
    assert not found, "the orchestrator names methods: " + ", ".join(found)


def test_ray_private_apis_only_in_isolated_functions():
    uses = []
    for m, path in _modules().items():
        if not m.startswith("orchestrator"):
            continue
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            src = ast.get_source_segment(path.read_text(), fn) or ""
            if "._private" in src or "._internal" in src or "gcs_pb2" in src:
                uses.append((str(path.relative_to(ROOT)), fn.name))
    unexplained = [u for u in uses if u not in PRIVATE_RAY_USES]
    assert not unexplained, f"Ray private APIs outside the listed, explained functions: {unexplained}"


def test_modules_stay_small():
    long = []
    for path in sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and rel not in LONG_MODULES:
            long.append(f"{rel} ({n} lines)")
    assert not long, "modules over ~400 lines: " + ", ".join(long)
