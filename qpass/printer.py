"""A deterministic printer for rewritten graphs, for snapshot tests and for reading.

Nodes are numbered by position, parameters and constants are shown by module
path (``layers.0.mlp.down_proj.weight``) and every value by dtype and shape, so
the text does not depend on PyTorch's node names or object ids.
"""

from __future__ import annotations

import re

import torch
from torch import fx

__all__ = ["format_graph", "short_path"]

_DTYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.bool: "b8",
    torch.float8_e4m3fn: "f8e4m3",
}
_PREFIXES = ("model.decoder.", "model.", "transformer.")
_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear, torch.addmm)
_ATTENTION = (torch.nn.functional.scaled_dot_product_attention,)  # qpass.passes.attention rewrites its arguments


def short_path(path: str) -> str:
    """``model.layers.0.mlp.down_proj`` -> ``layers.0.mlp.down_proj``."""
    for p in _PREFIXES:
        if path.startswith(p):
            return path[len(p):]
    return path


def _tensor_type(val: torch.Tensor) -> str:
    dims = ",".join(str(d) for d in val.shape)
    return f"{_DTYPES.get(val.dtype, str(val.dtype))}[{dims}]"


def _type(node: fx.Node) -> str:
    val = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(val, torch.Tensor):
        return _tensor_type(val)
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(_tensor_type(v) for v in val if isinstance(v, torch.Tensor)) + ")"
    return ""


def _target(node: fx.Node) -> str:
    if node.op == "call_method":
        return "." + node.target
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        return str(t).replace("torch.ops.", "")
    return getattr(t, "__name__", str(t))


def _is_focus(node: fx.Node, names: dict[fx.Node, str]) -> bool:
    """Nodes that touch weights, constants or qpass ops, and attention: the part a rewrite changes."""
    if node.op in ("get_attr", "output"):
        return True
    if node.op == "placeholder":
        return node.name in names and names[node].startswith("param ")
    if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "qpass":
        return True
    if node.op == "call_function" and getattr(node.target, "__module__", "").startswith("qpass."):
        return True  # qpass's kernel wrappers (``int8_scaled_mm``, ...)
    if node.op == "call_function" and (node.target in _LINEARS or node.target in _ATTENTION):
        return True
    return any(a.op == "get_attr" or names.get(a, "").startswith("param ") for a in node.all_input_nodes)


def format_graph(gm: fx.GraphModule, *, focus: bool = True, param_names: dict[str, str] | None = None) -> str:
    """One line per node: ``%i = target(args) : dtype[shape]``.

    ``focus=True`` prints only nodes that read parameters or constants (linears,
    norm weights, quant/dequant) and qpass's own ops; other references stay ``%i``.
    """
    const_names = getattr(gm, "qpass_names", {})
    names: dict[fx.Node, str] = {}
    lines = []
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "placeholder":
            grapharg = node.meta.get("grapharg")
            src = grapharg.source.name if grapharg is not None else None
            src = src() if callable(src) else src
            if src and "_parameters" in src or (src and src.startswith("L['self']")):
                from qpass.graph import normalize_path

                names[node] = "param " + short_path(normalize_path(src))
            else:
                names[node] = f"%{i}"
        elif node.op == "get_attr":
            names[node] = "const " + short_path(const_names.get(node.target, node.target))
        else:
            names[node] = f"%{i}"
    for i, node in enumerate(gm.graph.nodes):
        if focus and not _is_focus(node, names):
            continue
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: _Ref(names[n]))
        args = (_hide_handles(node, args[0]), args[1])
        if node.op == "placeholder":
            lines.append(f"{names[node]} : {_type(node)}" if names[node].startswith("param") else f"{names[node]} = input : {_type(node)}")
        elif node.op == "get_attr":
            lines.append(f"{names[node]} : {_type(node)}")
        elif node.op == "output":
            continue
        else:
            rendered = ", ".join([_fmt(a) for a in args[0]] + [f"{k}={_fmt(v)}" for k, v in args[1].items()])
            lines.append(f"{names[node]} = {_target(node)}({rendered}) : {_type(node)}")
    return "\n".join(lines) + "\n"


def _hide_handles(node: fx.Node, args: tuple) -> tuple:
    """Registry handles (an op argument named ``handle``) count up per process: print ``handle``."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return args
    return tuple(_Ref("handle") if i < len(schema.arguments) and schema.arguments[i].name == "handle" else a
                 for i, a in enumerate(args))


class _Ref(str):
    def __repr__(self) -> str:
        return str(self)


def _fmt(a) -> str:
    if isinstance(a, (tuple, list)):
        inner = ", ".join(_fmt(x) for x in a)
        if isinstance(a, tuple):
            return f"({inner},)" if len(a) == 1 else f"({inner})"
        return f"[{inner}]"
    if isinstance(a, torch.dtype):
        return _DTYPES.get(a, str(a))
    if isinstance(a, float):
        return re.sub(r"(\.\d{4})\d+", r"\1", repr(a))
    return repr(a)
