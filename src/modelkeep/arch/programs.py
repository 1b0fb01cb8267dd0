"""What a stored ``torch.export`` program may contain: a positive list, checked before torch sees it.

A program is data that becomes code: torch's deserializer ``eval``s symbolic shape expressions
(sympy), ``exec``s guard code, and ``torch.fx`` writes Python source from node and attribute names.
So a program passes ``check_program`` first:

- every operator is an ATen/prims overload, a symbolic-shape operator or ``getitem``, never an
  arbitrary ``torch.*`` function (and the built graph is checked again, object by object, by
  ``check_graph_objects``);
- symbolic expressions use only sympy constructors and comparison/arithmetic, no attribute access
  or powers;
- names are ``[A-Za-z0-9_.]`` only, so no string can leave its place in generated source;
- guard code and per-node metadata (stack traces, annotations) are dropped, custom objects refused.
"""

from __future__ import annotations

import json
import operator
import re
from typing import Any

import torch

from modelkeep import errors
from modelkeep.arch import records

SAFE_STRING = re.compile(r"[A-Za-z0-9_.]*")
FREE_STRING_KEYS = ("as_string", "torch_version")
MAX_FREE_STRING = 4096
MAX_DEPTH = 200
_ATEN_OP = re.compile(r"torch\.ops\.(aten|prims)\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")
_DENIED_ATEN = {"from_file"}
_HIGHER_ORDER = {"cond", "while_loop", "wrap_with_set_grad_enabled", "wrap_with_autocast"}
_SYM_OPERATORS = {
    "_operator.add", "_operator.sub", "_operator.mul", "_operator.floordiv", "_operator.mod",
    "_operator.truediv", "_operator.neg", "_operator.pos", "_operator.eq", "_operator.ne",
    "_operator.le", "_operator.ge", "_operator.lt", "_operator.gt", "_operator.and_",
    "_operator.or_", "_operator.getitem", "math.trunc", "torch.sym_float", "torch.sym_int",
    "torch.sym_ite", "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch._sym_sqrt",
}
# sympy's printed forms of shape expressions (``srepr``): constructors, no powers, no attributes.
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Mod", "Max", "Min", "Abs", "Eq", "Ne",
    "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "And", "Or", "Not", "floor", "ceiling", "oo", "true", "false",
    "BooleanTrue", "BooleanFalse", "True", "False", "FloorDiv", "ModularIndexing", "Where",
    "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "IntTrueDiv", "FloatTrueDiv",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    "IsNonOverlappingAndDenseIndicator", "positive", "negative", "nonnegative", "nonpositive",
    "integer", "real", "finite", "infinite", "zero", "nonzero", "even", "odd", "rational",
    "commutative", "extended_real", "precision",
}
_SYMPY_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<number>\d{1,20}(?:\.\d{1,20})?(?:[eE][-+]?\d{1,3})?)"
    r"|(?P<quoted>'[^']{0,40}')"
    r"|(?P<op>==|!=|<=|>=|//|[-+*/%(),=<>]))"
)
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
_QUOTED_NUMBER = re.compile(r"-?\d{1,20}(?:\.\d{0,20})?(?:[eE][-+]?\d{1,3})?")
MAX_EXPRESSION = 10_000



def _sym_ops() -> set[Any]:
    from torch._export.serde import serialize

    return set(serialize._SYM_OPS)


def _bad(path: str | None, what: str, item: str | None = None) -> errors.UnsafeContentError:
    return errors.UnsafeContentError(
        f"graph program: {what}; nothing was built",
        path=path,
        item=item,
        fix="graph files can only hold ATen operations and plain names; re-save the model "
        "with modelkeep.save",
    )


