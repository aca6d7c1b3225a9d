"""ReLU-family activation: ``fc2(act(fc1(x)))`` with ``act`` positively homogeneous (OPT's MLP).

Search::

    h = relu(x @ W1.T + b1)     # or leaky_relu(., slope), prelu(., a), x.relu()
    y = h @ W2.T

Fold: ``1/s`` into fc1's output rows (``W1[r, :] /= s``, ``b1[r] /= s``), since for ``s > 0``
``relu(z / s) == relu(z) / s``; ``W2[:, j] *= s[j]``. Not for gelu / silu / relu6 / clamp (no such
identity: those MLPs keep the inserted multiply). fc1's output and the activation's must have no
other reader (the smoothing pass's escape analysis checks both regions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpass.graph import QGraph

from .base import Absorber
from .linear_linear import row_fold
from .walk import homogeneous_arg, row_fold_regions, walk_back


def match(qg: QGraph, producer: fx.Node, scaled: torch.Tensor) -> Absorber | None:
    if (z := homogeneous_arg(producer)) is None or _shape(z) != _shape(producer):
        return None  # not a relu-family op, or one that broadcasts its input
    fc1_node, path = walk_back(z, qg)
    site = qg.site(fc1_node)
    if site is None or (found := row_fold_regions(fc1_node, path, producer)) is None:
        return None
    rows, regions = found
    return Absorber("relu-act", site.path, row_fold(site, rows), regions, site=site, rows=rows)


def _shape(node: fx.Node):
    val = node.meta.get("example_value", node.meta.get("val"))
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


class Example(nn.Module):
    """OPT's MLP: fc1 -> relu -> fc2."""

    def __init__(self, dim: int = 16, hidden: int = 24):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))
