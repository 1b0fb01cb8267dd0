"""The ``modules`` strategy: a model made only of built-in ``torch.nn`` layers and containers is
stored as a tree of class names and constructor arguments, and rebuilt with no user code at all.

Arguments are read back from each layer by matching its ``__init__`` signature against its
attributes (``Conv2d(in_channels, ...)`` keeps ``self.in_channels``; a ``bias`` flag is whether the
bias tensor exists). Layers whose arguments are not attributes (transformer layers, multi-head
attention, recurrent layers) have small readers of their own. Whatever is read is proven at save
time by rebuilding the tree and comparing it with the original (``verify.check_same_structure``),
so a reading mistake is a refusal, never a silently different model.

Only classes of ``torch.nn`` itself are named, and they are looked up as attributes of
``torch.nn``: a file cannot make this module import anything.
"""

from __future__ import annotations

import collections
import functools
import inspect
import re
from typing import Any, Callable

import torch
from torch import nn

from modelkeep import errors
from modelkeep.arch import records

CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")
_DENY = {"Module", "Container", "ParameterDict", "ParameterList", "RNNBase", "RNNCellBase"}
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
CHILD_NAME = re.compile(r"[A-Za-z0-9_]+")
MAX_NODES = 100_000


@functools.lru_cache(maxsize=1)
def allowed_classes() -> dict[str, type[nn.Module]]:
    """``{name: class}`` of the torch.nn layers this strategy records."""
    found = {}
    for name in nn.modules.__all__:
        cls = getattr(nn, name, None)
        if (
            isinstance(cls, type)
            and issubclass(cls, nn.Module)
            and name not in _DENY
            and not name.startswith("Lazy")
        ):
            found[name] = cls
    return found


def class_name(module: nn.Module) -> str | None:
    """The torch.nn name of ``module``'s exact class, or None when it is not a built-in layer."""
    cls = type(module)
    name = cls.__name__
    return name if allowed_classes().get(name) is cls else None


def unsupported(model: nn.Module) -> list[str]:
    """Paths of submodules that keep ``model`` from being stored as a module tree (empty: OK)."""
    found = []

    def visit(module: nn.Module, where: str) -> None:
        name = class_name(module)
        if name is None:
            found.append(f"{where or '(root)'}: {type(module).__module__}.{type(module).__qualname__}")
            return
        # A layer's own submodules (attention's out_proj) come from its constructor and are
        # checked by rebuilding; what no record can say is a hook or a replaced forward.
        inside = [(where, module)] if name in CONTAINERS else module.named_modules(prefix=where)
        for path, sub in inside:
            if any(getattr(sub, table, None) for table in _HOOK_TABLES):
                found.append(f"{path or '(root)'}: has hooks")
            elif "forward" in vars(sub):
                found.append(f"{path or '(root)'}: forward replaced on the instance")
        if name in CONTAINERS:
            for child, sub in module.named_children():
                visit(sub, f"{where}.{child}" if where else child)

    visit(model, "")
    return found


# --------------------------------------------------------------------------------------------
# Reading constructor arguments


def _activation(value: Any) -> Any:
    """TransformerEncoderLayer keeps relu/gelu as functions; their constructor takes names."""
    if value is nn.functional.relu:
        return "relu"
    if value is nn.functional.gelu:
        return "gelu"
    return value


def _encoder_layer_args(m: Any) -> dict[str, Any]:
    return {
        "d_model": m.self_attn.embed_dim,
        "nhead": m.self_attn.num_heads,
        "dim_feedforward": m.linear1.out_features,
        "dropout": m.dropout.p,
        "activation": _activation(m.activation),
        "layer_norm_eps": m.norm1.eps,
        "batch_first": m.self_attn.batch_first,
        "norm_first": m.norm_first,
        "bias": m.linear1.bias is not None,
    }


def _transformer_args(m: Any) -> dict[str, Any]:
    first = m.encoder.layers[0]
    args = _encoder_layer_args(first)
    return {
        "d_model": m.d_model,
        "nhead": m.nhead,
        "num_encoder_layers": len(m.encoder.layers),
        "num_decoder_layers": len(m.decoder.layers),
        "dim_feedforward": args["dim_feedforward"],
        "dropout": args["dropout"],
        "activation": args["activation"],
        "layer_norm_eps": m.encoder.norm.eps,
        "batch_first": m.batch_first,
        "norm_first": args["norm_first"],
        "bias": args["bias"],
    }


def _rnn_args(m: Any) -> dict[str, Any]:
    args = {
        "input_size": m.input_size,
        "hidden_size": m.hidden_size,
        "num_layers": m.num_layers,
        "bias": m.bias,
        "batch_first": m.batch_first,
        "dropout": m.dropout,
        "bidirectional": m.bidirectional,
    }
    if isinstance(m, nn.LSTM):
        args["proj_size"] = m.proj_size
    if type(m) is nn.RNN:
        args["nonlinearity"] = m.nonlinearity
    return args


_READERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "TransformerEncoderLayer": _encoder_layer_args,
    "TransformerDecoderLayer": _encoder_layer_args,
    "TransformerEncoder": lambda m: {
        "encoder_layer": m.layers[0],
        "num_layers": len(m.layers),
        "norm": m.norm,
        "enable_nested_tensor": m.enable_nested_tensor,
        "mask_check": m.mask_check,
    },
    "TransformerDecoder": lambda m: {"decoder_layer": m.layers[0], "num_layers": len(m.layers), "norm": m.norm},
    "Transformer": _transformer_args,
    "MultiheadAttention": lambda m: {
        "embed_dim": m.embed_dim,
        "num_heads": m.num_heads,
        "dropout": m.dropout,
        "bias": m.in_proj_bias is not None,
        "add_bias_kv": m.bias_k is not None,
        "add_zero_attn": m.add_zero_attn,
        "kdim": m.kdim,
        "vdim": m.vdim,
        "batch_first": m.batch_first,
    },
    "RNN": _rnn_args,
    "LSTM": _rnn_args,
    "GRU": _rnn_args,
}


