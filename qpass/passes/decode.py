"""Float linears at decode as Inductor reductions: ``y[..., n] = sum_k x[..., k] * W[n, k]``.

At one token a float ``F.linear`` is a matrix-vector product, bound by reading the weight. ATen
runs it as a GEMM with M = 1 (``aten::mm``), which on these CPUs reads at a fraction of the memory
bandwidth and on one thread whatever ``torch.get_num_threads()`` says: SmolLM2's fp32 ``lm_head``
(49152 x 576, 113 MB, left in full precision by the presets' ``skip``) took 7.0 ms per token with 1
and with 2 threads, a third of a whole decode step. Written as a broadcast multiply and a sum over
K, Inductor emits one vectorised C++ reduction, parallel over the outputs, that streams the weight
once: 2.0 ms (2 threads, AVX-512 VNNI machine). Inductor has the same rewrite for small CPU matmuls
(``decompose_mem_bound_mm``), limited to weights of at most 2048 x 2048.

Only under Inductor (eagerly the product would be materialised), only where the graph's token count
is a static ``<= FLOAT_DECODE_M`` and the weight a large float32 ``(N, K)`` parameter read by
``F.linear``. The result is fp32 summed in another order (relative differences ~1e-6), not bit-equal
to ``aten::mm``. Quantized linears are untouched (they have their own kernels).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import fx

from qpass.graph import QGraph
from qpass.report import Report

__all__ = ["float_decode_linears", "reduction_linear", "realized_row", "FLOAT_DECODE_M", "FLOAT_DECODE_MIN_NUMEL", "FLOAT_DECODE_LABEL"]

logger = logging.getLogger(__name__)

#: Most tokens (product of the input's leading dims) a reduction-form linear is used for.
FLOAT_DECODE_M = 1
#: Smallest weight (elements) worth it: below, ``aten::mm``'s call costs about what it reads.
FLOAT_DECODE_MIN_NUMEL = 1 << 20
FLOAT_DECODE_LABEL = "fp32 reduction (Inductor, decode)"


def float_decode_linears(qg: QGraph, report: Report) -> int:
    """Rewrite the graph's large float32 linears at decode into multiply + sum; returns how many."""
    done = 0
    for site in qg.linears():
        if site.reader is not site.node or site.reader.target is not F.linear or site.node in qg.quantized:
            continue  # the other spellings (addmm, x @ W.T + b) keep their op; quantized ones theirs
        w = qg.value(site.weight_node)
        shape = qg.shape(site.input)
        if w is None or w.dtype != torch.float32 or w.device.type != "cpu" or w.numel() < FLOAT_DECODE_MIN_NUMEL:
            continue
        if shape is None or qg.shape(site.node) is None:
            continue
        m = 1
        for d in shape[:-1]:
            m = m * d if isinstance(d, int) and isinstance(m, int) else None
        if m is None or m > FLOAT_DECODE_M or qg.value(site.input) is not None:
            continue
        x, bias = site.input, site.bias_node
        if _val(x).dtype != torch.float32:
            continue
        before = site.node
        y = reduction_linear(qg, x, site.weight_node, *w.shape, before)
        if bias is not None:
            y = qg.call(torch.add, (y, bias), before=before)
        site.node.replace_all_uses_with(y)
        qg.graph.erase_node(site.node)
        report.row(site.path).add_kernel(FLOAT_DECODE_LABEL)
        logger.info("%s: fp32 linear at %d token(s) as an Inductor reduction", site.path, m)
        done += 1
    return done


def reduction_linear(qg: QGraph, x: fx.Node, weight: fx.Node, n: int, k: int, before: fx.Node) -> fx.Node:
    """``F.linear(x, weight)`` without bias for one token ``x`` and an ``(N, K)`` ``weight`` node (a float
    parameter, or a dequantization Inductor fuses into the sum), as ``sum(row * weight, -1)`` over
    ``realized_row``, shaped as ``x``'s leading dims and N."""
    row = realized_row(qg, x, k, before)  # (1, 1, K)
    prod = qg.call(torch.mul, (row, weight), before=before)  # (1, N, K), fused away under Inductor
    y = qg.call(torch.sum, (prod, -1), before=before)  # (1, N)
    return qg.call(torch.reshape, (y, (*_val(x).shape[:-1], n)), before=before)


def realized_row(qg: QGraph, x: fx.Node, k: int, before: fx.Node) -> fx.Node:
    """One token's ``x`` (any strides) as a contiguous ``(1, 1, K)`` row through an explicit
    ``as_strided``, for a reduction-form linear to read. Inductor realizes an ``as_strided``'s input
    (it reinterprets a buffer), so what computes ``x`` (a decoder's final RMSNorm) runs once; inlined,
    it ran inside the sum's loop for every output row (SmolLM2's ``lm_head``, 1 thread: 4.3 ms with
    an int8 weight, as slow as the fp32 weight, against 1.1 ms from a computed row). The clone keeps
    the eager ``as_strided`` exact whatever ``x``'s strides."""
    row = qg.call(torch.reshape, (x, (1, k)), before=before)
    row = qg.call(torch.ops.aten.clone.default, (row,), {"memory_format": torch.contiguous_format}, before=before)
    return qg.call(torch.as_strided, (row, (1, 1, k), (k, k, 1)), before=before)


def _val(node: fx.Node):
    return node.meta.get("val", node.meta.get("example_value"))
