"""Float linears at decode as Inductor reductions (``qpass.passes.decode``)."""

import importlib
import unittest.mock

import pytest
import torch
import torch.nn.functional as F

import qpass
import qpass.passes.lower
from qpass.passes import decode
from tests.models import tiny_model, token_batches


@pytest.fixture(autouse=True)
def _kernel_attention(monkeypatch):
    """These tests count the graph's ``torch.sum`` nodes as the head's reduction: one query's
    attention keeps its SDPA call here (its own reductions: ``tests/test_attention.py``)."""
    monkeypatch.setattr(importlib.import_module("qpass.backend"), "decode_attention", lambda qg: 0)


def _run(model, ids, backend):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        logits = compiled(ids, use_cache=False).logits
    graph = backend.graphs[-1].graph
    ops = [n.target for n in graph.nodes if n.op == "call_function"]
    return logits, ops, backend.report.rows.get("lm_head")


def test_float_lm_head_at_one_token_runs_as_a_reduction(monkeypatch):
    """The skipped fp32 ``lm_head`` of a one-token graph becomes multiply + sum under Inductor (same
    logits up to summation order); at two tokens and without Inductor it stays ``F.linear``."""
    model = tiny_model("llama", layers=1)
    one, two = token_batches(1, batch=1, seq=1)[0], token_batches(1, batch=1, seq=2)[0]
    config = qpass.preset("w8a8_dynamic")  # skips lm_head; the other linears become int8 kernels
    monkeypatch.setattr(decode, "FLOAT_DECODE_MIN_NUMEL", 0)  # the tiny lm_head is 128 x 64

    got, ops, row = _run(model, one, qpass.backend(config))
    assert F.linear not in ops and torch.sum in ops
    assert row.kernels == (decode.FLOAT_DECODE_LABEL,)

    monkeypatch.setattr(decode, "FLOAT_DECODE_M", 0)  # off: the same graph with lm_head's F.linear
    want, ops, row = _run(model, one, qpass.backend(config))
    assert ops.count(F.linear) == 1 and torch.sum not in ops
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(decode, "FLOAT_DECODE_M", 1)
    for ids, inductor in ((two, True), (one, False)):
        _, ops, row = _run(model, ids, qpass.backend(config, inductor=inductor))
        assert ops.count(F.linear) == 1 and torch.sum not in ops
        assert row is None or decode.FLOAT_DECODE_LABEL not in row.kernels


#: The vocabulary of ``_head_model``: a size no other loop of its graph has.
HEAD_VOCAB = 4096


def _head_model(dtype: torch.dtype = torch.float32):
    """A one-layer Llama with ``HEAD_VOCAB`` outputs in ``dtype``, and one token for it."""
    import transformers

    from tests.models import _config

    config = _config("llama", 1)
    config.vocab_size = HEAD_VOCAB
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().to(dtype)
    return model, torch.randint(0, HEAD_VOCAB, (1, 1))


def _head_loop(code: str, vocab: int) -> str:
    """The generated C++ of the loop over ``lm_head``'s ``vocab`` outputs (the reduction's kernel)."""
    start = code.index(f"x0<static_cast<int64_t>({vocab}L); x0+=static_cast<int64_t>(1L)")  # one output row each
    return code[start:code.index("vec_reduce_all", start)]  # to the end of the inner loop over K


def test_reduction_reads_the_final_norm_computed_once():
    """Under Inductor the decoder's final RMSNorm runs once before the ``lm_head`` reduction, not inside
    its loop for every output row (the row reaches the sum through ``as_strided``, which Inductor
    realizes): no square root in the loop over the vocabulary, for the fp32 head and the int8
    weight-only one; the logits are those of the graph without the rewrite, to summation order."""
    from torch._inductor.utils import run_and_get_code

    model, ids = _head_model()
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    for config in (qpass.preset("w8a8_dynamic"), qpass.preset("w8a8_dynamic", weight_only=("lm_head",))):
        torch._dynamo.reset()
        with unittest.mock.patch.object(decode, "FLOAT_DECODE_MIN_NUMEL", 0):  # the tiny lm_head is 128 x 64
            backend = qpass.backend(config)
            with torch.no_grad():
                got, code = run_and_get_code(torch.compile(model, backend=backend, dynamic=False), ids, use_cache=False)
        loop = _head_loop("\n".join(code), HEAD_VOCAB)
        assert "sqrt" not in loop and "at::vec::Vectorized<float>::loadu" in loop
        assert backend.report.rows["lm_head"].kernel in (decode.FLOAT_DECODE_LABEL, qpass.passes.lower.KERNELS["cpu_wo_reduction"].label)
        assert ((got.logits - want).norm() / want.norm()).item() < 0.05  # the decoder's int8 quantization


def test_half_precision_lm_head_sums_in_float32_reading_its_own_weights(monkeypatch):
    """A bf16 model's skipped ``lm_head`` at one token: the same reduction, summed in float32 and
    rounded to bf16 at the end; Inductor reads the bf16 weight inside the sum's loop (no float32
    copy of it), and the logits are those of ``aten::mm`` to bf16 rounding."""
    from torch._inductor.utils import run_and_get_code

    model, ids = _head_model(torch.bfloat16)
    monkeypatch.setattr(decode, "FLOAT_DECODE_MIN_NUMEL", 0)
    preset = qpass.preset("w8a8_dynamic")

    torch._dynamo.reset()
    backend = qpass.backend(preset)
    with torch.no_grad():
        got, code = run_and_get_code(torch.compile(model, backend=backend, dynamic=False), ids, use_cache=False)
    graph = backend.graphs[-1].graph
    sums = [n for n in graph.nodes if n.target is torch.sum]
    assert F.linear not in [n.target for n in graph.nodes] and len(sums) == 1
    assert sums[0].meta["val"].dtype == torch.float32
    assert backend.report.rows["lm_head"].kernels == ("bf16 reduction, fp32 sums (Inductor, decode)",)
    assert got.logits.dtype == torch.bfloat16
    loop = _head_loop("\n".join(code), HEAD_VOCAB)
    assert "at::vec::Vectorized<bfloat16>::loadu" in loop or "at::vec::Vectorized<at::BFloat16>::loadu" in loop, loop
    assert f"empty_strided_cpu(({HEAD_VOCAB}, 64)" not in "\n".join(code)  # the weight is not copied to float32

    monkeypatch.setattr(decode, "FLOAT_DECODE_M", 0)  # off: lm_head's F.linear (aten::mm in bf16)
    want, _, _ = _run(model, ids, qpass.backend(preset))
    torch.testing.assert_close(got.logits.float(), want.float(), rtol=2e-2, atol=2e-2)
