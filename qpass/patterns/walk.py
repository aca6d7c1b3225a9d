"""Walking from a linear's input back to the op that produced its channels.

Between a producer (a norm, a linear, a gated product) and the linear that reads
it, models put ops that move channels around without mixing them: views,
transposes, casts, dropout, head splits, a split of a fused projection, and for
v_proj -> o_proj, the attention itself (linear in V along V's channels). The walk
follows those ops back; the op where it stops is the *producer*.

Which producer channel feeds which consumer input channel is then read off
numerically: the path is replayed on a probe whose value at channel ``c`` is
``c`` (constant over every other dimension), with attention replaced by "copy V
to every query". A path is channel-preserving exactly when the probe arrives as
a gather: integer-valued and constant over every dimension but the last. The
resulting index map covers GQA head sharing, fused-projection offsets and head
reshapes without a rule for each.

The probe shows where channels go, not that the op is linear in them: that holds only
through one argument (sdpa's value, the second operand of ``attn @ v``, one factor of a
product, the input of ``relu``). ``nonlinear_use`` is the check that a scaled value enters there
and only there.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

from .base import Region

__all__ = [
    "Walk", "NotChannelPreserving", "walk_back", "trace_channels", "replay", "probe_for", "nonlinear_use", "is_mul",
    "homogeneous_arg", "product_factors", "row_fold_regions",
]


class NotChannelPreserving(Exception):
    """The path between producer and consumer mixes or loses channels."""


# Ops a walk passes through, each with the index of its data argument and why it is safe.
_METHODS = {
    # layout: values move, none combine
    "view": 0, "reshape": 0, "contiguous": 0, "transpose": 0, "permute": 0, "unsqueeze": 0,
    "squeeze": 0, "flatten": 0, "unflatten": 0, "expand": 0, "clone": 0, "split": 0, "chunk": 0,
    # casts: per element
    "to": 0, "float": 0, "half": 0, "bfloat16": 0, "double": 0, "type_as": 0, "type": 0,
}
_FUNCTIONS = {
    torch.reshape: 0, torch.transpose: 0, torch.permute: 0, torch.flatten: 0, torch.unsqueeze: 0,
    torch.squeeze: 0, torch.clone: 0, torch.split: 0, torch.chunk: 0,
    operator.getitem: 0,  # row indexing, head slicing, a chunk of a split
    F.dropout: 0,  # a per-element mask: dropout(x / s) == dropout(x) / s
    F.scaled_dot_product_attention: 2,  # softmax(qk) @ v is linear in v, channel by channel
    torch.matmul: 1, operator.matmul: 1, torch.bmm: 1,  # a @ v: linear in v's last dim
    torch.cat: None,  # only when every other operand is empty (an empty KV cache)
}
MUL_TARGETS = {operator.mul, torch.mul}
_ARG_NAMES = {F.scaled_dot_product_attention: ("query", "key", "value", "attn_mask")}
_LINEAR_IN = {F.scaled_dot_product_attention: "value", torch.matmul: "its second operand",
              operator.matmul: "its second operand", torch.bmm: "its second operand"}
# Elementwise activations that commute with a positive scale, act(z / s) == act(z) / s for every
# s > 0 (positively homogeneous of degree 1), each with its data argument. Not gelu, silu, tanh,
# relu6 / hardtanh / clamp(max=...) (a fixed threshold), elu (its exp), rrelu (a random slope).
_HOMOGENEOUS = {
    F.relu: 0, torch.relu: 0, torch.relu_: 0,  # max(z, 0)
    F.leaky_relu: 0,  # max(z, 0) + slope * min(z, 0), any slope
    torch.prelu: 0,  # (F.prelu) the same with a learned slope per channel (argument 1, unscaled)
}
_HOMOGENEOUS_METHODS = {"relu", "relu_"}
_CASTS = {"to", "float", "half", "bfloat16", "double", "type_as", "type"}
_ATTENTION = {F.scaled_dot_product_attention, torch.matmul, operator.matmul, torch.bmm}


def _data_arg(node: fx.Node) -> fx.Node | None:
    """The argument a transparent op carries channels through, or None if ``node`` is no such op."""
    if node.op == "call_method" and node.target in _METHODS:
        arg = node.args[0]
    elif node.op == "call_function" and node.target in _FUNCTIONS:
        if node.target is torch.cat:
            return _cat_data_arg(node)
        idx = _FUNCTIONS[node.target]
        key = {F.scaled_dot_product_attention: "value"}.get(node.target, "input")
        arg = node.args[idx] if len(node.args) > idx else node.kwargs.get(key)
    else:
        return None
    return arg if isinstance(arg, fx.Node) else None


def _cat_data_arg(node: fx.Node) -> fx.Node | None:
    tensors = node.args[0]
    live = [t for t in tensors if not _is_empty(t)]
    return live[0] if len(live) == 1 and isinstance(live[0], fx.Node) else None


def _is_empty(node) -> bool:
    val = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and _hint(val.numel()) == 0


def _hint(v):
    if isinstance(v, torch.SymInt):
        return v.node.hint if v.node.hint is not None else v.node.require_hint()
    return v


def _concrete(node):
    """A real stand-in for a node off the probe path: its size hints, or zeros of its shape."""
    if not isinstance(node, fx.Node):
        return node
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, torch.SymInt):
        return _hint(val)
    if isinstance(val, torch.Tensor):
        return torch.zeros([_hint(s) for s in val.shape], dtype=torch.float64)
    if isinstance(val, (int, float, bool, torch.dtype)) or val is None:
        return val
    raise NotChannelPreserving(f"cannot evaluate {node.name}")


def homogeneous_arg(node: fx.Node) -> fx.Node | None:
    """The data argument of a positively homogeneous activation (``relu``, ``leaky_relu``, ``prelu``),
    or None if ``node`` is no such op."""
    if node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS:
        arg = node.args[0]
    elif node.op == "call_function" and node.target in _HOMOGENEOUS:
        arg = node.args[0] if node.args else node.kwargs.get("input")
    else:
        return None
    return arg if isinstance(arg, fx.Node) else None


def walk_back(node: fx.Node, qg=None) -> tuple[fx.Node, list[fx.Node]]:
    """Follow transparent ops back from ``node`` (stopping at a linear of ``qg``: ``x @ W.T``
    is one, not attention). Returns the producer and the path (producer side first, ending
    with ``node``; empty if ``node`` is the producer)."""
    path = []
    while (arg := _data_arg(node)) is not None and not (qg is not None and qg.site(node)):
        path.append(node)
        node = arg
    path.reverse()
    return node, path


def is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in MUL_TARGETS) or (
        node.op == "call_method" and node.target == "mul"
    )


def nonlinear_use(user: fx.Node, node: fx.Node, scaled: set[fx.Node]) -> str | None:
    """Why dividing ``node`` (one of the ``scaled`` values) by ``s`` does not divide ``user`` by
    ``s``; None when it does: ``node`` is ``user``'s data argument (one factor of a product, the
    input of a positively homogeneous activation) and no other argument is scaled. ``u * u``,
    ``sdpa(v, v, v)``, ``prelu(h, h)`` are not linear in ``u``, ``v``, ``h``."""
    uses = []
    for i, arg in enumerate(user.args):
        label = _ARG_NAMES.get(user.target, ())[i:i + 1] or (f"argument {i}",)
        fx.node.map_arg(arg, lambda a: uses.append((label[0], a)) if a in scaled else None)
    for key, arg in user.kwargs.items():
        fx.node.map_arg(arg, lambda a: uses.append((key, a)) if a in scaled else None)
    linear = user.args[:2] if is_mul(user) else (_data_arg(user) or homogeneous_arg(user),)
    if len(uses) == 1 and uses[0][1] is node and any(a is node for a in linear):
        return None
    what = ", ".join(label for label, _ in uses)
    target = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", str(user.target))
    only = "one factor" if is_mul(user) else _LINEAR_IN.get(user.target, "its input")
    return f"{target} ({user.name}) reads scaled values as {what}; it is linear only in {only}"


def probe_for(node: fx.Node) -> torch.Tensor:
    """Value ``c`` at channel ``c`` of ``node``'s output, constant everywhere else."""
    val = node.meta.get("example_value", node.meta.get("val"))
    shape = [_hint(s) for s in val.shape]
    return torch.arange(shape[-1], dtype=torch.float64).expand(shape).clone()