def check_expression(text: Any, *, path: str | None) -> str:
    """Refuse any symbolic-shape expression that is not sympy constructors and arithmetic."""
    if not isinstance(text, str) or len(text) > MAX_EXPRESSION:
        raise _bad(path, "symbolic expression is not a short string", "expr_str")
    if "**" in text:
        raise _bad(path, "symbolic expression raises to a power", "expr_str")
    position = 0
    while position < len(text):
        match = _SYMPY_TOKEN.match(text, position)
        if match is None or match.end() == position:
            if text[position:].strip() == "":
                break
            near = text[position : position + 20]
            raise _bad(path, f"symbolic expression has a disallowed character near {near!r}", "expr_str")
        name, quoted = match.group("name"), match.group("quoted")
        if name is not None and name not in _SYMPY_NAMES and not _SYMBOL.fullmatch(name):
            raise _bad(path, f"symbolic expression names {name!r}", "expr_str")
        if quoted is not None and not (_SYMBOL.fullmatch(quoted[1:-1]) or _QUOTED_NUMBER.fullmatch(quoted[1:-1])):
            raise _bad(path, f"symbolic expression quotes {quoted!r}", "expr_str")
        position = match.end()
    return text


def operator_allowed(target: str) -> bool:
    if target in _SYM_OPERATORS:
        return True
    match = _ATEN_OP.fullmatch(target)
    if match:
        return match.group(2) not in _DENIED_ATEN
    prefix = "torch.ops.higher_order."
    return target.startswith(prefix) and target[len(prefix) :] in _HIGHER_ORDER


_TREESPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}


def _check_treespec(text: Any, *, path: str | None) -> str:
    """A pytree spec string: nested tuples/lists/dicts with plain keys only."""

    def walk(node: Any, depth: int) -> None:
        if depth > MAX_DEPTH or not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
            raise _bad(path, "input/output structure is not a plain pytree spec", "in_spec")
        if node["type"] not in _TREESPEC_TYPES:
            raise _bad(path, f"input/output structure uses type {node['type']!r}", "in_spec")
        context = node["context"]
        if context is not None:
            keys = json.loads(context) if isinstance(context, str) else None
            if keys is not None and not (
                isinstance(keys, list) and all(isinstance(k, str) and SAFE_STRING.fullmatch(k) for k in keys)
            ):
                raise _bad(path, "input/output structure has non-plain keys", "in_spec")
        if not isinstance(node["children_spec"], list):
            raise _bad(path, "input/output structure is malformed", "in_spec")
        for child in node["children_spec"]:
            walk(child, depth + 1)

    try:
        document = json.loads(text) if isinstance(text, str) else None
    except ValueError as e:
        raise _bad(path, "input/output structure is not JSON", "in_spec") from e
    if not (isinstance(document, list) and len(document) == 2 and isinstance(document[0], int)):
        raise _bad(path, "input/output structure is malformed", "in_spec")
    try:
        walk(document[1], 0)
    except ValueError as e:
        raise _bad(path, "input/output structure keys are not JSON", "in_spec") from e
    return text


