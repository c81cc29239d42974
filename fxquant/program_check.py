"""What a saved program may contain: the check that keeps loading a graph file from running code.

``torch.export``'s JSON form of a program (``torch._export.serde``) is data, but three kinds of its
strings become code when PyTorch rebuilds the module: symbolic-shape expressions go through
``sympy.sympify`` (which ``eval``\\s), input guards are compiled into a Python function, and node
names, targets and attribute paths are written into the module's generated ``forward``.  So before
anything is deserialized, :func:`check_program` walks the whole program (the schema's dataclasses,
as the deserializer will see them) and accepts a string only where a rule for that field says what it
may be; a field without a rule must hold no string:

- node targets: op overloads registered under ``torch.ops.aten`` (not ``from_file``) or
  ``torch.ops.fxquant`` (looked up in the op registry), Python's operators (``_operator.add``,
  ``getitem``, ...) and ``torch.sym_*``; no higher-order ops, no operator arguments, no custom
  (torchbind) objects;
- names (nodes, values, arguments, inputs): Python identifiers without ``__``; parameter, buffer and
  constant names: dotted paths of such words;
- shape expressions: Python expressions of numbers, shape symbols (``s0``) and a fixed list of
  sympy functions (``Symbol('s0', positive=True)``, ``Max``, ``FloorDiv``, ...): no attributes, no
  subscripts, no other names;
- guards: comparisons and arithmetic over ``L['input'].size()[i]``-style reads, numbers, short
  strings and a few math functions.
Node metadata (stack traces, module stacks) is dropped on save and ignored on load.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Callable

import torch

__all__ = ["check_program", "strip_metadata", "ProgramError"]


class ProgramError(ValueError):
    """A saved program holds something fxquant will not rebuild (named in the message)."""


_IDENT = re.compile(r"(?!__)[A-Za-z_][A-Za-z0-9_]*")
_PATH = re.compile(r"(?!__)[A-Za-z0-9_]+(\.(?!__)[A-Za-z0-9_]+)*")
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
_SAFE_STR = re.compile(r"[A-Za-z0-9_ .\-]*")
_NUMBER = re.compile(r"-?[0-9.e+]+")
_OPERATORS = {"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos", "eq", "ne",
              "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs"}
_SYM_FNS = {"sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_sqrt", "sym_not"}
_DENIED_ATEN = {"from_file"}


def _overload(namespace: str, name: str, overload: str) -> bool:
    """Whether ``torch.ops.<namespace>.<name>.<overload>`` is a registered op overload (looked up in
    the op registry; dunder names are aten's own, such as ``__and__``)."""
    if not (_IDENT.fullmatch(name) or re.fullmatch(r"__[a-z]+__", name)) or not _IDENT.fullmatch(overload):
        return False
    try:
        op = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    except (AttributeError, RuntimeError):
        return False
    return isinstance(op, torch._ops.OpOverload)


def _target(s: str) -> None:
    parts = s.split(".")
    if len(parts) == 5 and parts[:3] == ["torch", "ops", "aten"]:
        if parts[3] in _DENIED_ATEN:
            raise ProgramError(f"op {s} reads files; a saved fxquant program may not call it")
        if _overload(*parts[2:]):
            return
    if len(parts) == 5 and parts[:3] == ["torch", "ops", "fxquant"]:
        if _overload(*parts[2:]):
            return
        raise ProgramError(f"op {s} is not one of this fxquant's ops (written by a newer fxquant?)")
    if (len(parts) == 2 and ((parts[0] == "_operator" and parts[1] in _OPERATORS)
                             or (parts[0] == "torch" and parts[1] in _SYM_FNS) or s == "math.trunc")):
        return
    raise ProgramError(f"node target {s!r} is not an aten or fxquant op or a Python operator")


# ---- expressions --------------------------------------------------------------------------------------------
_SYMPY_FNS = {
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "StrictLessThan", "StrictGreaterThan", "LessThan",
    "GreaterThan", "Equality", "Unequality", "Piecewise", "ExprCondPair", "sqrt",
    # torch.utils._sympy.functions, as the deserializer names them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "OpaqueUnaryFn_sqrt"}
_SYMPY_CONSTS = {"oo", "zoo", "nan", "true", "false", "pi", "E"}
_ARITH = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd, ast.BitOr, ast.BitXor)
_CMP = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_UNARY = (ast.USub, ast.UAdd, ast.Not, ast.Invert)


def _parse(s: str, what: str) -> ast.AST:
    try:
        return ast.parse(s, mode="eval").body
    except (SyntaxError, ValueError):
        raise ProgramError(f"{what} {s!r} is not an expression") from None


def _operators_ok(node: ast.AST) -> bool:
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, _ARITH)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, _UNARY)
    if isinstance(node, ast.Compare):
        return all(isinstance(o, _CMP) for o in node.ops)
    return isinstance(node, (ast.BoolOp, ast.Tuple, ast.expr_context, ast.operator, ast.unaryop, ast.cmpop, ast.boolop))


