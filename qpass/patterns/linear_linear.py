"""linear–linear: a linear whose output channels reach the next linear unmixed.

Search (v_proj -> o_proj through attention; with GQA one v channel feeds
``heads // kv_heads`` o_proj input channels, so they share one scale)::

    v = (x @ Wv.T).view(b, t, kv_heads, d).transpose(1, 2)
    o = sdpa(q, k, v).transpose(1, 2).reshape(b, t, heads * d) @ Wo.T

Fold: ``Wv[p, :] /= s[p]``, ``bv[p] /= s[p]``; ``Wo[:, j] *= s[index[j]]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpass.graph import QGraph

from .base import Absorber, ArgEdits, Region
from .walk import probe_for


def match(qg: QGraph, producer: fx.Node, scaled: torch.Tensor) -> Absorber | None:
    site = qg.site(producer)
    if site is None:
        return None
    probe = probe_for(producer)
    rows = torch.arange(probe.shape[-1])
    return Absorber(
        "linear-linear", site.path, row_fold(site, rows), [Region([producer], {producer: probe}, scaled)], site=site, rows=rows
    )


def row_fold(site, rows: torch.Tensor):
    """Divide output row ``rows[p]`` of the linear at ``site`` (and its bias) by ``s[p]``."""

    def fold(edits: ArgEdits, s: torch.Tensor) -> None:
        w = edits.weight(site).clone()
        if site.weight_t:  # Conv1D, x @ W.T: (in, out)
            w[:, rows] = (w[:, rows] / s).to(w.dtype)
        else:
            w[rows, :] = (w[rows, :] / s[:, None]).to(w.dtype)
        edits.set_weight(site, w)
        if (b := edits.bias(site)) is not None:
            b = b.clone()
            b[rows] = (b[rows] / s).to(b.dtype)
            edits.set_bias(site, b)

    return fold


class Example(nn.Module):
    """Grouped-query attention: 4 query heads share 2 value heads."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, kv_heads * self.d)
        self.v = nn.Linear(dim, kv_heads * self.d)
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(a.transpose(1, 2).reshape(b, t, -1))