def _generic_args(module: nn.Module, where: str) -> dict[str, Any]:
    """Match ``__init__`` parameters with attributes of the same name."""
    args: dict[str, Any] = {}
    signature = inspect.signature(type(module).__init__)
    for name, parameter in list(signature.parameters.items())[1:]:
        if (
            name in ("device", "dtype")
            or name.startswith("_")
            or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        ):
            continue
        default = parameter.default
        if hasattr(module, name):
            value = getattr(module, name)
            if isinstance(default, bool) and (value is None or isinstance(value, torch.Tensor)):
                value = value is not None  # bias=True keeps a tensor, bias=False keeps None
        elif default is not parameter.empty:
            value = default
        else:
            raise errors.ArchitectureError(
                f"cannot read constructor argument {name!r} of {type(module).__name__}",
                item=where,
                fix="save with strategy='graph' and example_inputs",
            )
        if isinstance(value, torch.Tensor):
            raise errors.ArchitectureError(
                f"constructor argument {name!r} of {type(module).__name__} is a tensor",
                item=where,
                fix="save with strategy='graph' and example_inputs",
            )
        args[name] = value  # defaults too: a later torch may change them
    return args


def record_tree(module: nn.Module, where: str = "") -> dict[str, Any]:
    """The JSON node for ``module`` and everything below it."""
    name = class_name(module)
    label = where or "(root)"
    if name is None:
        raise errors.ArchitectureError(
            f"{type(module).__module__}.{type(module).__qualname__} is not a built-in torch.nn layer",
            item=label,
            fix="save with factory=... or strategy='graph' and example_inputs",
        )
    if name in CONTAINERS:
        children = {
            child: record_tree(sub, f"{where}.{child}" if where else child)
            for child, sub in module.named_children()
        }
        return {"class": f"torch.nn.{name}", "children": children}
    reader = _READERS.get(name)
    raw = reader(module) if reader else _generic_args(module, label)

    def nested(sub: nn.Module, item: str) -> dict[str, Any]:
        return record_tree(sub, item)

    args = {
        key: records.encode_value(value, item=f"{label}.{key}", module=nested) for key, value in raw.items()
    }
    return {"class": f"torch.nn.{name}", "args": args}


# --------------------------------------------------------------------------------------------
# Building


def build_tree(node: Any, *, path: str | None, where: str = "", budget: list[int] | None = None) -> nn.Module:
    """The module a node describes (call under ``torch.device('meta')``)."""
    budget = budget if budget is not None else [MAX_NODES]
    budget[0] -= 1
    label = where or "(root)"
    if budget[0] < 0:
        raise records.bad_record(path, f"more than {MAX_NODES} modules", label)
    if not isinstance(node, dict) or not isinstance(node.get("class"), str):
        raise records.bad_record(path, "module node must be an object with a class", label)
    if set(node) - {"class", "args", "children"}:
        raise records.bad_record(path, f"unknown keys {sorted(set(node) - {'class', 'args', 'children'})}", label)
    qualified = node["class"]
    name = qualified[len("torch.nn.") :] if qualified.startswith("torch.nn.") else ""
    cls = allowed_classes().get(name)
    if cls is None:
        raise errors.UnsafeContentError(
            "the module tree names a class that is not a built-in torch.nn layer; nothing was imported",
            path=path,
            item=f"{label}: {qualified}",
            fix="only torch.nn layers can be stored as a module tree; re-save the model",
        )
    if name in CONTAINERS:
        children = node.get("children", {})
        if not isinstance(children, dict) or "args" in node:
            raise records.bad_record(path, "a container has children and no args", label)
        built = collections.OrderedDict()
        for child, sub in children.items():
            if not CHILD_NAME.fullmatch(child):
                raise records.bad_record(path, f"bad child name {child!r}", label)
            built[child] = build_tree(sub, path=path, where=f"{where}.{child}" if where else child, budget=budget)
        if name == "ModuleList":
            if list(built) != [str(i) for i in range(len(built))]:
                raise records.bad_record(path, "ModuleList children must be named 0, 1, ...", label)
            return nn.ModuleList(built.values())
        if name == "ModuleDict":
            return nn.ModuleDict(built)
        return nn.Sequential(built)
    if "children" in node:
        raise records.bad_record(path, "only containers have children", label)
    raw_args = node.get("args", {})
    if not isinstance(raw_args, dict):
        raise records.bad_record(path, "args must be an object", label)

    def nested(sub: Any, item: str) -> nn.Module:
        return build_tree(sub, path=path, where=item, budget=budget)

    args = {
        key: records.decode_value(value, path=path, item=f"{label}.{key}", module=nested)
        for key, value in raw_args.items()
    }
    try:
        return cls(**args)
    except Exception as e:
        raise errors.ArchitectureError(
            f"torch.nn.{name}(**{args!r}) failed: {type(e).__name__}: {e}",
            path=path,
            item=label,
            fix="the record does not fit this torch version, or the file was edited; re-save it",
        ) from e