def _sympy_expr(s: str) -> None:
    """A shape expression: numbers, symbols, allowed sympy calls and operators, nothing else."""
    for node in ast.walk(_parse(s, "shape expression")):
        if _operators_ok(node) or isinstance(node, ast.keyword) and node.arg and _IDENT.fullmatch(node.arg):
            continue
        if isinstance(node, ast.Constant) and (type(node.value) in (int, float, bool) or (
                isinstance(node.value, str) and (_SYMBOL.fullmatch(node.value) or _NUMBER.fullmatch(node.value)))):
            continue
        if isinstance(node, ast.Name) and (node.id in _SYMPY_FNS | _SYMPY_CONSTS or _SYMBOL.fullmatch(node.id)):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SYMPY_FNS:
            continue
        raise ProgramError(f"shape expression {s!r}: {ast.unparse(node)!r} is not allowed "
                           "(only numbers, shape symbols and sympy's arithmetic functions)")


_GUARD_FNS = {"max", "min", "abs", "int", "float", "IsNonOverlappingAndDenseIndicator"}
_MATH = {"floor", "ceil", "trunc", "sqrt", "isnan", "isinf", "inf", "log2"}
_TENSOR_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}


def _input_read(node: ast.AST) -> bool:
    """``L['x']``, ``L['x']['k'][0]``, ``L['x'].size()[1]``: reads of the inputs."""
    while True:
        if isinstance(node, ast.Name):
            return node.id == "L"
        if isinstance(node, ast.Subscript):
            key = node.slice
            if not (isinstance(key, ast.Constant) and (type(key.value) is int or (
                    isinstance(key.value, str) and _SAFE_STR.fullmatch(key.value)))):
                return False
            node = node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _TENSOR_METHODS
              and not node.keywords and all(isinstance(a, ast.Constant) and type(a.value) is int for a in node.args)):
            node = node.func.value
        else:
            return False


def _guard(s: str) -> None:
    """An input guard: comparisons and arithmetic over input reads, numbers and a few functions."""
    def ok(node: ast.AST) -> bool:
        if _operators_ok(node):
            return all(ok(c) for c in ast.iter_child_nodes(node))
        if isinstance(node, ast.Constant):
            return node.value is None or type(node.value) in (int, float, bool) or (
                isinstance(node.value, str) and bool(_SAFE_STR.fullmatch(node.value)))
        if isinstance(node, ast.Name):
            return node.id == "inf"
        if isinstance(node, ast.Attribute):
            return isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr in _MATH
        if isinstance(node, (ast.Subscript, ast.Call)) and _input_read(node):
            return True
        if isinstance(node, ast.Call) and not node.keywords:
            fn_ok = (isinstance(node.func, ast.Name) and node.func.id in _GUARD_FNS) or (
                isinstance(node.func, ast.Attribute) and ok(node.func))
            return fn_ok and all(ok(a) for a in node.args)
        return False

    if not ok(_parse(s, "guard")):
        raise ProgramError(f"guard {s!r} is not of the allowed form (comparisons over input sizes)")


# ---- the walk -------------------------------------------------------------------------------------------------
def _match(regex: re.Pattern, what: str) -> Callable[[str], None]:
    def check(s: str) -> None:
        if not regex.fullmatch(s):
            raise ProgramError(f"{what} {s!r} is not allowed")
    return check


def _any(s: str) -> None:  # data: an op's string argument, written into generated code with repr()
    return None


def _pytree_spec(s: str) -> None:
    """A pytree spec (read by ``pytree.treespec_loads``): JSON whose types are registered pytree node
    types; no context may carry an ``__enum__`` entry (its reader imports the module it names)."""
    import json

    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE

    def no_enum(x: Any) -> bool:
        if isinstance(x, dict):
            return "__enum__" not in x and all(no_enum(v) for v in x.values())
        return all(no_enum(v) for v in x) if isinstance(x, list) else True

    def node(spec: Any) -> None:
        if not isinstance(spec, dict) or not isinstance(spec.get("children_spec", []), list):
            raise ProgramError(f"pytree spec node {str(spec)[:80]!r} is malformed")
        typ, ctx = spec.get("type"), spec.get("context")
        if typ is not None and typ not in SERIALIZED_TYPE_TO_PYTHON_TYPE:
            raise ProgramError(f"pytree spec names type {typ!r}, which is not a registered pytree node type "
                               "(import the library that defines it, e.g. transformers, before loading)")
        try:
            parsed = json.loads(ctx) if isinstance(ctx, str) else ctx
        except json.JSONDecodeError:
            parsed = None
        if not no_enum(parsed):
            raise ProgramError(f"pytree spec context {str(ctx)[:80]!r} names an enum (its reader imports modules)")
        for child in spec.get("children_spec", []):
            node(child)

    try:
        protocol, body = json.loads(s)
    except (json.JSONDecodeError, TypeError, ValueError):
        raise ProgramError(f"pytree spec {s[:80]!r} is not [protocol, spec] JSON") from None
    node(body)


