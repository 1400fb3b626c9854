"""Imports go one way: the layers of docs/design.md (its opening), checked statically with ``ast``.

    top           specdec.cli, specdec.distill.cli, benchmarks   (may import anything)
    integrations  integrations                                   (may import the core and below)
    core          specdec (every other module)                   (may import prefix_cache, quant)
    base          prefix_cache, quant                            (each imports only itself)

Rules, each failure naming the file, the line and the rule:

1. upward: no import from a layer to a higher one (imports inside functions count too);
2. base: ``prefix_cache`` and ``quant`` import nothing of this project but themselves;
3. cycle: module-level imports between modules form no cycle (imports inside functions,
   which run later, are left out);
4. private: no underscore name (``_x``, not ``__x__``) is imported from, or read as an
   attribute of, another module of the project;
5. install names: ``prefix_cache``, ``quant``, ``integrations`` and ``benchmarks`` are imported as
   ``specdec.quant`` (...) or relatively, never by their folder names, which only a checkout has
   (the wheel installs them inside ``specdec``; docs/design.md, "Package layout and import names").

Imports of ``specdec.quant`` (...) are checked as imports of the folder ``quant/``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("specdec", "prefix_cache", "quant", "integrations", "benchmarks")
SUBPACKAGES = ("prefix_cache", "quant", "integrations", "benchmarks")  # installed inside specdec
TOP_MODULES = {"specdec.cli", "specdec.distill.cli"}
BASE = {"prefix_cache", "quant"}
RANK = {"base": 0, "core": 1, "integrations": 2, "top": 3}


def layer(module: str) -> str:
    top = module.split(".")[0]
    if module in TOP_MODULES or top == "benchmarks":
        return "top"
    if top == "integrations":
        return "integrations"
    if top == "specdec":
        return "core"
    return "base"


@dataclass(frozen=True)
class Import:
    source: str        # importing module
    target: str        # imported module (a submodule where ``from pkg import sub`` names one)
    name: str | None   # the imported name when it is not a module
    spelled: str       # the module as the statement names it (absolute), before folder names
    path: Path
    line: int
    module_level: bool

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def folder_name(name: str) -> str:
    """``specdec.quant.kv`` -> ``quant.kv`` (the module's name in a checkout); others unchanged."""
    parts = name.split(".")
    return ".".join(parts[1:]) if parts[0] == "specdec" and len(parts) > 1 and parts[1] in SUBPACKAGES else name


def _walk(tree: ast.AST):
    """(node, inside a function) for every node."""
    stack = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        yield node, in_function
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def scan(modules: dict[str, Path]) -> tuple[list[Import], list[tuple[str, int, str, str]]]:
    """Every project import, and every ``alias._name`` read of an imported project module
    (source, line, module, name)."""
    imports, attributes = [], []
    for source, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]
        aliases = {}  # local name -> project module, for the attribute rule
        nodes = list(_walk(tree))
        for node, in_function in nodes:
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _project(a.name):
                        target = folder_name(a.name)
                        imports.append(Import(source, target, None, a.name, path, node.lineno, not in_function))
                        aliases[a.asname or a.name.split(".")[0]] = target if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                if not _project(origin):
                    continue
                relative = bool(node.level)
                for a in node.names:
                    spelled = f"{origin}.{a.name}"
                    sub = folder_name(spelled)
                    if sub in modules:
                        imports.append(Import(source, sub, None, "" if relative else spelled, path, node.lineno,
                                              not in_function))
                        aliases[a.asname or a.name] = sub
                    else:
                        imports.append(Import(source, folder_name(origin), a.name, "" if relative else origin, path,
                                              node.lineno, not in_function))
        for node, _ in nodes:
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != source):
                attributes.append((source, node.lineno, aliases[node.value.id], node.attr))
    return imports, attributes


def _cycles(modules: dict[str, Path], imports: list[Import]) -> list[list[Import]]:
    """One import chain per strongly connected component of the module-level graph."""
    edges: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        if imp.module_level and imp.target in modules and imp.target != imp.source:
            edges[imp.source].setdefault(imp.target, imp)
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(v: str) -> None:  # Tarjan's algorithm (the graph is small: recursion is fine)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
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
                components.append(set(component))

    for v in sorted(modules):
        if v not in index:
            connect(v)
    chains = []
    for component in components:  # walk from the smallest name until a module repeats
        v, seen, chain = min(component), [], []
        while v not in seen:
            seen.append(v)
            w = min(w for w in edges[v] if w in component)
            chain.append(edges[v][w])
            v = w
        chains.append(chain[seen.index(v):])
    return chains


