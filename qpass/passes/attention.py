"""Grouped-query attention on the key / value heads as stored, not repeated per query head.

A grouped-query decoder (Llama, Qwen, Mistral, SmolLM2: ``H`` query heads share ``G`` key / value
heads) repeats each key and value head ``H / G`` times before ``scaled_dot_product_attention``
(``repeat_kv``, or ``repeat_interleave`` on dim 1). Compiled, that repeat is a copy: at decode it
writes ``H / G`` copies of the whole KV cache for every layer, on every token. SDPA's ``enable_gqa``
reads the grouped heads directly (query head ``h`` attends with key / value head ``h // (H / G)``,
the repeat's order), and the CPU flash kernel runs it natively::

    before:  k5 = k[:, :, None, :, :]             after:  attn = sdpa(q, k, v, mask, enable_gqa=True)
             k_rep = k5.expand(B, G, H/G, S, D).reshape(B, H, S, D)
             v_rep = (the same for v)
             attn = sdpa(q, k_rep, v_rep, mask)

The result is the same numbers (the kernel computes each query head from the same key / value
rows; bit-equal in ``bench/attention.py``, logits within 1e-5 in the tests). One layer's decode
attention compiled alone (``bench/results/attention.json``, AVX-512 VNNI, a compiled call's ~25 us
included), SmolLM2's shapes (9 query heads on 3 KV heads, 528 cached positions, fp32): 166 -> 101
us at 1 thread, 119 -> 75 us at 2; the hidden-2048 Llama's (32 on 4): 522 -> 249 and 284 -> 149 us.
A prompt without padding gains nothing here: transformers already passes ``enable_gqa`` when there
is no mask.

Only where the key and value are repeated by the same factor, dropout is off and ``enable_gqa`` is
not already set (a repeat read elsewhere too stays for its other readers). Matched by shapes, so ``view`` /
``reshape`` / ``flatten`` / ``unsqueeze`` / indexing spellings of the repeat are one case.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx

from qpass.graph import QGraph, meta_value
from qpass.passes.decode import realized

__all__ = ["grouped_query_attention", "decode_attention", "repeated_heads"]

logger = logging.getLogger(__name__)

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _shape(node) -> tuple | None:
    val = meta_value(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _dtype(node) -> torch.dtype | None:
    val = meta_value(node)
    return val.dtype if isinstance(val, torch.Tensor) else None


def _is_method(node: fx.Node, *names: str) -> bool:
    return node.op == "call_method" and node.target in names


def _is_call(node: fx.Node, *fns) -> bool:
    return node.op == "call_function" and node.target in fns


def _only_size_one_insertions(index) -> bool:
    """An index of full slices, ``None`` and ``...`` only: a view that inserts size-1 dims."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items)


