"""The public surface is deliberate: ``__all__`` is exactly the public names, no public name hides
a submodule, the CLI uses only the public API, and every exported function documents its
arguments, its result and its errors."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import types
from pathlib import Path

import pytest

import modelkeep

# Public members that ``__all__`` lists although the namespace rule below leaves them out: the
# version (a dunder) and the errors module (``from modelkeep import errors`` is the documented way
# to reach the exception tree).
INCLUDED_SPECIAL_MEMBERS = {"__version__", "errors"}

# The lead is rewriting the signatures of these modules' functions; their Args/Returns/Raises
# docstrings come with that change. Remove a module from here once its docstrings are written.
def public_names(module: types.ModuleType) -> set[str]:
    """Names a user sees in ``module``: not private and not one of its submodules."""
    return {
        name for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def test_all_is_exactly_the_public_names_sorted() -> None:
    # Adding a public name without listing it (or listing one that is not defined) fails here.
    expected = sorted(public_names(modelkeep) | INCLUDED_SPECIAL_MEMBERS)
    assert modelkeep.__all__ == expected


def test_the_rule_catches_an_unlisted_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modelkeep, "leaked_helper", lambda: None, raising=False)
    assert "leaked_helper" in public_names(modelkeep)
    assert sorted(public_names(modelkeep) | INCLUDED_SPECIAL_MEMBERS) != modelkeep.__all__


def test_exports_operations_and_their_results() -> None:
    from modelkeep import comparison, conversion, scanning
    from modelkeep.inference import pipeline

    assert modelkeep.scan is scanning.scan and modelkeep.FileScan is scanning.FileScan
    assert modelkeep.convert is conversion.convert and modelkeep.ConvertReport is conversion.ConvertReport
    assert modelkeep.diff is comparison.diff and modelkeep.DiffReport is comparison.DiffReport
    assert modelkeep.predict is pipeline.predict and modelkeep.Ranked is pipeline.Ranked
    assert issubclass(modelkeep.StepExistsError, FileExistsError)
    assert issubclass(modelkeep.StepNotFoundError, FileNotFoundError)


def all_modules() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages(modelkeep.__path__, "modelkeep."))


@pytest.mark.parametrize("name", all_modules())
def test_no_public_name_shadows_a_submodule(name: str) -> None:
    module = importlib.import_module(name)
    parent_name, _, short = name.rpartition(".")
    attribute = getattr(importlib.import_module(parent_name), short, None)
    assert attribute is None or attribute is module, f"{parent_name}.{short} is {attribute!r}"


def test_submodules_import_by_their_dotted_names() -> None:
    # ``import a.b.c as x`` resolves through attributes: a shadowing function would break it.
    import modelkeep.comparison as comparison
    import modelkeep.conversion as conversion
    import modelkeep.inference.spec as spec
    import modelkeep.scanning as scanning

    assert spec.InferenceSpec is modelkeep.InferenceSpec
    assert (scanning.__name__, conversion.__name__, comparison.__name__) == (
        "modelkeep.scanning", "modelkeep.conversion", "modelkeep.comparison")
    assert callable(modelkeep.predict) and not isinstance(modelkeep.predict, types.ModuleType)


def test_the_cli_uses_only_the_public_api() -> None:
    """cli.py imports ``modelkeep`` (as mk), ``modelkeep.errors``, and the two presentation
    modules its docstring names; every ``mk.x`` it uses is exported."""
    source = Path(modelkeep.__file__).with_name("cli.py").read_text()
    tree = ast.parse(source)
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name.startswith("modelkeep")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modelkeep"):
            imported |= {f"{node.module}.{a.name}" for a in node.names}
    assert imported == {"modelkeep", "modelkeep.errors", "modelkeep.progress", "modelkeep.demo"}
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "mk"}
    assert used and used <= set(modelkeep.__all__), used - set(modelkeep.__all__)


def test_no_docstring_promises_a_serve_command() -> None:
    root = Path(modelkeep.__file__).parent
    offenders = [str(path.relative_to(root)) for path in root.rglob("*.py")
                 if re.search(r"\bserve\b|\bserving\b", path.read_text())]
    assert offenders == []


def exported_functions() -> list[object]:
    params = []
    for name in modelkeep.__all__:
        value = getattr(modelkeep, name)
        if not inspect.isfunction(value):
            continue
        params.append(pytest.param(name, id=name))
    return params


def docstring_sections(doc: str) -> dict[str, str]:
    """Google-style sections (``Args:``, ``Returns:``, ``Raises:``) and their bodies."""
    sections: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        header = re.fullmatch(r"\s*(Args|Arguments|Returns|Yields|Raises):\s*", line)
        if header:
            current = header.group(1)
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def test_exported_functions_are_found() -> None:
    names = {p.values[0] for p in exported_functions()}
    assert {"scan", "convert", "diff", "predict", "load_weights", "register_factory"} <= names


@pytest.mark.parametrize("name", exported_functions())
def test_exported_function_documents_args_returns_raises(name: str) -> None:
    function = getattr(modelkeep, name)
    doc = inspect.getdoc(function) or ""
    sections = docstring_sections(doc)
    parameters = [p for p in inspect.signature(function).parameters.values() if p.name != "self"]
    if parameters:
        args = sections.get("Args", sections.get("Arguments"))
        assert args is not None, f"{name}: no Args section"
        undocumented = [p.name for p in parameters if not re.search(rf"^\s*\**{p.name}\b", args, re.M)]
        assert undocumented == [], f"{name}: Args does not name {undocumented}"
    assert "Returns" in sections or "Yields" in sections, f"{name}: no Returns section"
    # Every public operation refuses bad input with a modelkeep error, so each says which.
    assert "Raises" in sections, f"{name}: no Raises section"
    assert re.search(r"\w+Error\b", sections["Raises"]), f"{name}: Raises names no error class"