def check_program(program: Any, *, path: str | None) -> dict[str, Any]:
    """A sanitised copy of a program's JSON: metadata and guard code dropped, everything else
    checked against the positive list. Raises UnsafeContentError on anything outside it."""

    def walk(value: Any, key: str | None, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise _bad(path, "nested too deeply")
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str) or not SAFE_STRING.fullmatch(k):
                    raise _bad(path, f"name {str(k)[:60]!r} has characters outside [A-Za-z0-9_.]")
                if k == "metadata":
                    out[k] = {}
                elif k == "guards_code":
                    out[k] = []
                elif k in ("custom_obj", "as_custom_obj", "custom_obj_values") and v:
                    raise _bad(path, "custom (script) objects are not supported", k)
                elif k in ("target", "as_operator"):
                    if not isinstance(v, str) or not operator_allowed(v):
                        raise _bad(path, f"operator {str(v)[:80]!r} is not allowed", k)
                    out[k] = v
                elif k == "expr_str":
                    out[k] = check_expression(v, path=path)
                elif k in ("in_spec", "out_spec"):
                    out[k] = _check_treespec(v, path=path)
                elif k in FREE_STRING_KEYS:
                    if not isinstance(v, str) or len(v) > MAX_FREE_STRING:
                        raise _bad(path, "string value is too long", k)
                    out[k] = v
                elif k == "as_strings":
                    if not isinstance(v, list) or not all(
                        isinstance(s, str) and len(s) <= MAX_FREE_STRING for s in v
                    ):
                        raise _bad(path, "string list is malformed", k)
                    out[k] = v
                else:
                    out[k] = walk(v, k, depth + 1)
            return out
        if isinstance(value, list):
            return [walk(v, key, depth + 1) for v in value]
        if isinstance(value, str):
            if not SAFE_STRING.fullmatch(value):
                raise _bad(path, f"value {value[:60]!r} has characters outside [A-Za-z0-9_.]", key)
            return value
        if value is None or isinstance(value, (bool, int, float)):
            return value
        raise _bad(path, f"unexpected JSON value of type {type(value).__name__}", key)

    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise records.bad_record(path, "graph program is not an object with a graph_module", "program")
    return walk(program, None, 0)


def _input_specs(program: dict[str, Any], *, path: str | None) -> list[dict[str, Any]]:
    try:
        specs = program["graph_module"]["signature"]["input_specs"]
    except (KeyError, TypeError) as e:
        raise records.bad_record(path, "graph program has no input signature", "program") from e
    if not isinstance(specs, list) or not all(isinstance(s, dict) and len(s) == 1 for s in specs):
        raise records.bad_record(path, "graph input signature is malformed", "program")
    return specs


def lifted_names(program: dict[str, Any], *, path: str | None) -> tuple[list[str], list[str], list[str]]:
    """Parameter, persistent-buffer and constant names the program reads, and a check that every
    user input is a tensor."""
    parameters, buffers, constants = [], [], []
    for spec in _input_specs(program, path=path):
        kind, body = next(iter(spec.items()))
        if not isinstance(body, dict):
            raise records.bad_record(path, "graph input spec is malformed", "program")
        if kind == "user_input":
            if not isinstance(body.get("arg"), dict) or "as_tensor" not in body["arg"]:
                raise _bad(path, "only tensor inputs are supported", "input_specs")
        elif kind == "parameter":
            parameters.append(_fqn(body.get("parameter_name"), path))
        elif kind == "buffer":
            name = _fqn(body.get("buffer_name"), path)
            (buffers if body.get("persistent") else constants).append(name)
        elif kind == "tensor_constant":
            constants.append(_fqn(body.get("tensor_constant_name"), path))
        else:
            raise _bad(path, f"input kind {kind!r} is not supported", "input_specs")
    return parameters, buffers, constants


def _fqn(name: Any, path: str | None) -> str:
    if not isinstance(name, str) or not records.FQN_PATTERN.fullmatch(name):
        raise _bad(path, f"attribute name {str(name)[:60]!r} is not plain", "input_specs")
    return name


def check_graph_objects(module: torch.fx.GraphModule, *, path: str | None) -> None:
    """After building: every call in every (sub)graph is an allowed operator object."""
    allowed_python = {operator.getitem} | set(_sym_ops()) - {operator.pow, operator.lshift}
    for graph_module in module.modules():
        graph = getattr(graph_module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            target = node.target
            ok = node.op == "call_function" and (
                target in allowed_python
                or (isinstance(target, torch._ops.OpOverload) and target.namespace in ("aten", "prims"))
                or (isinstance(target, torch._ops.HigherOrderOperator) and target.name() in _HIGHER_ORDER)
            )
            if node.op == "call_module" and str(node.target).startswith("_guards_fn"):
                ok = False
            if not ok:
                raise _bad(path, f"node {node.name} calls {target!r} ({node.op})", "graph")