def replay(node: fx.Node, env: dict[fx.Node, torch.Tensor]):
    """Evaluate one transparent op on probe values (``env``) and stand-ins."""
    if node.op == "call_method" and node.target in _CASTS:
        return env[node.args[0]]  # keep the exact float64 probe
    if node.op == "call_function" and node.target is F.dropout:
        return env[node.args[0]]
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], fx.Node):
        return _gather_rows(node, env)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a] if a in env else _concrete(a))
    if node.op == "call_function" and node.target in _ATTENTION:
        return _attend(node, args, kwargs)
    if node.op == "call_function" and node.target is torch.cat:
        return torch.cat([t for t in args[0] if t.numel()], *args[1:], **kwargs)
    if node.op == "call_method":
        # the graph's view succeeded on the real layout; a probe (expanded, transposed) may not be
        # viewable the same way, and reshape gives the same values. A dtype view is not a reshape:
        # it fails here and the path is refused.
        target = "reshape" if node.target == "view" else node.target
        return getattr(torch.Tensor, target)(*args, **kwargs)
    return node.target(*args, **kwargs)


def _gather_rows(node: fx.Node, env: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
    """``x[index]`` with a tensor index (a mixture-of-experts layer gathering the rows routed to
    each expert: ``hidden[perm // top_k]``). Its values are known only at run time, so the replay
    proves the channel map only where the index cannot reach the channels: an integer index
    selects whole rows of the first dimension, a boolean mask covers fewer dimensions than ``x`` has."""
    data, index = node.args
    if index in env:
        raise NotChannelPreserving(f"{node.name} indexes with a scaled value")
    x = env[data]
    val = index.meta.get("example_value", index.meta.get("val"))
    if not isinstance(val, torch.Tensor) or x.dim() < 2:
        raise NotChannelPreserving(f"{node.name}: a data-dependent index over the channels")
    shape = [_hint(n) for n in val.shape]
    if val.dtype == torch.bool:
        if val.dim() >= x.dim():
            raise NotChannelPreserving(f"{node.name}: a boolean mask over the channels")
        return x[torch.ones(shape, dtype=torch.bool)]
    if val.dtype.is_floating_point or val.dtype.is_complex:
        raise NotChannelPreserving(f"{node.name}: indexed with a {val.dtype} tensor")
    return x[torch.zeros(shape, dtype=torch.long)]


def _attend(node: fx.Node, args, kwargs) -> torch.Tensor:
    """Attention / matmul on a probe V that is constant over tokens: every output
    row equals V's row (times a row sum of the weights, irrelevant for the map)."""
    if node.target is F.scaled_dot_product_attention:
        q = args[0] if len(args) > 0 else kwargs["query"]
        v = args[2] if len(args) > 2 else kwargs["value"]
        if q.shape[-3] != v.shape[-3]:
            if q.shape[-3] % v.shape[-3]:
                raise NotChannelPreserving("query heads are not a multiple of value heads")
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        lead = torch.broadcast_shapes(q.shape[:-2], v.shape[:-2])
        rows = q.shape[-2]
    else:
        a, v = args[0], args[1]
        if a.dim() < 2 or v.dim() < 2:
            raise NotChannelPreserving("matmul with a vector")
        lead = torch.broadcast_shapes(a.shape[:-2], v.shape[:-2])
        rows = a.shape[-2]
    if not bool((v == v[..., :1, :]).all()):
        raise NotChannelPreserving(f"{node.name} contracts over V's channels")
    return v[..., :1, :].expand(*lead, rows, v.shape[-1])


@dataclass
class Walk:
    """How one consumer reads its producer: ``index[j]`` is the producer channel
    behind the consumer's input channel ``j``."""

    producer: fx.Node
    path: list[fx.Node]
    index: torch.Tensor
    probes: dict[fx.Node, torch.Tensor] = field(repr=False, default_factory=dict)


def trace_channels(producer: fx.Node, path: list[fx.Node]) -> Walk:
    """Replay ``path`` on a channel probe of ``producer`` and read the channel map."""
    env = {producer: probe_for(producer)}
    for node in path:
        try:
            env[node] = replay(node, env)
        except NotChannelPreserving:
            raise
        except Exception as e:  # an op we cannot replay is an op we cannot trust
            raise NotChannelPreserving(f"cannot replay {node.name}: {e}") from e
    end = env[path[-1]] if path else env[producer]
    if not isinstance(end, torch.Tensor):
        raise NotChannelPreserving("the path ends in a non-tensor")
    rows = end.reshape(-1, end.shape[-1])
    if not bool((rows == rows[:1]).all()) or not bool((rows == rows.round()).all()):
        raise NotChannelPreserving("channels are mixed or moved across positions")
    return Walk(producer, path, rows[0].round().long(), env)


def product_factors(qg, producer: fx.Node) -> list[fx.Node]:
    """The factors of ``producer`` when it multiplies two computed values (``act(gate) * up``), the
    right one first (where ``up`` usually is); [] otherwise (no product, or a constant factor)."""
    if not is_mul(producer) or len(producer.args) != 2:
        return []
    operands = [a for a in producer.args if isinstance(a, fx.Node)]
    if len(operands) != 2 or any(qg.value(a) is not None for a in operands):
        return []
    return operands[::-1]


def row_fold_regions(source: fx.Node, path: list[fx.Node],
                     producer: fx.Node) -> tuple[torch.Tensor, list[Region]] | None:
    """For ``1/s`` folded into output rows of ``source`` (fc1, up, a fused gate_up) whose values reach
    ``producer``'s output channels (the activation, the gated product) along ``path``: ``(rows, regions)``,
    ``rows[j]`` the row of ``source`` behind ``producer``'s channel ``j``, and the two regions that then
    carry scaled values (``source`` and ``path`` on the rows used; all of ``producer``'s output), whose
    readers the smoothing pass checks. None where ``path`` mixes channels or one row of ``source``
    feeds two channels (it cannot take two scales)."""
    try:
        walk = trace_channels(source, path)
    except NotChannelPreserving:
        return None
    if walk.index.unique().numel() != walk.index.numel():
        return None
    used = torch.zeros(walk.probes[source].shape[-1], dtype=torch.bool)
    used[walk.index] = True
    probe = probe_for(producer)
    return walk.index, [
        Region([source, *path], walk.probes, used),
        Region([producer], {producer: probe}, torch.ones(probe.shape[-1], dtype=torch.bool)),
    ]
