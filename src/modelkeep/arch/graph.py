"""The ``graph`` strategy: a ``torch.export`` program stored as JSON, its tensors in the file.

torch's own ``.pt2`` format pickles the state dict, constants and example inputs. Here the program
is torch's JSON schema (``torch._export.serde``) inside the architecture record, and every tensor
(parameters, buffers, constants, the example inputs) is a safetensors entry, so loading needs
neither pickle nor the model's class.

A program is data that becomes code, so before torch sees one it passes ``programs.check_program``
(a positive list of operators, names and expressions) and, once built, ``check_graph_objects``.

The model is exported in eval mode with a dynamic batch dimension (``Dim.AUTO`` on dimension 0 of
every input), and the loaded module stays in eval mode.
"""

from __future__ import annotations

import functools
import json
import types
from typing import Any, Sequence

import torch

from modelkeep import errors
from modelkeep.arch import programs, records

INPUT_PREFIX = records.EXTRA_PREFIX + "input."
CONSTANT_PREFIX = records.EXTRA_PREFIX + "constant."
def _serde() -> types.ModuleType:
    from torch._export.serde import serialize

    return serialize


# --------------------------------------------------------------------------------------------
# Saving


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise errors.ArchitectureError(
            "example_inputs must be a tensor or a tuple of tensors (the positional inputs of forward)",
            item="example_inputs",
            fix="pass example_inputs=(torch.randn(2, 3, 224, 224),)",
        )
    return tuple(inputs)


def export(model: torch.nn.Module, example_inputs: Any) -> tuple[dict[str, Any], Any, tuple[torch.Tensor, ...]]:
    """``(record, exported program, inputs)`` for ``model`` exported in eval mode with a dynamic
    batch dimension. Refuses, with ArchitectureError, what cannot be stored safely."""
    inputs = _as_inputs(example_inputs)
    dynamic = tuple({0: torch.export.Dim.AUTO} if t.dim() else None for t in inputs)
    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(model, inputs, dynamic_shapes=dynamic)
    except Exception as e:
        raise errors.ArchitectureError(
            f"torch.export could not capture the model: {type(e).__name__}: {str(e)[:2000]}",
            item="example_inputs",
            fix="make forward exportable (see torch.export docs), or save with factory=... or as a "
            "module tree of torch.nn layers",
        ) from e
    finally:
        model.train(was_training)
    dynamic_dims = _dynamic_dims(program)
    if not any(0 in dims for dims in dynamic_dims):
        raise errors.ArchitectureError(
            "the batch dimension was fixed while exporting, so the saved graph would accept one "
            "batch size only",
            item="example_inputs",
            fix="pass example inputs with a batch of 2 or more, and keep forward independent of the "
            "batch size",
        )
    for name, value in program.constants.items():
        if not isinstance(value, torch.Tensor):
            raise errors.ArchitectureError(
                f"the exported program holds a {type(value).__name__} constant",
                item=name,
                fix="graph files hold tensors only; remove script objects from the model",
            )
    serialized = _serde().serialize(
        program, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False
    )
    try:
        document = programs.check_program(json.loads(serialized.exported_program), path=None)
    except errors.UnsafeContentError as e:
        raise errors.ArchitectureError(
            f"the exported graph cannot be stored safely: {e.what}",
            item=e.item,
            fix="use only standard tensor operations in forward, or save with factory=...",
        ) from e
    record = records.new_record(
        "graph",
        program=document,
        inputs=[
            {"tensor": f"{INPUT_PREFIX}{i}", "dynamic": dims} for i, dims in enumerate(dynamic_dims)
        ],
        constants={name: CONSTANT_PREFIX + name for name in program.constants},
    )
    return record, program, inputs


def _dynamic_dims(program: Any) -> list[list[int]]:
    from torch.export.graph_signature import InputKind

    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    found = []
    for name in names:
        value = nodes[name].meta.get("val")
        shape = getattr(value, "shape", ())
        found.append(
            [i for i, d in enumerate(shape) if isinstance(d, torch.SymInt) and d.node.maybe_as_int() is None]
        )
    return found


def tensors_to_store(
    record: dict[str, Any], program: Any, inputs: Sequence[torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[tuple[str, torch.Tensor]]]:
    """``(state dict, extras)``: the lifted parameters/buffers, then inputs and constants under
    their ``modelkeep.`` names."""
    state = {name: t.detach() for name, t in program.state_dict.items()}
    extras = [(spec["tensor"], t.detach()) for spec, t in zip(record["inputs"], inputs)]
    extras += [(record["constants"][name], t.detach()) for name, t in program.constants.items()]
    return state, extras


# --------------------------------------------------------------------------------------------
# Loading


def build(
    record: dict[str, Any],
    *,
    path: str,
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
    read: Any,
) -> torch.nn.Module:
    """The exported module, its parameters and buffers on the meta device (filled by the caller).

    ``shapes`` maps each stored name to (shape, dtype); ``read(names)`` returns real tensors for the
    few entries needed while building (constants, example inputs)."""
    program = programs.check_program(record.get("program"), path=path)
    inputs_spec = records.require(record, "inputs", list, path=path)
    constants_map = records.string_map(record, "constants", path=path, names=records.FQN_PATTERN)
    parameters, buffers, constants = programs.lifted_names(program, path=path)
    missing = [n for n in constants if n not in constants_map]
    if missing:
        raise records.bad_record(path, f"constants {missing[:5]} are not stored", "constants")
    input_names = []
    for spec in inputs_spec:
        if not isinstance(spec, dict) or not isinstance(spec.get("tensor"), str) or spec["tensor"] not in shapes:
            raise records.bad_record(path, "example input entry is malformed or not stored", "inputs")
        input_names.append(spec["tensor"])

    state: dict[str, torch.Tensor] = {}
    for name in parameters + buffers:
        if name not in shapes:
            raise errors.KeyMismatchError(
                "the graph reads a tensor the file does not hold", path=path, item=name, fix="re-save the model"
            )
        shape, dtype = shapes[name]
        tensor = torch.empty(shape, dtype=dtype, device="meta")
        if name in parameters:
            tensor = torch.nn.Parameter(tensor, requires_grad=dtype.is_floating_point)
        state[name] = tensor
    real = read([constants_map[n] for n in constants] + input_names)
    constant_values = {n: real[constants_map[n]] for n in constants}
    example = tuple(real[n] for n in input_names)

    serde = _serde()
    try:
        from torch._export.serde import schema

        document = serde._dict_to_dataclass(schema.ExportedProgram, program)
        exported = serde.ExportedProgramDeserializer().deserialize(document, state, constant_values, (example, {}))
        module = exported.module(check_guards=False)
    except errors.ModelkeepError:
        raise
    except Exception as e:
        raise errors.FormatError(
            f"graph program cannot be rebuilt: {type(e).__name__}: {str(e)[:1000]}",
            path=path,
            item="modelkeep.architecture",
            fix="the file was saved by an incompatible torch version or edited; re-save it",
        ) from e
    programs.check_graph_objects(module, path=path)
    _fix_mode(module)
    return module


def _fix_mode(module: torch.nn.Module) -> None:
    """Exported graphs are captured in eval mode; ``eval()`` works, ``train()`` says why not."""

    def set_mode(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
        if mode:
            raise errors.ArchitectureError(
                "a model loaded from a graph was captured in eval mode and cannot train",
                fix="save it with factory=... or as a module tree to train after loading",
            )
        for sub in self.modules():
            sub.training = False
        return self

    module.train = types.MethodType(set_mode, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(functools.partial(set_mode, mode=False), module)  # type: ignore[method-assign]
    set_mode(module, False)
