"""int8 linears on ``torch._int_mm`` (the CPU kernel where its probe finds it exact: VNNI / AMX).

The integer check is the one of ``tests/test_lower.py``: the kernel's int32 dot products, recovered
from its float output, against an int64 matmul of the quantized operands, element by element.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import qpass
from qpass import kernels
from qpass.graph import constants
from qpass.passes import lower as lowering
from tests.models import tiny_model, token_batches
from tests.linears import KERNEL_CONFIGS, Proj, inputs, proj_case, run_backend

pytestmark = [
    pytest.mark.int_mm,
    pytest.mark.skipif(not kernels.int_mm_exact(), reason="torch._int_mm saturates int16 pair sums here (no VNNI / AMX)"),
]
LABEL = lowering.KERNELS["cpu_int_mm"].label


class _IntMmProbe(torch.fx.Interpreter):
    """Runs a lowered graph eagerly, checking every ``_int_mm`` against an int64 matmul of the same
    operands, and that its activation operand is the reference's own quantized integers."""

    calls = 0

    def run_node(self, n):
        out = super().run_node(n)
        if n.target is torch._int_mm:
            x, w_t = (self.env[a] for a in n.args)
            assert x.dtype == w_t.dtype == torch.int8 and out.dtype == torch.int32
            assert torch.equal(out.long(), x.long() @ w_t.long()), "_int_mm differs from the int64 product"
            src = n.args[0]  # reshape(x_q, (-1, K)), at one token under an as_strided
            while src.target in (torch.reshape, torch.as_strided):
                src = src.args[0]
            assert src.target is qpass.ops.quantize, src.target
            self.calls += 1
        return out


@pytest.mark.parametrize("worst_case", [False, True], ids=["random", "worst-case"])
@pytest.mark.parametrize("m", [1, 17, 513])
@pytest.mark.parametrize("name", KERNEL_CONFIGS)
def test_int_mm_equals_integer_reference(name, m, worst_case):
    """The int32 dot products of the lowered linear are exact (worst case: every product at the
    grid's ends), taken on the reference's integers; its output equals the reference path's."""
    k, n = 100, 70
    model, x, _, calib = proj_case(m, k, n, worst_case=worst_case)
    config = KERNEL_CONFIGS[name].replace(smoothing=None)
    y, backend = run_backend(model, config, calib, x, inductor=False)
    assert backend.report.rows["proj"].kernels == (LABEL,)
    probe = _IntMmProbe(backend.graphs[-1])
    params = {"weight": model.proj.weight, "bias": model.proj.bias}
    args = [next((p for key, p in params.items() if f"parameters_{key}" in node.target), x)
            for node in backend.graphs[-1].graph.find_nodes(op="placeholder")]
    with torch.no_grad():
        torch.testing.assert_close(probe.run(*args)[0], y, rtol=0, atol=0)
    assert probe.calls == 1
    ref, _ = run_backend(model, config.replace(lower=False), calib, x, inductor=False)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("name", ["w8a8_tensor_dynamic", "asym per-tensor"])
def test_int_mm_per_tensor_scale_spans_the_batch(name):
    """A per-tensor dynamic scale covers every row of the input, across the batch, on the lowered
    path as on the reference: with one sequence 50x larger than the other, the small one is
    quantized on the large one's grid by both (the same integers, one ``choose_qparams``), so each
    sequence's outputs equal the reference's to float rounding. A scale per sequence (or padding,
    or per-token rows) would put the small sequence on a grid 50x finer: far outside the bound."""
    k, n = 100, 70
    case = proj_case(8, k, n)
    x = torch.cat([case.x, 50.0 * case.x.flip(1)])  # (2, 8, k)
    config = KERNEL_CONFIGS[name].replace(smoothing=None)
    y, backend = run_backend(case.model, config, case.calib, x, inductor=False)
    assert backend.report.rows["proj"].kernels == (LABEL,)
    ref, _ = run_backend(case.model, config.replace(lower=False), case.calib, x, inductor=False)
    alone, _ = run_backend(case.model, config.replace(lower=False), case.calib, x[:1], inductor=False)
    for b in range(2):
        tol = 1e-5 * ref[b].abs().max().item()
        torch.testing.assert_close(y[b], ref[b], rtol=1e-5, atol=tol)
    # the bound would see a per-sequence scale: the small sequence alone is on a much finer grid
    assert (alone[0] - ref[0]).abs().max().item() > 100 * 1e-5 * ref[0].abs().max().item()


