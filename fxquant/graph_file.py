"""The ``graph`` kind of fxquant file: a module ``fxquant.compile`` returned, as JSON plus tensors.

Saving re-exports the module with the example inputs it was compiled with (batch and sequence
dims dynamic) and writes the program with ``torch.export``'s own JSON serializer, asking it for the
graph only: the parameters, buffers and constants it would pickle are safetensors tensors instead
(``state/<name>``, ``const/<name>``), and the example inputs are a JSON tree whose tensors are stored
too (``example/<i>``).  The input guards PyTorch added itself (``frontend.framework_exclusions``)
are dropped from the program before it is written, so the loaded module checks exactly the guards
the saved one did.  Node metadata (stack traces) is not written.

Loading checks the program string by string (:mod:`fxquant.program_check`), matches its parameter,
buffer and constant names with the file's tensors, then deserializes it with those tensors: no
pickle, and no string of the file is run as code.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import torch

from .frontend import EXAMPLE_KEY, GUARDS_KEY, export_program, framework_exclusions, module_of
from .program_check import ProgramError, check_program, strip_metadata
from .report import REPORT_KEY, Report

__all__ = ["document", "rebuild"]


# ---- example inputs as JSON -------------------------------------------------------------------------------------
def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"example/{len(tensors)}"
        tensors[key] = value
        return {"tensor": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in value.items()}}
    raise TypeError(f"fxquant.save: example input {where} is a {type(value).__name__}; the file stores tensors, "
                    "None, bool, int, float, str and tuples, lists and str-keyed dicts of them "
                    "(compile with such example inputs, or save with format='pt2')")


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise ProgramError(f"example input entry {str(node)[:80]!r} is malformed")
    (tag, v), = node.items()
    if tag == "tensor" and v in tensors:
        return tensors[v]
    if tag == "value" and (v is None or isinstance(v, (bool, int, float, str))):
        return v
    if tag in ("tuple", "list") and isinstance(v, list):
        items = [_decode(x, tensors) for x in v]
        return tuple(items) if tag == "tuple" else items
    if tag == "dict" and isinstance(v, dict):
        return {k: _decode(x, tensors) for k, x in v.items()}
    raise ProgramError(f"example input entry {str(node)[:80]!r} is malformed")


# ---- save -------------------------------------------------------------------------------------------------------
def document(qm: torch.fx.GraphModule, dynamic: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """The document and tensors of the ``graph`` kind for ``qm`` (see the module docstring)."""
    from torch._export.serde.serialize import serialize

    args, kwargs = qm.meta[EXAMPLE_KEY]
    tensors: dict[str, torch.Tensor] = {}
    example = _encode((tuple(args), dict(kwargs)), tensors, "")
    ep = export_program(qm, args, kwargs, dynamic)
    kept = set(qm.meta.get(GUARDS_KEY, ()))
    droppable = {g for g in framework_exclusions(ep) if g not in kept}
    ep._guards_code = [g for g in (ep._guards_code or []) if g not in droppable]
    art = serialize(ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    program = strip_metadata(json.loads(art.exported_program))
    try:
        check_program(program)  # what load accepts: refuse now rather than write a file that cannot load
    except ProgramError as e:
        raise ValueError(f"fxquant.save: the exported program holds what fxquant's file format does not store: "
                         f"{e}; save with format='pt2' (a torch.export archive) instead") from None
    state = {}
    for name, t in ep.state_dict.items():
        tensors[f"state/{name}"] = t.detach()
        state[name] = {"parameter": isinstance(t, torch.nn.Parameter), "requires_grad": t.requires_grad}
    constants = []
    for name, t in ep.constants.items():
        if type(t) is not torch.Tensor:
            raise ValueError(f"fxquant.save: program constant {name!r} is a {type(t).__name__}, not a tensor; "
                             "save with format='pt2' instead")
        tensors[f"const/{name}"] = t
        constants.append(name)
    doc = {"kind": "graph", "program": program, "state": state, "constants": constants, "example": example,
           "report": qm.meta[REPORT_KEY].to_dict()}
    return doc, tensors


# ---- load -------------------------------------------------------------------------------------------------------
def _names(sep) -> tuple[set[str], set[str]]:
    """The state-dict names (parameters, persistent buffers) and constant names the program reads."""
    state, consts = set(), set()
    for spec in sep.graph_module.signature.input_specs:
        kind, v = spec.type, spec.value
        if kind == "parameter":
            state.add(v.parameter_name)
        elif kind == "buffer":
            (state if v.persistent else consts).add(v.buffer_name)
        elif kind == "tensor_constant":
            consts.add(v.tensor_constant_name)
    return state, consts


def rebuild(doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], path: str) -> torch.fx.GraphModule:
    """The GraphModule a ``graph`` document describes, its tensors from ``tensors``."""
    from torch._export.serde.serialize import ExportedProgramDeserializer, SerializeError

    try:
        program = strip_metadata(dict(doc["program"]))
        sep = check_program(program)
        state_spec, const_names = dict(doc["state"]), list(doc["constants"])
        example = _decode(doc["example"], tensors)
        report = Report.from_dict(doc["report"])
    except ProgramError as e:
        raise ValueError(f"fxquant.load: {path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"fxquant.load: {path}: malformed graph document ({type(e).__name__}: {e})") from None
    if not (isinstance(example, tuple) and len(example) == 2 and isinstance(example[0], tuple)
            and isinstance(example[1], dict)):
        raise ValueError(f"fxquant.load: {path}: the example inputs are not (args, kwargs)")
    want_state, want_consts = _names(sep)
    for what, want, have in (("parameters and buffers", want_state, set(state_spec)),
                             ("constants", want_consts, set(const_names))):
        if want != have:
            raise ValueError(f"fxquant.load: {path}: the program reads {what} {sorted(want - have)} the file does not "
                             f"list, and the file lists {sorted(have - want)} the program does not read")
    used = {f"state/{n}" for n in state_spec} | {f"const/{n}" for n in const_names}
    missing = sorted(used - set(tensors))
    unused = sorted(k for k in set(tensors) - used if not k.startswith("example/"))
    if missing or unused:
        raise ValueError(f"fxquant.load: {path}: tensors the program reads are missing from the file ({missing}), "
                         f"or the file holds tensors nothing reads ({unused})")
    state = {}
    for name, spec in state_spec.items():
        t = tensors[f"state/{name}"]
        state[name] = torch.nn.Parameter(t, requires_grad=bool(spec["requires_grad"])) if spec["parameter"] else t
    constants = {name: tensors[f"const/{name}"] for name in const_names}
    try:
        ep = ExportedProgramDeserializer().deserialize(sep, state, constants, example)
        gm = module_of(ep, droppable=[])
    except SerializeError as e:
        raise ValueError(f"fxquant.load: {path}: torch {torch.__version__} cannot read the program (saved with torch "
                         f"{sep.torch_version}): {e}") from None
    except Exception as e:  # noqa: BLE001 - a program the deserializer rejects: name the file
        raise ValueError(f"fxquant.load: {path}: the program does not deserialize ({type(e).__name__}: {e})") from e
    gm.meta[REPORT_KEY] = report
    gm.meta[EXAMPLE_KEY] = (tuple(example[0]), dict(example[1]))
    return gm
