"""linear–norm: a norm (or any per-channel scale) before the linears that read it.

Search::

    y = rms_norm(x) * w            # also F.rms_norm(x, shape, w), F.layer_norm(x, shape, w, b),
    q, k, v = y @ Wq.T, y @ Wk.T, y @ Wv.T      # Gemma's norm(x) * (1 + w)

Fold: ``w <- w / s`` (and ``b <- b / s``); every consumer's columns ``W[:, j] *= s[j]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpass.graph import QGraph

from .base import Absorber, ArgEdits, Region
from .walk import is_mul, probe_for

# norm op -> (weight position, bias position or None)
NORM_FUNCTIONS = {
    F.layer_norm: (2, 3),
    torch.layer_norm: (2, 3),
    F.rms_norm: (2, None),
    torch.rms_norm: (2, None),
}
_NORMALIZERS = {torch.rsqrt, F.layer_norm, F.rms_norm, F.normalize}


def match(qg: QGraph, producer: fx.Node, scaled: torch.Tensor) -> Absorber | None:
    if producer.op == "call_function" and producer.target in NORM_FUNCTIONS:
        return _norm_function(qg, producer)
    if is_mul(producer):
        return _scale_vector(qg, producer)
    return None


def _region(producer: fx.Node) -> Region:
    probe = probe_for(producer)
    return Region([producer], {producer: probe}, torch.ones(probe.shape[-1], dtype=torch.bool))


def _norm_function(qg: QGraph, node: fx.Node) -> Absorber:
    wpos, bpos = NORM_FUNCTIONS[node.target]
    name = qg.module_of(node)
    channels = probe_for(node).shape[-1]

    def fold(edits: ArgEdits, s: torch.Tensor) -> None:
        w = edits.get(node, wpos, "weight")
        w = torch.ones(channels, dtype=s.dtype) if w is None else w
        edits.set(node, wpos, (w / s).to(w.dtype), f"{name}.weight", "weight")
        if bpos is not None and (b := edits.get(node, bpos, "bias")) is not None:
            edits.set(node, bpos, (b / s).to(b.dtype), f"{name}.bias", "bias")

    return Absorber("linear-norm", name, fold, [_region(node)])


def _scale_vector(qg: QGraph, node: fx.Node) -> Absorber | None:
    if len(node.args) != 2 or node.kwargs:
        return None
    values = [qg.value(a) for a in node.args]
    if (values[0] is None) == (values[1] is None):
        return None  # two activations (a gated product) or two constants
    pos = 0 if values[0] is not None else 1
    vec, other = values[pos], node.args[1 - pos]
    channels = probe_for(node).shape[-1]
    if vec.numel() != channels or vec.shape[-1] != channels:
        return None  # a scalar or a full tensor, not a per-channel scale
    name = qg.module_of(node)
    kind = "linear-norm" if _is_normalized(other) else "channel-scale"

    # the scale is the norm's own weight, or computed from it (Gemma's ``1 + w``): the constant is
    # then no parameter's new value, and its name says so (a checkpoint cannot store it as ``weight``)
    arg = node.args[pos]
    direct = arg in qg.params or (isinstance(arg, fx.Node) and arg.op == "get_attr")
    const_name = f"{name}.weight" if direct else f"{name}.computed_scale"

    def fold(edits: ArgEdits, s: torch.Tensor) -> None:
        v = edits.get(node, pos)
        edits.set(node, pos, (v / s.reshape(v.shape)).to(v.dtype), const_name)

    return Absorber(kind, name, fold, [_region(node)])


def _is_normalized(node, depth: int = 4) -> bool:
    """A normalizer (rsqrt, layer_norm) within a few ops upstream."""
    if not isinstance(node, fx.Node) or depth < 0:
        return False
    if node.op == "call_function" and node.target in _NORMALIZERS:
        return True
    return any(_is_normalized(a, depth - 1) for a in node.all_input_nodes)


class Example(nn.Module):
    """RMSNorm -> q/k/v-like linears, written as transformers writes it."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.q, self.k = nn.Linear(dim, dim), nn.Linear(dim, 8, bias=False)

    def forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        y = self.weight * y.to(x.dtype)
        return self.q(y) + self.k(y).repeat(1, 1, 2)
