"""The library's module graph has no cycle: no module imports a module that imports it, directly or through
others, counting the imports inside functions too (a late import only hides a cycle), and no ``TYPE_CHECKING``
block stands in for an import."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rpat"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _owner(name: str, mods: dict) -> str | None:
    """The module ``name`` is, or is in (``rpat.data.Batches`` -> ``rpat.data``)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imported(module: str, path: Path, mods: dict) -> set[str]:
    """The rpat modules ``module`` imports anywhere in its text. Importing ``rpat.a.b`` from outside ``rpat.a``
    runs ``rpat.a`` first, so that counts as importing it too."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names)
    out = set()
    for name in names:
        target = _owner(name, mods) if name.startswith("rpat") else None
        if target is None or target == module:
            continue
        out.add(target)
        parts = target.split(".")
        out.update(".".join(parts[:i]) for i in range(2, len(parts))
                   if not module.startswith(".".join(parts[:i]) + ".") and ".".join(parts[:i]) != module)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_its_importer():
    mods = modules()
    graph = {m: imported(m, p, mods) & set(mods) for m, p in mods.items()}
    assert cycles(graph) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_type_checking_imports():
    hidden = [str(p.relative_to(PACKAGE.parent)) for p in modules().values() if "TYPE_CHECKING" in p.read_text()]
    assert hidden == []
