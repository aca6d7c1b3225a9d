"""Float linears at decode as Inductor reductions (``qpass.passes.decode``)."""

import torch
import torch.nn.functional as F

import qpass
from qpass.passes import decode
from tests.models import tiny_model, token_batches


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
