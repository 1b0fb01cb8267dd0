"""The package's layers, checked from the source: every import points down (or across, without
a cycle), function-local imports included, and modelkeep never imports itself by name at run time.

The layers are those of ``shared/DESIGN.md``; a new module must be placed in ``LAYERS`` (the test
fails on any module it does not know), which is where a newcomer learns what it may use.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "modelkeep"

# Module (or package prefix) -> layer. The longest matching prefix wins.
LAYERS: dict[str, int] = {
    "modelkeep.errors": 0,
    "modelkeep._version": 0,
    "modelkeep.format": 1,
    "modelkeep.hashing": 1,
    "modelkeep.statetree": 1,
    "modelkeep.conventions": 1,
    "modelkeep.options": 1,
    "modelkeep.progress": 1,
    "modelkeep.io": 2,
    "modelkeep.atomic": 2,
    "modelkeep.storage": 2,
    "modelkeep.sniff": 2,
    "modelkeep.sources": 3,
    "modelkeep.legacy": 3,
    "modelkeep.reading": 3,
    "modelkeep.weights": 4,
    "modelkeep.api": 4,
    "modelkeep.arch": 4,
    "modelkeep.models": 4,
    "modelkeep.creation": 4,
    "modelkeep.checkpoint": 4,
    "modelkeep.conversion": 4,
    "modelkeep.inspection": 4,
    "modelkeep.scanning": 4,
    "modelkeep.comparison": 4,
    "modelkeep.pretrained": 4,
    "modelkeep.download": 4,
    "modelkeep.inference": 4,
    "modelkeep.patching": 4,
    "modelkeep.demo": 5,
    "modelkeep.cli": 5,
    "modelkeep.run": 5,
    "modelkeep": 5,  # the package's __init__: the public surface
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> int:
    best = max((prefix for prefix in LAYERS if name == prefix or name.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def _resolve(target: str) -> str:
    """The module an import of ``target`` loads (``modelkeep.x.y`` may name a function)."""
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def imports_of(name: str) -> Iterator[tuple[str, int]]:
    """Every modelkeep module ``name`` imports, with the line: top-level and function-local,
    and the packages whose ``__init__`` an import of a submodule runs (except the root's)."""
    return imports_in(MODULES[name].read_text(encoding="utf-8"))


def imports_in(source: str) -> Iterator[tuple[str, int]]:
    """The modelkeep modules a module's source imports (see ``imports_of``)."""
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{alias.name}" for alias in node.names]
        for target in targets:
            if target != "modelkeep" and not target.startswith("modelkeep."):
                continue
            module = _resolve(target)
            yield module, node.lineno
            parts = module.split(".")
            for i in range(2, len(parts)):  # parent packages' __init__ run first
                yield ".".join(parts[:i]), node.lineno


def test_every_module_has_a_layer() -> None:
    unknown = [name for name in MODULES if not any(name == p or name.startswith(p + ".") for p in LAYERS)]
    assert unknown == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name: str) -> None:
    own = layer_of(name)
    upward = sorted(
        {f"line {line}: {target} (layer {layer_of(target)})" for target, line in imports_of(name)
         if target != name and layer_of(target) > own and not target.startswith(name + ".")}
    )
    assert upward == [], f"{name} (layer {own}) imports up"


def test_no_import_cycles() -> None:
    # A module's implicit edge to its own package's __init__ is no cycle (Python runs the
    # package first); the package's imports of its modules are edges like any other.
    graph = {
        name: {t for t, _ in imports_of(name) if t != name and not name.startswith(t + ".")}
        for name in MODULES
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_no_dynamic_imports_of_modelkeep() -> None:
    offenders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in ("import_module", "find_spec", "__import__") and node.args:
                    # trusted third-party names (torchvision, a user's trust=) are looked up by
                    # name on purpose; modelkeep's own modules never are
                    if "modelkeep" in ast.unparse(node.args[0]):
                        offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


def test_the_checker_sees_function_local_and_upward_imports() -> None:
    """The checks above can fail: a lazy import inside a function counts like any other, and
    importing a submodule counts its package's ``__init__`` too."""
    source = "def f():\n    from modelkeep import cli\n    import modelkeep.checkpoint.files\n"
    found = {target for target, _ in imports_in(source)}
    assert found == {"modelkeep.cli", "modelkeep.checkpoint.files", "modelkeep.checkpoint"}
    assert max(layer_of(t) for t in found) > layer_of("modelkeep.sources.ranges")
