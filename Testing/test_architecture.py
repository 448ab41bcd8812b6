"""Import rules of the package, read from the source: the engine never imports a host, no cycles.

Engine packages: core, modeling, weights, io, evaluation, training, runtime (and errors.py).
Hosts: slicer (MRML Logic, controller), cli, app. Only the slicer host may import `slicer`,
`vtk`, `qt` or `ctk`.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "SAMSelfPrompt" / "SAMSelfPromptLib"
ENGINE = ("core", "modeling", "weights", "io", "evaluation", "training", "runtime", "errors")
HOSTS = ("slicer", "cli", "app")
TOOLKITS = ("slicer", "vtk", "qt", "ctk", "slicer_core", "trame", "trame_slicer")


def modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports, function-level imports included."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    return found


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_engine_never_imports_a_host_or_a_toolkit():
    bad = []
    for name, path in modules().items():
        if layer(name) not in ENGINE:
            continue
        for target in imports(name, path):
            top = target.split(".")[0]
            if top in TOOLKITS or (top == "SAMSelfPromptLib" and layer(target) in HOSTS):
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(bad)


def test_only_the_slicer_host_imports_slicer():
    bad = [f"{name} imports {t}" for name, path in modules().items() if layer(name) != "slicer"
           for t in imports(name, path) if t.split(".")[0] in ("slicer", "vtk", "qt", "ctk")]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    mods = modules()
    graph = {}
    for name, path in mods.items():
        targets = set()
        for t in imports(name, path):
            while t and t not in mods and "." in t:
                t = t.rsplit(".", 1)[0]
            # a package's __init__ importing its own submodules is how packages expose names, not a cycle
            if t in mods and t != name and not (mods[name].name == "__init__.py" and t.startswith(name + ".")):
                targets.add(t)
        graph[name] = targets
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_the_layout_is_the_documented_one():
    subpackages = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert set(ENGINE[:-1]) | {"slicer", "cli"} <= subpackages
    flat = {p.stem for p in PKG.glob("*.py")} - {"__init__", "errors"}
    assert not flat, f"modules outside the subpackages: {sorted(flat)}"
