"""Attention rewrites (``qpass.passes.attention``): grouped-query attention on the stored key / value
heads (the repeat spellings it recognises, the ones it must not) and one query's attention as
Inductor reductions; the same logits with and without each."""

from __future__ import annotations

import importlib
import re

import expecttest
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import fx

import qpass
from qpass.graph import QGraph
from qpass.passes import attention
from tests.models import tiny_model, token_batches

backend_module = importlib.import_module("qpass.backend")  # ``qpass.backend`` is also the function


def _capture(fn, *args) -> fx.GraphModule:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=False)(*args)
    (gm,) = graphs
    return gm


def _sdpa(gm: fx.GraphModule) -> fx.Node:
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    return node


B, G, N, S, D = 2, 3, 4, 8, 16


def _repeat_kv(x):  # the decoders' spelling: a new dim 2, expanded, folded into the heads
    return x[:, :, None, :, :].expand(B, G, N, S, D).reshape(B, G * N, S, D)


REPEATS = {
    "getitem-expand-reshape": _repeat_kv,
    "unsqueeze-expand-flatten": lambda x: x.unsqueeze(2).expand(B, G, N, S, D).flatten(1, 2),
    "torch.unsqueeze-expand-torch.reshape": lambda x: torch.reshape(torch.unsqueeze(x, 2).expand(B, G, N, S, D),
                                                                    (B, G * N, S, D)),
    "torch.repeat_interleave": lambda x: torch.repeat_interleave(x, N, dim=1),
    "Tensor.repeat_interleave": lambda x: x.repeat_interleave(N, dim=1),
}

#: Spellings of the same shapes that are not the per-head repeat SDPA's ``enable_gqa`` reads.
NOT_REPEATS = {
    "tile (heads cycled, not repeated)": lambda x: x.repeat(1, N, 1, 1),
    "repeat_interleave on the sequence": lambda x: x.repeat_interleave(N, dim=2)[:, :, :S].expand(B, G, S, D)
    .repeat(1, N, 1, 1),
    "expand after the heads": lambda x: x[:, :, None].expand(B, G, N, S, D).transpose(1, 2).reshape(B, G * N, S, D),
}


