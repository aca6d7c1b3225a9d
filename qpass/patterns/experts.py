"""gated activation per expert: ``act(gate) * up -> down`` inside a mixture-of-experts layer.

Search (transformers' grouped-matmul experts; rows sorted by expert, ``offs`` their segment ends)::

    h = grouped_mm(x_sorted, Wgu.transpose(-2, -1), offs)       # Wgu: (E, 2I, H)
    gate, up = h.chunk(2, dim=-1)
    y = grouped_mm(act(gate) * up, Wd.transpose(-2, -1), offs)   # Wd: (E, H, I)

Fold, one scale per expert and channel: ``Wgu[e, I + j, :] /= s[e, j]``, ``Wd[e, :, j] *= s[e, j]``.
Row ``r`` of both grouped matmuls belongs to the same expert only if both read the same ``offs`` and
nothing between them moves rows: every op on the way must keep each row where it is (``_ROW_WISE``);
the smoothing pass checks the readers' ``offs``.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from qpass.graph import ExpertsSite, QGraph

from .base import Absorber, ArgEdits
from .walk import NotChannelPreserving, is_mul, product_factors, row_fold_regions, walk_back

# Ops that keep every row of a (rows, channels) value in place (the chunk / getitem of a fused
# gate_up, casts); anything else between the two grouped matmuls refuses the per-expert fold.
_ROW_WISE_METHODS = {"chunk", "split", "to", "float", "half", "bfloat16", "type_as", "type", "contiguous"}


def match(qg: QGraph, producer: fx.Node, scaled: torch.Tensor) -> Absorber | None:
    for up in product_factors(qg, producer):  # act(gate) * up
        up_producer, up_path = walk_back(up, qg)
        site = qg.experts_site(up_producer)
        if site is None or (found := row_fold_regions(up_producer, up_path, producer)) is None:
            continue
        if (why := moves_rows([*up_path, producer], rows_of(up_producer))) is not None:
            raise NotChannelPreserving(f"per-expert fold refused: {why}")
        rows, regions = found
        experts = qg.value(site.weight_node).shape[0]
        return Absorber("gated-act", site.path, expert_row_fold(site, rows), regions, experts, site.offsets)
    return None


def rows_of(node: fx.Node) -> int | None:
    val = node.meta.get("example_value", node.meta.get("val"))
    return int(val.shape[0]) if isinstance(val, torch.Tensor) and val.dim() == 2 else None


def moves_rows(path: list[fx.Node], rows: int | None) -> str | None:
    """Why ``path`` (ops between two grouped matmuls) may move rows; None when each op keeps
    every row of its (rows, channels) input in place."""
    if rows is None:
        return "the grouped matmul's output is not (rows, channels)"
    for node in path:
        ok = (
            (node.op == "call_method" and node.target in _ROW_WISE_METHODS and _last_dim(node))
            or (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int))
            or is_mul(node)
        )
        val = node.meta.get("example_value", node.meta.get("val"))
        shaped = isinstance(val, (tuple, list)) or (isinstance(val, torch.Tensor) and val.dim() == 2 and val.shape[0] == rows)
        if not ok or not shaped:
            return f"{node.name} may move rows between the grouped matmuls"
    return None


def _last_dim(node: fx.Node) -> bool:
    if node.target not in ("chunk", "split"):
        return True
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    return dim in (-1, 1)


def expert_row_fold(site: ExpertsSite, rows: torch.Tensor):
    """Divide output row ``rows[p]`` of expert ``e`` (the weight argument's column: (E, K, N)) by ``s[e, p]``."""

    def fold(edits: ArgEdits, s: torch.Tensor) -> None:
        w = edits.weight(site).clone()
        s = s if s.dim() == 2 else s.expand(w.shape[0], -1)
        w[:, :, rows] = (w[:, :, rows] / s[:, None, :]).to(w.dtype)
        edits.set_weight(site, w)

    return fold


class _Experts(nn.Module):
    """Fused experts as transformers lays them out and runs them (``grouped_mm`` implementation)."""

    def __init__(self, dim: int, hidden: int, experts: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * hidden, dim) / dim**0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, dim, hidden) / hidden**0.5)

    def _apply_gate(self, h):
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    def forward(self, hidden_states, top_k_index, top_k_weights):
        from transformers.integrations.moe import _grouped_mm  # fp32 on CPU: its fallback op

        k, experts = top_k_index.shape[-1], self.gate_up_proj.shape[0]
        ids, perm = top_k_index.reshape(-1).sort()
        xs = hidden_states[perm // k]
        offs = torch.cumsum(torch.histc(ids.float(), bins=experts, min=0, max=experts - 1), 0, dtype=torch.int32)
        h = self._apply_gate(_grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offs=offs))
        y = _grouped_mm(h, self.down_proj.transpose(-2, -1), offs=offs) * top_k_weights.reshape(-1)[perm, None]
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        return y[inv].view(hidden_states.shape[0], k, -1).sum(1)


class Example(nn.Module):
    """A router picking 2 of 4 experts per token."""

    def __init__(self, dim: int = 16, hidden: int = 8, experts: int = 4):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = _Experts(dim, hidden, experts)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.gate(flat).softmax(-1).topk(2, dim=-1)
        return self.experts(flat, idx, w).view(x.shape)