def violations() -> list[str]:
    """Every broken rule, as "path:line: rule N (name): what", sorted by file and line."""
    modules = module_files()
    imports, attributes = scan(modules)
    out = []  # (path, line, message)
    for imp in imports:
        src, dst = layer(imp.source), layer(imp.target)
        shown = imp.target + (f".{imp.name}" if imp.name else "")
        if RANK[dst] > RANK[src]:
            out.append((imp.path, imp.line, f"rule 1 (upward): {imp.source} ({src}) imports {shown} ({dst})"))
        if src == "base" and imp.target.split(".")[0] != imp.source.split(".")[0]:
            out.append((imp.path, imp.line, f"rule 2 (base): {imp.source} imports {shown}; "
                        "prefix_cache and quant import only themselves"))
        if imp.name and imp.name.startswith("_") and not imp.name.startswith("__") and imp.target != imp.source:
            out.append((imp.path, imp.line, f"rule 4 (private): {imp.source} imports {imp.name} from {imp.target}"))
        if imp.spelled.split(".")[0] in SUBPACKAGES:
            out.append((imp.path, imp.line, f"rule 5 (install names): {imp.source} imports {imp.spelled}; "
                        f"write specdec.{imp.spelled} (or a relative import)"))
    for source, line, module, name in attributes:
        out.append((modules[source], line, f"rule 4 (private): {source} reads {name} of {module}"))
    for chain in _cycles(modules, imports):
        path = " -> ".join([chain[0].source] + [f"{imp.target} ({imp.where()})" for imp in chain])
        out.append((chain[0].path, chain[0].line, f"rule 3 (cycle): {path}"))
    return [f"{path.relative_to(ROOT)}:{line}: {message}" for path, line, message in sorted(out)]


def test_scan_sees_the_packages():
    modules = module_files()
    imports, _ = scan(modules)
    assert {"specdec.generate", "specdec.distill.cli", "prefix_cache.cache", "quant.kv", "integrations.hf",
            "benchmarks.run"} <= modules.keys()
    assert any(i.source == "specdec.generate" and i.target == "specdec.options" and i.module_level for i in imports)
    assert any(i.source == "prefix_cache.cache" and i.target == "prefix_cache.identity" for i in imports)  # relative


def test_imports_follow_the_layers():
    found = violations()
    assert not found, "layering violations (see tests/test_layering.py):\n" + "\n".join(found)


def test_rules_catch_what_they_should(tmp_path, monkeypatch):
    """The checker on a tiny fake tree: one violation of each rule is reported."""
    files = {
        "specdec/__init__.py": "",
        "specdec/core.py": "from specdec.other import _hidden\n\ndef f():\n    from specdec.benchmarks import run\n",
        "specdec/other.py": "import specdec.core\n",
        "specdec/cli.py": "import specdec.benchmarks.run\n",
        "prefix_cache/__init__.py": "def f():\n    import quant\n",
        "quant/__init__.py": "",
        "integrations/__init__.py": "from specdec import core\ncore._private()\n",
        "benchmarks/__init__.py": "",
        "benchmarks/run.py": "import specdec\nfrom specdec import core\nimport quant.int4\nfrom specdec.quant import x\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    found = "\n".join(violations())
    assert "specdec/core.py:4: rule 1 (upward): specdec.core (core) imports benchmarks.run (top)" in found
    assert "specdec/cli.py" not in found
    assert "prefix_cache/__init__.py:2: rule 2 (base)" in found
    assert ("specdec/core.py:1: rule 3 (cycle): specdec.core -> specdec.other (specdec/core.py:1) -> "
            "specdec.core (specdec/other.py:1)") in found
    assert "specdec/core.py:1: rule 4 (private): specdec.core imports _hidden from specdec.other" in found
    assert "integrations/__init__.py:2: rule 4 (private): integrations reads _private of specdec.core" in found
    assert "benchmarks/run.py:3: rule 5 (install names): benchmarks.run imports quant.int4" in found
    assert "benchmarks/run.py:4" not in found


def test_the_wheel_lists_every_package_folder():
    """pyproject.toml names each folder with an __init__.py, under its installed name."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for package in PACKAGES
               for p in (ROOT / package).rglob("__init__.py")}
    installed = {f"specdec.{n}" if n.split(".")[0] in SUBPACKAGES else n for n in folders}
    assert set(setuptools["packages"]) == installed
    assert setuptools["package-dir"] == {f"specdec.{name}": name for name in SUBPACKAGES}
