"""gated activation: ``act(gate) * up -> down`` (SwiGLU, GeGLU, fused gate_up).

Search::

    h = act(x @ Wg.T) * (x @ Wu.T)      # or gate, up = (x @ Wgu.T).chunk(2, -1)
    y = h @ Wd.T

Fold: ``1/s`` into up's output rows (``Wu[r, :] /= s``, bias too), since
``act(g) * (u / s) == (act(g) * u) / s``; ``Wd[:, j] *= s[j]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpass.graph import QGraph

from .base import Absorber, Region
from .linear_linear import row_fold
from .walk import NotChannelPreserving, is_mul, probe_for, trace_channels, walk_back


def match(qg: QGraph, producer: fx.Node, scaled: torch.Tensor) -> Absorber | None:
    if not is_mul(producer) or len(producer.args) != 2:
        return None
    operands = [a for a in producer.args if isinstance(a, fx.Node)]
    if len(operands) != 2 or any(qg.value(a) is not None for a in operands):
        return None
    for up in reversed(operands):  # prefer the right operand: act(gate) * up
        up_producer, up_path = walk_back(up, qg)
        site = qg.site(up_producer)
        if site is None:
            continue
        try:
            walk = trace_channels(up_producer, up_path)
        except NotChannelPreserving:
            continue
        if walk.index.unique().numel() != walk.index.numel():
            continue  # one up row feeding two product channels cannot take two scales
        up_rows = torch.zeros(walk.probes[up_producer].shape[-1], dtype=torch.bool)
        up_rows[walk.index] = True
        probe = probe_for(producer)
        regions = [
            Region([up_producer, *up_path], walk.probes, up_rows),
            Region([producer], {producer: probe}, torch.ones(probe.shape[-1], dtype=torch.bool)),
        ]
        return Absorber("gated-act", site.path, row_fold(site, walk.index), regions, site=site, rows=walk.index)
    return None


class Example(nn.Module):
    """SwiGLU MLP."""

    def __init__(self, dim: int = 16, hidden: int = 24):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))