def _qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, G * N, 1, D, generator=g)
    k, v = torch.randn(B, G, S, D, generator=g), torch.randn(B, G, S, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("spelling", list(REPEATS))
def test_each_spelling_of_the_head_repeat_is_recognised(spelling):
    repeat = REPEATS[spelling]
    gm = _capture(lambda q, k, v: F.scaled_dot_product_attention(q, repeat(k), repeat(v)), *_qkv())
    node = _sdpa(gm)
    (kv_k, n_k), (kv_v, n_v) = attention.repeated_heads(node.args[1]), attention.repeated_heads(node.args[2])
    assert (kv_k.op, kv_v.op, n_k, n_v) == ("placeholder", "placeholder", N, N)


@pytest.mark.parametrize("spelling", list(NOT_REPEATS))
def test_other_head_layouts_are_not_taken_for_the_repeat(spelling):
    repeat = NOT_REPEATS[spelling]
    q, k, v = _qkv()
    assert repeat(k).shape == _repeat_kv(k).shape and not torch.equal(repeat(k), _repeat_kv(k))
    gm = _capture(lambda q, k, v: F.scaled_dot_product_attention(q, repeat(k), repeat(v)), q, k, v)
    node = _sdpa(gm)
    assert attention.repeated_heads(node.args[1]) is None


def _graph_sdpa(backend) -> list[fx.Node]:
    return [n for gm in backend.graphs for n in gm.graph.nodes
            if n.op == "call_function" and n.target is F.scaled_dot_product_attention]


def _prefill_and_decode(model, backend):
    """A 9-token prompt into a static cache, then one token: both graphs' logits. The first sequence
    is left-padded by one token, so both graphs attend through a mask (without one, transformers
    gives the prompt's SDPA ``enable_gqa`` itself)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    ids = token_batches(1, batch=2, seq=10)[0]
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 0] = 0
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        prompt = compiled(ids[:, :9], attention_mask=mask[:, :9], past_key_values=cache, use_cache=True,
                          cache_position=torch.arange(9)).logits
        step = compiled(ids[:, 9:], attention_mask=mask, past_key_values=cache, use_cache=True,
                        cache_position=torch.tensor([9])).logits
    return prompt, step


@pytest.mark.parametrize("preset", ["w8a8_dynamic", "w8a8_static"])
def test_a_grouped_query_decoder_attends_on_the_stored_heads_with_the_same_logits(preset, monkeypatch):
    """Tiny Llama, 4 query heads on 2 KV heads: at prefill and at decode every SDPA reads the cached
    heads with ``enable_gqa``; the logits equal those of the same backend without the pass. The
    rewritten graphs run eagerly (``inductor=False``; the pass runs either way, and the decode step's
    SDPA stays one: ``decode_attention`` needs Inductor, tested below)."""
    model = tiny_model("llama", layers=2)
    calib = qpass.calibrate(model, token_batches(2), progress=False)
    backend = qpass.backend(preset, calibration=calib, inductor=False)
    got = _prefill_and_decode(model, backend)
    calls = _graph_sdpa(backend)
    assert len(calls) == 4 and all(n.kwargs.get("enable_gqa") is True for n in calls)
    # the 2 KV heads as cached, not 4 repeated
    assert [attention._shape(n.args[i]) for n in calls for i in (1, 2)] == [(2, 2, 16, 16)] * 8
    assert backend.report.grouped_attention == 4

    monkeypatch.setattr(backend_module, "grouped_query_attention", lambda qg: 0)
    off = qpass.backend(preset, calibration=calib, inductor=False)
    want = _prefill_and_decode(model, off)
    assert not any(n.kwargs.get("enable_gqa") for n in _graph_sdpa(off))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_multi_head_attention_and_the_integer_only_preset_are_left_alone():
    """GPT-2 repeats no heads; ``illm_w8a8`` rewrites attention itself. (Without Inductor: the pass
    runs either way, and Inductor takes minutes over the integer-only graph.)"""
    ids = token_batches(1)[0]
    for arch, preset in (("gpt2", "w8a8_dynamic"), ("llama", "illm_w8a8")):
        model = tiny_model(arch, layers=1)
        calib = qpass.calibrate(model, token_batches(2), progress=False)
        backend = qpass.backend(preset, calibration=calib, inductor=False)
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False)
        assert backend.report.grouped_attention == 0
        assert not any(n.kwargs.get("enable_gqa") for n in _graph_sdpa(backend))


@pytest.mark.parametrize("dtype, preset, atol", [
    (torch.float32, "w8a8_dynamic", 1e-5),
    (torch.bfloat16, "w8a16", 2 ** -6),  # one bf16 unit in the last place at logits of 2-4
])
def test_one_query_attention_runs_as_reductions_with_the_kernels_logits(dtype, preset, atol, monkeypatch):
    """At decode (one query per sequence) the SDPA call becomes multiply + sum, softmax, multiply +
    sum, in float32 for a bf16 model; the prompt's keeps the kernel. Logits as with the kernel. The
    score reduction reads the query through ``as_strided``, which Inductor realizes: the query's rotary
    embedding (cos, sin) runs once, not inside the generated loop over the 16 cached keys."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_model("llama", layers=1).to(dtype)
    calib = qpass.calibrate(model, token_batches(2), progress=False)
    backend = qpass.backend(preset, calibration=calib)
    got, code = run_and_get_code(_prefill_and_decode, model, backend)
    assert backend.report.decode_attention == 1
    code = "\n".join(code)
    loops = [m.start() for m in re.finditer(r"x\d+<static_cast<int64_t>\(16L\); x\d+\+=static_cast<int64_t>\(1L\)", code)]
    scores = [b for b in (code[i:code.index("vec_reduce_all", i)] for i in loops) if "tmp_acc0_vec + " in b]
    assert scores, "no reduction over the cached keys found in the decode kernels"
    assert not any("cos()" in b or "sin()" in b for b in scores), scores[0]
    prompt, step = backend.graphs
    assert len([n for n in prompt.graph.nodes if n.target is F.scaled_dot_product_attention]) == 1
    ops = [n.target for n in step.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention not in ops
    assert ops.count(torch.softmax) == 1 and ops.count(torch.sum) >= 2

    if dtype == torch.float32:  # the same graphs run eagerly, which keeps the kernel at decode too
        off = qpass.backend(preset, calibration=calib, inductor=False)
    else:  # bf16: eager ops round where Inductor's fused ones do not; compare with Inductor's kernel call
        monkeypatch.setattr(backend_module, "decode_attention", lambda qg: 0)
        off = qpass.backend(preset, calibration=calib)
    want = _prefill_and_decode(model, off)
    assert len(_graph_sdpa(off)) == 2
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_one_query_attention_keeps_the_kernel_without_inductor_or_with_is_causal():
    """Eagerly the product would be materialised; ``is_causal`` with one query attends to the first
    key only (SDPA's top-left alignment), which the reductions do not reproduce: both keep SDPA."""
    q, k, v = _qkv()
    for causal in (False, True):
        gm = _capture(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True), q, k, v)
        qg = QGraph(gm, [q, k, v])
        assert attention.decode_attention(qg) == (0 if causal else 1)
        if not causal:
            torch.testing.assert_close(qg.build()(q, k, v)[0],
                                       F.scaled_dot_product_attention(q, k, v, enable_gqa=True), rtol=1e-5, atol=1e-6)

    model = tiny_model("llama", layers=1)
    backend = qpass.backend("w8a8_dynamic", calibration=qpass.calibrate(model, token_batches(2), progress=False),
                            inductor=False)
    _prefill_and_decode(model, backend)
    assert backend.report.decode_attention == 0 and len(_graph_sdpa(backend)) == 2


def _one_query(dtype=torch.float32, mask_heads: int | None = None, bool_mask: bool = False):
    q, k, v = (t.to(dtype) for t in _qkv())
    if mask_heads is None:
        return q, k, v, None
    keep = torch.rand(B, mask_heads, 1, S, generator=torch.Generator().manual_seed(3)) > 0.3
    keep[..., 0] = True  # every row attends to something
    mask = keep if bool_mask else torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
    return q, k, v, mask


@pytest.mark.parametrize("mask_heads, bool_mask", [(None, False), (1, False), (1, True), (G * N, False), (G * N, True)])
def test_one_query_reductions_compute_sdpa_for_every_mask_layout(mask_heads, bool_mask):
    """No mask, one shared by the heads or one per head, additive or boolean: the rewritten graph
    (run eagerly) computes what SDPA does."""
    q, k, v, mask = _one_query(mask_heads=mask_heads, bool_mask=bool_mask)

    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    gm = _capture(fn, q, k, v, mask)
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    qg = QGraph(gm, inputs)
    assert attention.decode_attention(qg) == 1
    (got,) = qg.build()(*inputs)
    torch.testing.assert_close(got, fn(q, k, v, mask), rtol=1e-5, atol=1e-6)


def test_one_query_reductions_under_dynamic_shapes_and_float64_kept():
    """A batch and a cache length Dynamo made symbolic (a growing cache) are read from the tensors;
    a float64 model keeps its kernel (the reductions sum in float32)."""
    q, k, v, mask = _one_query(mask_heads=G * N)

    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    counts = []

    def backend(gm, example_inputs):
        qg = QGraph(gm, example_inputs)
        counts.append(attention.decode_attention(qg))
        return qg.build().forward

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend)
    for t in (q, k, v, mask):
        torch._dynamo.mark_dynamic(t, 0)
    for t in (k, v, mask):
        torch._dynamo.mark_dynamic(t, t.dim() - 2 if t is not mask else 3)
    compiled(q, k, v, mask)
    for b, s in ((3, 11), (4, 5)):  # other sizes, the same graph
        g = torch.Generator().manual_seed(b * s)
        q2, k2, v2 = (torch.randn(b, h, n, D, generator=g) for h, n in ((G * N, 1), (G, s), (G, s)))
        m2 = torch.zeros(b, G * N, 1, s)
        m2[..., s // 2:] = float("-inf")
        torch.testing.assert_close(compiled(q2, k2, v2, m2), fn(q2, k2, v2, m2), rtol=1e-5, atol=1e-6)
    assert counts == [1]

    q64, k64, v64, _ = _one_query(torch.float64)
    gm = _capture(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), q64, k64, v64)
    assert attention.decode_attention(QGraph(gm, [q64, k64, v64])) == 0


