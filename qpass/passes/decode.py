"""Float linears at decode as Inductor reductions: ``y[..., n] = sum_k x[..., k] * W[n, k]``.

At one token a float ``F.linear`` is a matrix-vector product, bound by reading the weight. ATen
runs it as a GEMM with M = 1 (``aten::mm``), which on these CPUs reads at a fraction of the memory
bandwidth and on one thread whatever ``torch.get_num_threads()`` says: SmolLM2's fp32 ``lm_head``
(49152 x 576, 113 MB, left in full precision by the presets' ``skip``) took 7.0 ms per token with 1
and with 2 threads, a third of a whole decode step. Written as a broadcast multiply and a sum over
K, Inductor emits one vectorised C++ reduction, parallel over the outputs, that streams the weight
once: 2.0 ms (2 threads, AVX-512 VNNI machine). Inductor has the same rewrite for small CPU matmuls
(``decompose_mem_bound_mm``), limited to weights of at most 2048 x 2048.

A bfloat16 / float16 model's head is summed the same way in float32 (the upcasts fuse into the
reduction's loads, so the weight is read once at its own width) and rounded to the model's dtype at
the end, as ATen's half-precision GEMMs accumulate. SmolLM2 in bf16, 1 thread: its ``lm_head`` by
``aten::mm`` took 3.9 ms per token, by oneDNN after torchao's freezing 1.8 ms
(``bench/results/profile_decode_smollm2_bf16_1thread.md``).

Only under Inductor (eagerly the product would be materialised), only where the graph's token count
is a static ``<= FLOAT_DECODE_M`` and the weight a large float ``(N, K)`` parameter of the input's
dtype read by ``F.linear``. The result is summed in another order (fp32: relative differences ~1e-6;
half precision: the final rounding may differ by one unit in the last place), not bit-equal to
``aten::mm``. Quantized linears are untouched (they have their own kernels).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import fx

from qpass.graph import QGraph, meta_value
from qpass.report import Report

__all__ = ["float_decode_linears", "reduction_linear", "realized_row", "realized", "FLOAT_DECODE_M", "FLOAT_DECODE_MIN_NUMEL", "FLOAT_DECODE_LABEL",
           "FLOAT_DECODE_DTYPES"]

logger = logging.getLogger(__name__)

#: Most tokens (product of the input's leading dims) a reduction-form linear is used for.
FLOAT_DECODE_M = 1
#: Smallest weight (elements) worth it: below, ``aten::mm``'s call costs about what it reads.
FLOAT_DECODE_MIN_NUMEL = 1 << 20
FLOAT_DECODE_LABEL = "fp32 reduction (Inductor, decode)"
#: The dtypes whose large linears are rewritten, and their report labels.
FLOAT_DECODE_DTYPES = {torch.float32: FLOAT_DECODE_LABEL, torch.bfloat16: "bf16 reduction, fp32 sums (Inductor, decode)",
                       torch.float16: "fp16 reduction, fp32 sums (Inductor, decode)"}


def float_decode_linears(qg: QGraph, report: Report) -> int:
    """Rewrite the graph's large float linears at decode into multiply + sum; returns how many."""
    done = 0
    for site in qg.linears():
        if site.reader is not site.node or site.reader.target is not F.linear or site.node in qg.quantized:
            continue  # the other spellings (addmm, x @ W.T + b) keep their op; quantized ones theirs
        w = qg.value(site.weight_node)
        shape = qg.shape(site.input)
        if w is None or w.dtype not in FLOAT_DECODE_DTYPES or w.device.type != "cpu" or w.numel() < FLOAT_DECODE_MIN_NUMEL:
            continue
        if shape is None or qg.shape(site.node) is None:
            continue
        m = 1
        for d in shape[:-1]:
            m = m * d if isinstance(d, int) and isinstance(m, int) else None
        if m is None or m > FLOAT_DECODE_M or qg.value(site.input) is not None:
            continue
        x, bias = site.input, site.bias_node
        dtype = meta_value(x).dtype
        if dtype != w.dtype:
            continue
        before = site.node
        weight = site.weight_node
        if dtype != torch.float32:  # sums in float32, as ATen's half-precision GEMMs accumulate
            x = qg.call(torch.ops.prims.convert_element_type.default, (x, torch.float32), before=before)
            weight = qg.call(torch.ops.prims.convert_element_type.default, (weight, torch.float32), before=before)
        y = reduction_linear(qg, x, weight, *w.shape, before)
        if dtype != torch.float32:
            y = qg.call(torch.ops.prims.convert_element_type.default, (y, dtype), before=before)
        if bias is not None:
            y = qg.call(torch.add, (y, bias), before=before)
        site.node.replace_all_uses_with(y)
        qg.graph.erase_node(site.node)
        report.row(site.path).add_kernel(FLOAT_DECODE_DTYPES[dtype])
        logger.info("%s: %s linear at %d token(s) as an Inductor reduction", site.path, str(dtype).removeprefix("torch."), m)
        done += 1
    return done


def reduction_linear(qg: QGraph, x: fx.Node, weight: fx.Node, n: int, k: int, before: fx.Node) -> fx.Node:
    """``F.linear(x, weight)`` without bias for one token ``x`` and an ``(N, K)`` ``weight`` node (a float
    parameter, or a dequantization Inductor fuses into the sum), as ``sum(row * weight, -1)`` over
    ``realized_row``, shaped as ``x``'s leading dims and N."""
    row = realized_row(qg, x, k, before)  # (1, 1, K)
    prod = qg.call(torch.mul, (row, weight), before=before)  # (1, N, K), fused away under Inductor
    y = qg.call(torch.sum, (prod, -1), before=before)  # (1, N)
    return qg.call(torch.reshape, (y, (*meta_value(x).shape[:-1], n)), before=before)


def realized_row(qg: QGraph, x: fx.Node, k: int, before: fx.Node) -> fx.Node:
    """One token's ``x`` (any strides) as a contiguous ``(1, 1, K)`` row through an explicit
    ``as_strided``, for a reduction-form linear to read. Inductor realizes an ``as_strided``'s input
    (it reinterprets a buffer), so what computes ``x`` (a decoder's final RMSNorm) runs once; inlined,
    it ran inside the sum's loop for every output row (SmolLM2's ``lm_head``, 1 thread: 4.3 ms with
    an int8 weight, as slow as the fp32 weight, against 1.1 ms from a computed row). The clone keeps
    the eager ``as_strided`` exact whatever ``x``'s strides."""
    return realized(qg, qg.call(torch.reshape, (x, (1, k)), before=before), (1, 1, k), before)


def realized(qg: QGraph, x: fx.Node, shape: tuple[int, ...], before: fx.Node) -> fx.Node:
    """``x``'s values as a contiguous tensor of the static ``shape`` (same number of elements), through
    ``clone`` + ``as_strided``: Inductor realizes an ``as_strided``'s input, so what computes ``x`` runs
    once instead of being inlined into the loops of every reader (a reduction's, say)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    x = qg.call(torch.ops.aten.clone.default, (x,), {"memory_format": torch.contiguous_format}, before=before)
    return qg.call(torch.as_strided, (x, tuple(shape), tuple(reversed(strides))), before=before)