def repeated_heads(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(kv, n)`` when ``node`` is ``kv`` (``(B, G, S, D)``) with each head repeated ``n`` times in
    place, ``(B, G * n, S, D)`` (head ``g`` at ``g*n .. g*n + n - 1``); else None."""
    out = _shape(node)
    if out is None or len(out) != 4:
        return None
    if _is_call(node, torch.repeat_interleave) or _is_method(node, "repeat_interleave"):
        kv = node.args[0]
        repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if (not isinstance(kv, fx.Node) or not isinstance(repeats, int) or dim not in (1, -3)
                or node.kwargs.get("output_size") is not None):
            return None
        src = _shape(kv)
        return (kv, repeats) if src is not None and len(src) == 4 and out == (src[0], src[1] * repeats, *src[2:]) else None
    # reshape(expand(unsqueeze(kv, 2), B, G, n, S, D), B, G*n, S, D): any row-major reshape to that
    # shape (``view``, ``flatten(1, 2)``) reads the expanded heads in the repeat's order
    if not (_is_method(node, "reshape", "view", "flatten") or _is_call(node, torch.reshape, torch.flatten)):
        return None
    expanded = node.args[0]
    if not isinstance(expanded, fx.Node) or not _is_method(expanded, "expand"):
        return None
    unsqueezed = expanded.args[0]
    if not isinstance(unsqueezed, fx.Node):
        return None
    if _is_call(unsqueezed, operator.getitem) and _only_size_one_insertions(unsqueezed.args[1]):
        kv = unsqueezed.args[0]
    elif (_is_method(unsqueezed, "unsqueeze") or _is_call(unsqueezed, torch.unsqueeze)) and len(unsqueezed.args) > 1:
        kv = unsqueezed.args[0]
    else:
        return None
    src, mid, big = _shape(kv), _shape(unsqueezed), _shape(expanded)
    if not isinstance(kv, fx.Node) or src is None or len(src) != 4 or mid is None or big is None:
        return None
    b, g, s, d = src
    if mid != (b, g, 1, s, d) or len(big) != 5 or big[:2] != (b, g) or big[3:] != (s, d):
        return None
    n = big[2]
    return (kv, n) if isinstance(n, int) and out == (b, g * n, s, d) else None


def _sdpa_calls(qg: QGraph):
    """``(node, arguments by name, defaults filled in)`` for each SDPA call of ``qg``, over a copy of
    the node list (the passes replace the calls as they go)."""
    for node in list(qg.graph.nodes):
        if _is_call(node, *_SDPA):
            yield node, {**_SDPA_DEFAULTS, **dict(zip(_SDPA_ARGS, node.args)), **node.kwargs}


def grouped_query_attention(qg: QGraph) -> int:
    """Give every SDPA call of ``qg`` that reads repeated key / value heads the heads as they are,
    with ``enable_gqa=True``. Returns how many calls were rewritten."""
    done = 0
    for node, a in _sdpa_calls(qg):
        if a["enable_gqa"] is not False or a["dropout_p"] != 0.0:
            continue
        k_rep, v_rep = repeated_heads(a["key"]), repeated_heads(a["value"])
        if k_rep is None or v_rep is None or k_rep[1] != v_rep[1] or k_rep[1] < 2:
            continue
        q, out = _shape(a["query"]), _shape(node)
        if q is None or out is None or len(q) != 4 or q[1] != _shape(a["key"])[1]:
            continue
        kwargs = {k: a[k] for k in ("attn_mask", "dropout_p", "is_causal", "scale")}
        new = qg.call(node.target, (a["query"], k_rep[0], v_rep[0]), {**kwargs, "enable_gqa": True}, before=node)
        if _shape(new) != out:
            qg.graph.erase_node(new)
            continue
        node.replace_all_uses_with(new)
        qg.graph.erase_node(node)
        done += 1
    if done:
        logger.info("qpass attention: %d grouped-query attention call(s) read the KV heads as stored (enable_gqa)", done)
    return done


_HALF_OR_FP32 = (torch.float32, torch.bfloat16, torch.float16)  # float64 keeps its kernel (no float32 sums)


def decode_attention(qg: QGraph) -> int:
    """Rewrite every CPU SDPA call of ``qg`` with one query per sequence and head into three
    reductions that Inductor fuses into its own loops::

        s = sum(q[:, :, :, None] * k[:, :, None], -1) * scale + mask   # (B, G, H/G, S): scores
        o = sum(softmax(s, -1)[..., None] * v[:, :, None], -2)          # (B, G, H/G, D)

    At one query a flash-attention kernel has nothing to tile: it pays its setup per head and, in
    bfloat16 / float16, converts its blocks on every call (SmolLM2's shapes, 1 thread, compiled
    alone, ``bench/results/attention.json``): in bf16 540 -> 82 us per layer at 1 thread, 331 -> 59 at 2;
    in fp32 101 -> 71 and 75 -> 54 us (the hidden-2048 Llama in bf16: 1840 -> 225 us at 1 thread). The grouped heads are read as stored (``q`` is
    regrouped, not ``k`` / ``v`` repeated). Half-precision inputs are summed in float32 and the
    output rounded once, as the kernel's accumulators do. Not bit-equal to the kernel (another
    summation order; fp32 relative differences ~1e-7).

    The query reaches the score reduction through ``clone`` + ``as_strided`` (where the batch is static),
    which Inductor realizes: inlined, the query's rotary embedding (a cos and a sin per element) was
    recomputed for every cached key, 528 times per layer in SmolLM2's decode step.

    Only under Inductor (eagerly the product would be materialised), for a static query length of 1,
    ``is_causal`` off, no dropout, and a mask that is absent or shared by the heads or given per head
    (``(B, 1 or H, 1, S)``). Returns how many calls were rewritten."""
    done = 0
    for node, a in _sdpa_calls(qg):
        q, k, v, out = _shape(a["query"]), _shape(a["key"]), _shape(a["value"]), _shape(node)
        val = meta_value(node)
        if (q is None or k is None or v is None or out is None or len(q) != 4 or len(k) != 4 or len(v) != 4
                or not isinstance(val, torch.Tensor) or val.device.type != "cpu" or val.dtype not in _HALF_OR_FP32):
            continue
        b, h, lq, d = q
        g, dv = k[1], v[3]
        if (lq != 1 or a["is_causal"] is not False or a["dropout_p"] != 0.0 or not all(isinstance(x, int) for x in (h, g, d, dv))
                or h % g or (g != h and a["enable_gqa"] is not True) or v[1] != g):
            continue
        mask = a["attn_mask"]
        mshape = _shape(mask) if mask is not None else None
        if mask is not None and (mshape is None or len(mshape) != 4 or mshape[2] != 1 or mshape[1] not in (1, h)):
            continue
        scale = a["scale"] if a["scale"] is not None else d ** -0.5
        if not isinstance(scale, (int, float)):
            continue
        n = h // g
        before = node
        f32 = torch.ops.prims.convert_element_type.default

        def fp32(x):
            return x if _dtype(x) == torch.float32 else qg.call(f32, (x, torch.float32), before=before)

        qf, kf, vf = fp32(a["query"]), fp32(a["key"]), fp32(a["value"])
        if isinstance(b, int):
            # query head g*n + r -> (g, r), through an explicit as_strided: Inductor realizes its input, so
            # what computes the query (the rotary embedding's cos / sin) runs once, not for every key
            q5 = realized(qg, qf, (b, g, n, 1, d), before)
        else:
            q5 = qg.call(torch.reshape, (qf, (-1, g, n, 1, d)), before=before)  # query head g*n + r -> (g, r)
        k5 = qg.call(torch.unsqueeze, (kf, 2), before=before)  # (B, G, 1, S, D)
        scores = qg.call(torch.sum, (qg.call(torch.mul, (q5, k5), before=before), -1), before=before)  # (B, G, n, S)
        scores = qg.call(torch.mul, (scores, float(scale)), before=before)
        if mask is not None:
            if mshape[1] == 1:
                m = mask  # (B, 1, 1, S): broadcasts over (G, n)
            else:  # (B, H, 1, S) -> (B, G, n, 1, S) -> (B, G, n, S), whatever B and S are
                m = qg.call(torch.squeeze, (qg.call(torch.unflatten, (mask, 1, (g, n)), before=before), 3), before=before)
            if _dtype(mask) == torch.bool:
                scores = qg.call(torch.where, (m, scores, float("-inf")), before=before)
            else:
                scores = qg.call(torch.add, (scores, fp32(m)), before=before)
        probs = qg.call(torch.softmax, (scores, -1), before=before)
        p5 = qg.call(torch.unsqueeze, (probs, -1), before=before)  # (B, G, n, S, 1)
        v5 = qg.call(torch.unsqueeze, (vf, 2), before=before)  # (B, G, 1, S, Dv)
        o = qg.call(torch.sum, (qg.call(torch.mul, (p5, v5), before=before), -2), before=before)  # (B, G, n, Dv)
        o = qg.call(torch.reshape, (o, (-1, h, 1, dv)), before=before)
        if val.dtype != torch.float32:
            o = qg.call(f32, (o, val.dtype), before=before)
        if _shape(o) != out:
            continue  # dead nodes; the graph's dead-code pass drops them
        node.replace_all_uses_with(o)
        qg.graph.erase_node(node)
        done += 1
    if done:
        logger.info("qpass attention: %d one-query attention call(s) as Inductor reductions", done)
    return done
