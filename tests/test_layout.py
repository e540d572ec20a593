"""The code's layout rules, checked from source (no imports of the project, so this runs in a second):

- no import cycle among the project's modules, function-level imports included (``TYPE_CHECKING``
  imports excluded: they never run);
- ``tokentune/`` never imports ray or mlflow;
- the orchestrator names no method (a new method never means editing ``orchestrator/``);
- Ray private APIs appear only in the isolated, explained functions listed here;
- production modules stay at about 400 lines or less, and functions at 60 (the exceptions say why);
- ``orchestrator/`` holds only its entry points at the top (``api``, ``cli``); the rest lives in
  ``spec/``, ``run/`` and ``results/``; build-time ``tools/`` are never imported by the runtime packages;
- no relay modules (a module that only re-imports names defined elsewhere).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tokentune", "orchestrator", "tools")
RUNTIME = ("tokentune", "orchestrator")
MAX_LINES = 420
#: module -> why it may be longer
LONG_MODULES = {
    "tools/build_assets.py": "a one-off script that rebuilds the shipped assets, read top to bottom",
}
MAX_FUNCTION_LINES = 60
#: (module, function) -> why it may be longer
LONG_FUNCTIONS = {
    ("tokentune/train.py", "train"): "the training loop, read top to bottom like nanoGPT's",
    ("orchestrator/results/plot.py", "pareto_plot"): "plotting: one matplotlib figure, call by call",
}
#: the modules at the top of orchestrator/: the package and its two entry points
ORCHESTRATOR_ENTRY_POINTS = {"orchestrator", "orchestrator.api", "orchestrator.cli"}
#: (module, function) -> the one Ray private API it uses and why no public one does the job
PRIVATE_RAY_USES: dict[tuple[str, str], str] = {
    ("orchestrator/run/ray_cluster.py", "placement_group_records"): (
        "no public API says which actor created a placement group or whether that actor died"
    ),
    (
        "orchestrator/run/trial.py",
        "_stop_requested",
    ): "no public API tells a function trainable Tune asked it to stop",
    (
        "tools/cluster_check.py",
        "_prepare_and_validate",
    ): "Ray has no public offline validator of `ray up` files",
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "assets" in path.parts and path.parent.name == "tasks":
                continue  # lm-eval's task helpers, loaded by lm-eval from the task folder
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


def _functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_functions_stay_short():
    long = []
    for path in _modules().values():
        rel = str(path.relative_to(ROOT))
        for fn in _functions(path):
            n = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if n > MAX_FUNCTION_LINES and (rel, fn.name) not in LONG_FUNCTIONS:
                long.append(f"{rel}:{fn.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(sorted(long))


def test_orchestrator_top_level_holds_only_its_entry_points():
    top = {m for m in _modules() if m.startswith("orchestrator") and m.count(".") <= 1}
    packages = {m for m in top if (ROOT / m.replace(".", "/") / "__init__.py").is_file()}
    assert top - packages == ORCHESTRATOR_ENTRY_POINTS - {"orchestrator"}, sorted(top - packages)
    assert packages == {"orchestrator", "orchestrator.spec", "orchestrator.run", "orchestrator.results"}


def test_no_relay_modules():
    """A module (not a package's ``__init__``) whose body is only imports (and ``__all__``) relays names
    defined elsewhere: import them from where they are defined instead."""
    relays = []
    for m, path in _modules().items():
        if path.name == "__init__.py":
            continue
        body = ast.parse(path.read_text()).body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        only_imports = all(
            isinstance(n, (ast.Import, ast.ImportFrom))
            or (isinstance(n, ast.Assign) and [ast.unparse(t) for t in n.targets] == ["__all__"])
            for n in body
        )
        if body and only_imports:
            relays.append(m)
    assert not relays, f"relay modules: {relays}"


def test_runtime_packages_never_import_tools():
    mods = _modules()
    found = [
        f"{m} imports {d}"
        for m, path in mods.items()
        if m.split(".")[0] in RUNTIME
        for d in _imports(path, m, set(mods))
        if d.split(".")[0] == "tools"
    ]
    assert not found, found


def _test_module_named(name: str) -> str | None:
    """The test module an import names (``tests.test_x.y``, ``.test_x``, ``test_x``), if any."""
    parts = [p for p in name.split(".") if p]
    if parts[:1] == ["tests"]:
        parts = parts[1:]
    return parts[0] if parts and parts[0].startswith("test_") else None


def test_test_modules_import_no_other_test_module():
    """Shared test helpers and fixtures live in tests/conftest.py; a test module that imports another
    (``from tests.test_x import ...``, at any level, or in code it runs in a subprocess) couples their
    collection and side effects (e.g. registering test-only methods)."""
    offenders = set()
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        named = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                named += [(node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                named += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
        named += [(n, m) for n, s in _string_constants(tree) for m in re.findall(r"\btests\.test_\w+", s)]
        for line, name in named:
            other = _test_module_named(name)
            if other and other != path.stem:
                offenders.add(f"{path.relative_to(ROOT)}:{line} imports tests.{other}")
    assert not offenders, "move shared helpers to tests/conftest.py:\n" + "\n".join(sorted(offenders))
