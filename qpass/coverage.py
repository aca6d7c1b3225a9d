"""Where every parameter goes: what reads each parameter of a graph, recorded before the passes run,
so that the report can say how much of the model each stage touched and why the rest stays in full
precision (``Report.summary``), and so that a graph holding parameters but no linear is not
compiled quietly in full precision.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import fx

from qpass.graph import QGraph
from qpass.report import ParamInfo, Report

__all__ = ["survey", "no_linear_warning"]

_EMBEDDINGS = {F.embedding, torch.embedding, torch.nn.functional.embedding_bag}


def survey(qg: QGraph, report: Report, names: Mapping[torch.Tensor, str] | None = None) -> None:
    """Record in ``report.params`` every parameter ``qg`` holds and what reads it (a linear's weight
    or bias, an embedding lookup, another op); with ``names`` (every parameter of the bound model),
    record the whole model in ``report.model_params``. Call before the passes rewrite ``qg``."""
    if names is not None:
        for p, path in list(names.items()):
            report.model_params[path] = (p.numel(), p.numel() * p.element_size(), p.dim())
    path_of = {node: _canonical(qg, node, names) for node in qg.params}
    uses: dict[fx.Node, set[str]] = {node: set() for node in qg.params}
    linear_nodes: set[fx.Node] = set()  # the linears and the constant chains of their weights and biases
    for site in [*qg.linears(), *qg.experts()]:  # fused expert weights are read like a linear's
        linear_nodes |= {site.node, site.reader}
        for role, arg in (("weight", site.weight_node), ("bias", site.bias_node)):
            chain = _constant_chain(qg, arg)
            linear_nodes |= chain
            for node in chain & uses.keys():
                uses[node].add(f"{role} of {site.path}")
    for node in qg.params:
        for user in node.users:
            if user not in linear_nodes:
                uses[node].add("embedding" if _is_embedding(user) else f"op {_op_name(user)}")
    for node, (_, value) in qg.params.items():
        info = report.params.setdefault(
            path_of[node], ParamInfo(value.numel(), value.numel() * value.element_size(), value.dim())
        )
        info.uses.update(uses[node])


def no_linear_warning(qg: QGraph, model_class: str | None) -> str | None:
    """The warning for a graph that holds parameters but no linear qpass can quantize; None otherwise."""
    if not qg.params or qg.linears() or qg.experts():
        return None
    paths = sorted({_canonical(qg, n, None) for n in qg.params})
    values = sum(v.numel() for _, v in qg.params.values())
    who = model_class or _outer_class(qg) or "the compiled function"
    return (
        f"qpass: a compiled graph of {who} holds {len(paths)} parameters ({values:,} values) but no linear "
        f"qpass can quantize (nn.Linear, F.linear, x @ W.T, addmm, fused experts' grouped matmuls); they stay in full precision: {', '.join(paths)}"
    )


def _canonical(qg: QGraph, node: fx.Node, names) -> str:
    path, value = qg.params[node]
    return (names.get(value) if names is not None else None) or path


def _constant_chain(qg: QGraph, node) -> set[fx.Node]:
    """``node`` and the nodes it is computed from, if constant (``W.t()`` -> {``W.t()``, ``W``})."""
    out, stack = set(), [node]
    while stack:
        n = stack.pop()
        if isinstance(n, fx.Node) and n not in out and (n in qg.params or qg.value(n) is not None):
            out.add(n)
            stack.extend(n.all_input_nodes)
    return out


def _is_embedding(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _EMBEDDINGS


def _op_name(node: fx.Node) -> str:
    if node.op == "output":
        return "graph output"
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _outer_class(qg: QGraph) -> str | None:
    """The outermost module class Dynamo recorded (the compiled model's child, e.g. ``LlamaModel``)."""
    best = None
    for node in qg.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            source, cls = next(iter(stack.values()))
            if best is None or len(source) < len(best[0]):
                best = (source, getattr(cls, "__name__", str(cls)))
    return best[1] if best else None