_name, _path = _match(_IDENT, "name"), _match(_PATH, "attribute path")
#: (schema class, field) -> check of a string value there; (class, field, "key") for dict keys
RULES: dict[tuple, Callable[[str], None]] = {
    ("Device", "type"): _match(re.compile(r"[a-z]+"), "device type"),
    ("SymExpr", "expr_str"): _sympy_expr,
    **{(c, "as_name"): _name for c in ("SymIntArgument", "SymFloatArgument", "SymBoolArgument")},
    **{(c, "name"): _name for c in ("TensorArgument", "TokenArgument", "GraphArgument", "NamedArgument", "Node",
                                    "InputToConstantInputSpec")},
    ("GradientToUserInputSpec", "user_input_name"): _name, ("UserInputMutationSpec", "user_input_name"): _name,
    ("ModuleCallSignature", "forward_arg_names"): _name, ("NamedTupleDef", "field_names"): _name,
    ("Argument", "as_string"): _any, ("Argument", "as_strings"): _any, ("ConstantValue", "as_string"): _any,
    ("Argument", "as_string_to_argument", "key"): _name,
    ("Node", "target"): _target,
    **{(c, f): _path for c, f in [("InputToParameterSpec", "parameter_name"), ("InputToBufferSpec", "buffer_name"),
                                  ("InputToTensorConstantSpec", "tensor_constant_name"),
                                  ("BufferMutationSpec", "buffer_name"), ("ParameterMutationSpec", "parameter_name"),
                                  ("GradientToParameterSpec", "parameter_name")]},
    ("ModuleCallSignature", "in_spec"): _pytree_spec, ("ModuleCallSignature", "out_spec"): _pytree_spec,
    ("ModuleCallEntry", "fqn"): _match(re.compile(r"[A-Za-z0-9_.@]*"), "module path"),
    ("GraphModule", "treespec_namedtuple_fields", "key"): _match(re.compile(r"[A-Za-z0-9_.]+"), "type name"),
    **{("Graph", f, "key"): _name for f in ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values")},
    ("ExportedProgram", "opset_version", "key"): _match(re.compile(r"[a-z_]+"), "opset"),
    ("ExportedProgram", "range_constraints", "key"): _match(_SYMBOL, "shape symbol"),
    ("ExportedProgram", "verifiers"): _match(re.compile(r"[A-Z_]+"), "verifier"),
    ("ExportedProgram", "torch_version"): _match(re.compile(r"[0-9A-Za-z.+_\-<=]*"), "torch version"),
    ("ExportedProgram", "guards_code"): _guard,
}


def _walk(obj: Any, where: str) -> None:
    from torch._export.serde.union import _Union

    if isinstance(obj, _Union):
        fields = [(obj.type, obj.value)]
    elif dataclasses.is_dataclass(obj):
        fields = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    else:
        raise ProgramError(f"{where}: unexpected {type(obj).__name__}")
    cls = type(obj).__name__
    for name, value in fields:
        _value(cls, name, value, f"{where}.{name}")


def _value(cls: str, field: str, v: Any, where: str) -> None:
    if v is None or type(v) in (bool, int, float):
        return
    if isinstance(v, str):
        rule = RULES.get((cls, field))
        if rule is None:
            raise ProgramError(f"{where}: a string ({v[:80]!r}) where fxquant's program format allows none")
        try:
            rule(v)
        except ProgramError as e:
            raise ProgramError(f"{where}: {e}") from None
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _value(cls, field, x, f"{where}[{i}]")
    elif isinstance(v, dict):
        for k, x in v.items():
            rule = RULES.get((cls, field, "key"))
            if rule is None:
                raise ProgramError(f"{where}: a key ({str(k)[:80]!r}) where fxquant's program format allows none")
            try:
                rule(k)
            except ProgramError as e:
                raise ProgramError(f"{where}: {e}") from None
            _value(cls, field, x, f"{where}[{k!r}]")
    else:
        _walk(v, where)


def strip_metadata(program: dict) -> dict:
    """``program`` (the JSON object) without node and module metadata (stack traces, module stacks:
    debugging aids the loaded module does not need, and strings fxquant would otherwise have to vet)."""
    gm = program.get("graph_module")
    if isinstance(gm, dict):
        gm["metadata"] = {}
        graph = gm.get("graph")
        for node in graph.get("nodes", []) if isinstance(graph, dict) else []:
            if isinstance(node, dict):
                node["metadata"] = {}
    return program


def check_program(program: dict):
    """The schema object of ``program`` (the JSON of ``torch._export.serde.serialize``), checked
    string by string as the module docstring says; ``ProgramError`` naming the first offence."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import _dict_to_dataclass

    try:
        sep = _dict_to_dataclass(schema.ExportedProgram, program)
    except Exception as e:  # noqa: BLE001 - any shape the schema does not accept
        raise ProgramError(f"the program is not in torch.export's schema ({type(e).__name__}: {e})") from None
    _walk(sep, "program")
    return sep
