"""The plan of the house (docs/architecture.md), measured from the code: rooms at the top of the package,
no import circles, no reaching into another module's underscore names, short functions, one CLI package
whose commands each have get_parser() and main(argv), no benchmarks inside the library, and only
``zoome_dist`` installed."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "zoome_dist"
MAX_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def _imports(name: str, module_level_only: bool) -> list[tuple[str, str]]:
    """``(imported module, imported name)`` of module ``name``, relative imports resolved."""
    tree, is_pkg = TREES[name], MODULES[name].name == "__init__.py"
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_pkg else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            found += [(base, a.name) for a in node.names]
    return found


def _graph(module_level_only: bool, skip_from: tuple[str, ...] = ()) -> dict[str, set[str]]:
    graph = defaultdict(set)
    for name in MODULES:
        if name in skip_from:
            continue
        for module, what in _imports(name, module_level_only):
            target = f"{module}.{what}" if f"{module}.{what}" in MODULES else module
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` (as a path), or []."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str]:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        stack.pop()
        return []

    for v in sorted(MODULES):
        if v not in state and (found := visit(v)):
            return found
    return []


def test_the_package_top_holds_at_most_ten_rooms():
    entries = sorted(p.name for p in PKG.iterdir() if p.name not in ("__init__.py", "__pycache__"))
    assert len(entries) <= 10, entries
    assert {"cli", "config.py", "core", "data", "models", "pipeline", "train", "launch", "eval", "infer"} == set(entries)


def test_no_import_circles():
    # at import time, none at all
    assert _cycle(_graph(module_level_only=True)) == []
    # counting imports inside functions too: only config.validate's lazy look-ups of the registries
    # (models, losses, loaders, the accelerator) point back into the package from config.py
    assert _cycle(_graph(module_level_only=False, skip_from=("zoome_dist.config",))) == []


def test_the_circle_checker_finds_a_circle():
    graph = {"zoome_dist.config": {"zoome_dist.train.engine"}, "zoome_dist.train.engine": {"zoome_dist.config"}}
    assert _cycle(graph) == ["zoome_dist.config", "zoome_dist.train.engine", "zoome_dist.config"]


def test_no_module_imports_another_modules_underscore_names():
    private = [(name, module, what) for name in MODULES for module, what in _imports(name, False)
               if what.startswith("_") and not what.startswith("__") and module.startswith("zoome_dist")]
    assert private == []


def test_no_function_is_longer_than_a_screen():
    files = [*PKG.rglob("*.py"), *(ROOT / "launchers").rglob("*.py"), *(ROOT / "tuning").rglob("*.py"),
             *(ROOT / "shards").rglob("*.py")]
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in files for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_LINES]
    assert long == []


def test_the_library_does_not_import_benchmarks_or_launchers():
    outside = [(name, module) for name in MODULES for module, _ in _imports(name, False)
               if module.split(".")[0] in ("benchmarks", "launchers", "shards", "tuning", "tests")]
    assert outside == []


def test_every_command_module_has_get_parser_and_main():
    commands = [p for p in (PKG / "cli").glob("*.py") if p.stem not in ("__init__", "common")]
    assert {p.stem for p in commands} >= {"main", "train", "cv", "tune", "predict", "explain", "export", "score",
                                          "shards"}
    for p in commands:
        names = {n.name for n in TREES[_module_name(p)].body if isinstance(n, ast.FunctionDef)}
        assert {"get_parser", "main"} <= names, p


def test_zoome_help_answers_without_torch(tmp_path):
    code = ("import sys\nfrom zoome_dist.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "predict" in r.stdout and r.stdout.strip().endswith("False")


def test_only_zoome_dist_is_installed(tmp_path):
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["tool"]["setuptools"]["packages"]["find"]["include"] == ["zoome_dist*"]
    scripts = cfg["project"]["scripts"]
    assert scripts == {"zoome": "zoome_dist.cli.main:main", "zoome-shards": "zoome_dist.cli.shards:main"}
    # from outside the repository (no work tree on sys.path), no top-level `shards` package is importable
    r = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('shards'))"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stdout + r.stderr
