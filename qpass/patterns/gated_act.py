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

from .base import Absorber
from .linear_linear import row_fold
from .walk import product_factors, row_fold_regions, walk_back


def match(qg: QGraph, producer: fx.Node, scaled: torch.Tensor) -> Absorber | None:
    for up in product_factors(qg, producer):  # prefer the right operand: act(gate) * up
        up_producer, up_path = walk_back(up, qg)
        site = qg.site(up_producer)
        if site is None or (found := row_fold_regions(up_producer, up_path, producer)) is None:
            continue
        rows, regions = found
        return Absorber("gated-act", site.path, row_fold(site, rows), regions, site=site, rows=rows)
    return None


class Example(nn.Module):
    """SwiGLU MLP."""

    def __init__(self, dim: int = 16, hidden: int = 24):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))