@pytest.mark.parametrize("preset", ["w8a8_dynamic", "w8a8_static", "w8a8_tensor_dynamic", "llm_int8"])
def test_int_mm_llama_equals_reference_path(preset):
    """A Llama through the backend: every int8 linear on ``_int_mm`` (q/k/v and gate/up as one GEMM
    each: 4 per layer; 7 with an outlier split), logits equal to the reference quant/dequant path up
    to float rounding. Float rounding includes the rare activation that lands on the other side of a
    rounding boundary (each layer's input differs from the reference's by float summation order): one
    such integer changes every later position through attention (measured with ``w8a8_static``'s
    per-token fallback: position 7 of 16, logits 0.2% apart against the reference's 1.6% from fp32),
    so the bound is a small share of the quantization error itself; the integers are checked one by
    one in the test above."""
    model = tiny_model("llama", layers=2)
    calib = qpass.calibrate(model, token_batches(2))
    ids = token_batches(1, seed=5)[0]
    with torch.no_grad():
        fp32 = model(ids, use_cache=False).logits
    logits = {}
    for lower in (False, True):
        backend = qpass.backend(qpass.preset(preset, lower=lower), calibration=calib, inductor=False)
        torch._dynamo.reset()
        with torch.no_grad():
            logits[lower] = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
    kernels_run = {k for path, row in backend.report.rows.items() if path != "lm_head" for k in row.kernels}
    assert kernels_run == {LABEL + (lowering.SPLIT_NOTE if preset == "llm_int8" else "")}
    graph = backend.graphs[-1].graph
    per_layer = 7 if preset == "llm_int8" else 4  # an outlier split's inlier linears are not fused
    assert sum(n.target is torch._int_mm for n in graph.nodes) == per_layer * 2

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(logits[True], logits[False]) < 0.2 * rel(logits[False], fp32)


def test_int_mm_prefill_and_decode_share_one_weight_copy():
    """Prefill and decode graphs of one backend read the same int8 tensors (nothing packed, no
    second copy for another kernel), and the same per-layer weight sums of the asymmetric
    activations' zero-point correction (computed once per layer)."""
    model = tiny_model("llama", layers=1)
    backend = qpass.backend("w8a8_dynamic", inductor=False)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(token_batches(1, batch=1, seq=8)[0], use_cache=False)
        compiled(token_batches(1, batch=1, seq=1)[0], use_cache=False)
    assert len(backend.graphs) == 2
    storages, colsums = [], []
    for gm in backend.graphs:
        int8 = {name: t for name, t in constants(gm).items() if t.dtype == torch.int8}
        assert len(int8) == 4 and not any(t.is_mkldnn for t in constants(gm).values())
        storages.append({t.untyped_storage().data_ptr() for t in int8.values()})
        colsum = [t for name, t in constants(gm).items() if name.endswith("weight_colsum")]
        assert len(colsum) == 4
        colsums.append({t.untyped_storage().data_ptr() for t in colsum})
    assert storages[0] == storages[1]
    assert colsums[0] == colsums[1]


_AVX2_SCRIPT = """
import torch
from qpass.passes import lower
t = lower.Target.detect(torch.device("cpu"))
print(t.int_mm, t.onednn)
"""


def test_int_mm_not_chosen_where_it_saturates():
    """With oneDNN limited to AVX2 (a CPU without VNNI), the probe finds ``_int_mm`` inexact and the
    lowering keeps oneDNN / FBGEMM with their 7-bit grids."""
    limits = {"ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    run = subprocess.run([sys.executable, "-c", _AVX2_SCRIPT], env={**os.environ, **limits}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["False", "True"]


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("name", KERNEL_CONFIGS)
def test_int_mm_under_inductor_equals_eager_graph(name, m):
    """Inductor's compile of the lowered graph computes what the graph computes eagerly: at one token
    too, where Inductor hands ``_int_mm`` a (1, K) operand with row stride 0 (see the next test)."""
    k, n = 64, 48
    torch.manual_seed(m)
    model = Proj(k, n, bias=True).eval()
    x = inputs(m, k, seed=1, worst_case=False)
    calib = qpass.calibrate(model, [inputs(64, k, seed=99, worst_case=False)])
    config = KERNEL_CONFIGS[name].replace(smoothing=None)
    eager, _ = run_backend(model, config, calib, x, inductor=False)
    compiled, backend = run_backend(model, config, calib, x, inductor=True)
    assert backend.report.rows["proj"].kernels == (LABEL,)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6 * eager.abs().max().item())


def test_torch_int_mm_misreads_a_one_row_operand_with_another_row_stride():
    """Why the lowering gives a one-token activation explicit strides: torch's CPU ``_int_mm`` takes a
    (1, K) operand's row stride for its leading dimension. When torch fixes this, this test fails and
    the ``as_strided`` in ``_emit_cpu_int_mm`` can go."""
    x = torch.randint(-128, 128, (1, 64), dtype=torch.int8)
    w = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    want = x.long() @ w.long().T
    assert torch.equal(torch._int_mm(x, w.t()).long(), want)
    assert not torch.equal(torch._int_mm(x.as_strided((1, 64), (0, 1)), w.t()).long(), want)