class RewrittenAttentionSnapshot(expecttest.TestCase):
    def test_grouped_query_attention_reads_the_stored_heads(self):
        """The decoders' repeat (getitem, expand, reshape) of key and value is left to dead-code
        elimination; SDPA reads the grouped heads with ``enable_gqa``."""
        _, k, v = _qkv()
        q = torch.randn(B, G * N, S, D, generator=torch.Generator().manual_seed(1))
        gm = _capture(lambda q, k, v: F.scaled_dot_product_attention(q, _repeat_kv(k), _repeat_kv(v)), q, k, v)
        qg = QGraph(gm, [q, k, v])
        assert attention.grouped_query_attention(qg) == 1
        self.assertExpectedInline(qpass.format_graph(qg.build(), focus=False), """\
%0 = input : f32[2,3,8,16]
%1 = input : f32[2,3,8,16]
%2 = input : f32[2,12,8,16]
%3 = scaled_dot_product_attention(%2, %0, %1, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=True) : f32[2,12,8,16]
""")

    def test_one_query_attention_with_a_boolean_mask_per_head(self):
        """One query, a boolean mask per query head: the heads regrouped, the mask unflattened to
        (B, G, H/G, S), masked scores -inf, softmax, and the weighted sum of the stored values."""
        q, k, v, mask = _one_query(mask_heads=G * N, bool_mask=True)
        gm = _capture(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
                      q, k, v, mask)
        qg = QGraph(gm, [q, k, v, mask])
        assert attention.decode_attention(qg) == 1
        self.assertExpectedInline(qpass.format_graph(qg.build(), focus=False), """\
%0 = input : f32[2,12,1,16]
%1 = input : f32[2,3,8,16]
%2 = input : f32[2,3,8,16]
%3 = input : b8[2,12,1,8]
%4 = aten.clone(%0, memory_format=torch.contiguous_format) : f32[2,12,1,16]
%5 = as_strided(%4, (2, 3, 4, 1, 16), (192, 64, 16, 16, 1)) : f32[2,3,4,1,16]
%6 = unsqueeze(%1, 2) : f32[2,3,1,8,16]
%7 = mul(%5, %6) : f32[2,3,4,8,16]
%8 = sum(%7, -1) : f32[2,3,4,8]
%9 = mul(%8, 0.25) : f32[2,3,4,8]
%10 = unflatten(%3, 1, (3, 4)) : b8[2,3,4,1,8]
%11 = squeeze(%10, 3) : b8[2,3,4,8]
%12 = where(%11, %9, -inf) : f32[2,3,4,8]
%13 = softmax(%12, -1) : f32[2,3,4,8]
%14 = unsqueeze(%13, -1) : f32[2,3,4,8,1]
%15 = unsqueeze(%2, 2) : f32[2,3,1,8,16]
%16 = mul(%14, %15) : f32[2,3,4,8,16]
%17 = sum(%16, -2) : f32[2,3,4,16]
%18 = reshape(%17, (-1, 12, 1, 16)) : f32[2,12,1,16]
""")
