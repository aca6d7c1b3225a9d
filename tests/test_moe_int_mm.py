"""Fused experts on ``torch._int_mm``: ``qpass::grouped_int_mm`` (one ``_int_mm`` per expert with rows),
wherever the dense linears run ``_int_mm`` (CPUs where its probe finds it exact, and CUDA, faked here
on CPU tensors: the same graph with CUDA's padding).

The integer checks are those of tests/test_moe_lower.py: each row's int32 dot products, recovered from
the lowered output, against an int64 product of the quantized operands written out from the module's
weights and inputs with its own expert's weight; the kernel's raw int32 output against an int64
product element by element.
"""

from __future__ import annotations

import expecttest
import pytest
import torch

import qpass
from qpass import kernels
from qpass.graph import constants
from qpass.passes import lower as lowering
from tests.models import tiny_model, token_batches
from tests.test_moe_lower import (CONFIGS, E, K, N, Grouped, _check_integers, _dynamic_calls, _lowered, _offs, _rows,
                                  _static_calibration)

pytestmark = pytest.mark.int_mm
#: The numerical tests run ``_int_mm`` on this CPU's tensors (the fake CUDA target too): where it
#: saturates int16 pair sums (no VNNI / AMX) qpass never chooses it, and they are skipped. The
#: snapshots and refusals run everywhere.
exact = pytest.mark.skipif(not kernels.int_mm_exact(), reason="torch._int_mm saturates int16 pair sums here (no VNNI / AMX)")

#: The targets whose dense linears run ``_int_mm``: this CPU (its probe said exact) and a fake H100,
#: whose lowering pads to CUDA's ``_int_mm`` shape rules and runs here on CPU tensors.
TARGETS = {
    "cpu": lowering.Target("cpu", onednn=True, fbgemm=True, int_mm=True),
    "fake-cuda": lowering.Target("cuda", capability=(9, 0)),
}
KERNEL = {"cpu": "cpu_int_mm", "fake-cuda": "cuda_int8"}

#: Segment layouts (E = 4 experts): an empty expert and a one-row one; every row to one expert; one
#: token (decode: top-1 here); and every expert empty but the first.
SEGMENTS = {
    "mixed": (3, 0, 1, 5),
    "one-expert": (0, 0, 9, 0),
    "one-token": (0, 1, 0, 0),
    "first-only": (20, 0, 0, 0),
}


def _force(monkeypatch, target: str) -> None:
    monkeypatch.setattr(lowering.Target, "detect", staticmethod(lambda device: TARGETS[target]))


def _int64_grouped(x, offs, w):
    """Each row of ``x`` times its expert's ``w[e]`` in int64; zeros past ``offs[-1]``."""
    ids = qpass.ops.expert_of_rows(x, offs)
    acc = torch.einsum("rk,rnk->rn", x.long(), w[ids].long())
    acc[offs[-1]:] = 0
    return acc


# ----------------------------------------------------------------------------- the kernel


@exact
@pytest.mark.parametrize("pad", [False, True], ids=["cpu", "cuda-padded"])
@pytest.mark.parametrize("segments", [(3, 0, 1, 5), (0, 0, 9, 0), (0, 1, 0, 0), (0, 0, 0, 0), (2, 0, 0, 4)])
def test_grouped_int_mm_equals_int64_products(segments, pad):
    """The raw int32 output on full-range int8 operands (every product at +-127 * -128 in one row and
    column): equal to the int64 products; empty experts skipped, rows past ``offs[-1]`` zero (the last
    layout leaves 2 rows there). Padded (CUDA's rules): the weight zero-padded to N, K multiples of 8,
    the output's extra columns zero."""
    g = torch.Generator().manual_seed(sum(segments))
    rows = sum(segments) + (2 if segments == (2, 0, 0, 4) else 0)
    offs = _offs(segments)
    x = torch.randint(-128, 128, (rows, K), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (E, N, K), dtype=torch.int8, generator=g)
    if rows:
        x[0] = -128
    w[:, 0] = 127
    if pad:
        wp = torch.zeros(E, 24, 40, dtype=torch.int8)
        wp[:, :N, :K] = w
        y = kernels.grouped_int_mm(x, offs, wp, True)
        assert y.shape == (rows, 24) and y.dtype == torch.int32
        assert not y[:, N:].any()
        y = y[:, :N]
    else:
        y = kernels.grouped_int_mm(x, offs, w, False)
    assert y.dtype == torch.int32
    assert torch.equal(y.long(), _int64_grouped(x, offs, w))


@exact
def test_grouped_int_mm_one_row_with_any_row_stride():
    """A (1, K) activation with row stride 0 (what Inductor may hand a size-1 dim): still the right
    products (torch 2.13's CPU ``_int_mm`` alone misreads it: test_int_mm.py)."""
    x = torch.randint(-128, 128, (1, K), dtype=torch.int8).as_strided((1, K), (0, 1))
    w = torch.randint(-128, 128, (E, N, K), dtype=torch.int8)
    offs = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    assert torch.equal(kernels.grouped_int_mm(x, offs, w, False).long(), x.long() @ w[2].long().T)


def test_grouped_int_mm_refuses_bad_operands():
    x = torch.zeros(4, K, dtype=torch.int8)
    w = torch.zeros(E, N, K, dtype=torch.int8)
    offs = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"expects 2-D int8 activations and 3-D int8 weights, got torch.uint8"):
        kernels.grouped_int_mm(x.view(torch.uint8), offs, w, False)
    with pytest.raises(ValueError, match=r"offs of shape \(3,\) for 4 experts"):
        kernels.grouped_int_mm(x, offs[:3], w, False)
    with pytest.raises(ValueError, match=r"activation has K=37, the expert weights K=36"):
        kernels.grouped_int_mm(x, offs, w[:, :, :36], False)
    with pytest.raises(ValueError, match=r"padded expert weights must have N and K multiples of 8, got \(4, 23, 37\)"):
        kernels.grouped_int_mm(x, offs, w, True)


# ----------------------------------------------------------------------------- the lowering


@exact
@pytest.mark.parametrize("segments", SEGMENTS)
@pytest.mark.parametrize("worst_case", [False, True], ids=["random", "worst-case"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", CONFIGS)
def test_lowered_experts_equal_integer_reference(monkeypatch, name, target, worst_case, segments):
    """Each expert's rows through ``_int_mm`` on the reference's own 8-bit integers (symmetric and
    asymmetric dynamic, per tensor, static per expert): every row's dot products equal the int64
    reference of its expert, and the report names the kernel."""
    _force(monkeypatch, target)
    torch.manual_seed(len(name))
    model = Grouped(worst_case).eval()
    offs = _offs(SEGMENTS[segments])
    x = _rows(offs[-1].item(), seed=3, worst_case=worst_case)
    config = CONFIGS[name].replace(smoothing=None)
    calib = _static_calibration(_rows(8, seed=4, worst_case=worst_case), _offs((2, 2, 2, 2))) if name == "static" else None
    y, backend, _ = _lowered(model, config, calib, x, offs, inductor=False)
    assert backend.report.rows["gate_up_proj"].kernel == lowering.experts_label(None, KERNEL[target])
    assert not any(t.is_mkldnn for t in constants(backend.graphs[0]).values())
    _check_integers(model, config, calib, x, offs, y, lowering.GRID_8BIT)


@exact
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["sym per-token", "asym per-token"])
def test_inductor_dynamic_segments_and_one_token(monkeypatch, name, target):
    """Inductor with ``dynamic=True``: one graph serves every row count and segment layout (the op's
    fake implementation; the segment sizes are read at run time); one token (decode) gets its own
    graph (Dynamo specializes a size of 1), where Inductor may give the one-row operand any stride.
    Each call equals the integer reference."""
    _force(monkeypatch, target)
    torch.manual_seed(0)
    model = Grouped(False).eval()
    config = CONFIGS[name].replace(smoothing=None)
    layouts = ((3, 0, 1, 5), (0, 0, 9, 0), (2, 0, 0, 0), (1, 1, 1, 1), (0, 1, 0, 0))
    for offs, x, y, backend in _dynamic_calls(model, config, layouts):
        _check_integers(model, config, None, x, offs, y, lowering.GRID_8BIT)
        assert len(backend.graphs) == (1 if offs[-1] > 1 else 2), (offs.tolist(), len(backend.graphs))
    assert backend.report.rows["gate_up_proj"].kernel == lowering.experts_label(None, KERNEL[target])


# ----------------------------------------------------------------------------- whole models


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _logits(model, config, calib, ids):
    torch._dynamo.reset()
    backend = qpass.backend(config, calibration=calib, inductor=False)
    with torch.no_grad():
        return torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits, backend


@pytest.fixture(scope="module", params=["qwen2_moe", "olmoe", "deepseek_v3"])
def moe(request):
    model = tiny_model(request.param)
    calib = qpass.calibrate(model, token_batches(4))
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        fp32 = model(ids, use_cache=False).logits
    reference = {name: _logits(model, qpass.preset(name, lower=False), calib, ids)[0]
                 for name in ("w8a8_dynamic", "w8a8_static", "llm_int8")}
    return model, calib, ids, fp32, reference


@exact
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["w8a8_dynamic", "w8a8_static"])
def test_lowered_moe_equals_reference_path(moe, monkeypatch, name, target):
    """Qwen2-MoE, OLMoE, DeepSeek-V3: every fused expert weight on ``_int_mm`` per expert, named in
    its row, no oneDNN packed weight in the graph, and the logits equal to the reference path's (the
    same integers) within the dense ``_int_mm`` test's bound (0.2x the reference path's error of fp32)
    and 2e-3. Measured (either target): 2.6e-7 to 4.3e-7, OLMoE 8.7e-5 (dynamic) and 2.5e-5 (static),
    where a float-rounding difference upstream flips an activation's rounding (see test_int_mm.py)."""
    model, calib, ids, fp32, reference = moe
    _force(monkeypatch, target)
    out, backend = _logits(model, qpass.preset(name), calib, ids)
    experts = [p for p, w in model.named_parameters() if w.dim() == 3]
    assert experts
    for p in experts:
        assert backend.report.rows[p].kernel == lowering.experts_label(None, KERNEL[target]), backend.report.rows[p].kernel
    assert not any(t.is_mkldnn for gm in backend.graphs for t in constants(gm).values())
    ref = reference[name]
    assert _rel(out, ref) < min(2e-3, 0.2 * _rel(ref, fp32)), (_rel(out, ref), _rel(ref, fp32))


@exact
def test_outlier_split_experts_on_int_mm(moe):
    """``llm_int8``: the experts' int8 inlier part on ``_int_mm`` per expert, the outlier columns'
    float grouped matmul added, equal to the reference path as above (measured 2.0e-7 to 2.3e-7)."""
    model, calib, ids, fp32, reference = moe
    out, backend = _logits(model, qpass.preset("llm_int8"), calib, ids)
    experts = [p for p, w in model.named_parameters() if w.dim() == 3]
    for p in experts:
        assert backend.report.rows[p].kernel == lowering.experts_label(None, "cpu_int_mm") + lowering.SPLIT_NOTE
    ref = reference["llm_int8"]
    assert _rel(out, ref) < min(2e-3, 0.2 * _rel(ref, fp32)), (_rel(out, ref), _rel(ref, fp32))


@exact
def test_prefill_and_decode_share_the_expert_weights():
    """Qwen2-MoE with ``dynamic=True`` on this CPU, 5 tokens then 1 (decode: its own graph): every
    graph reads the same int8 expert tensors (no second copy, nothing packed). Their numbers:
    ``test_lowered_moe_equals_reference_path`` and the Inductor test above."""
    model = tiny_model("qwen2_moe", layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    torch._dynamo.reset()
    backend = qpass.backend(qpass.preset("w8a8_dynamic"), calibration=calib, inductor=False)
    lowered = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for seq in (5, 1):
            lowered(token_batches(1, batch=1, seq=seq, seed=seq)[0], use_cache=False)
    experts = [p for p, w in model.named_parameters() if w.dim() == 3]
    assert all(backend.report.rows[p].kernel == lowering.experts_label(None, "cpu_int_mm") for p in experts)
    storages = [{t.untyped_storage().data_ptr() for t in constants(gm).values() if t.dtype == torch.int8 and t.dim() == 3}
                for gm in backend.graphs]
    assert len(storages) == 2 and len(storages[0]) == len(experts) and storages[0] == storages[1]
    assert not any(t.is_mkldnn for gm in backend.graphs for t in constants(gm).values())


@exact
@pytest.mark.parametrize("target", TARGETS)
def test_bf16_experts(monkeypatch, target):
    """bf16 experts (``torch._grouped_mm``): on ``_int_mm`` per expert, output in bf16, within twice the
    reference path's error of the bf16 model."""
    _force(monkeypatch, target)
    model = tiny_model("qwen2_moe", layers=1).to(torch.bfloat16)
    calib = qpass.calibrate(model, token_batches(2))
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.float()
    reference, _ = _logits(model, qpass.preset("w8a8_dynamic", lower=False), calib, ids)
    out, backend = _logits(model, qpass.preset("w8a8_dynamic"), calib, ids)
    assert out.dtype == torch.bfloat16
    experts = [p for p, w in model.named_parameters() if w.dim() == 3]
    assert all(backend.report.rows[p].kernel == lowering.experts_label(None, KERNEL[target]) for p in experts)
    assert 0 < _rel(out.float(), ref) < 2.0 * _rel(reference.float(), ref), (_rel(out.float(), ref), _rel(reference.float(), ref))


def test_fp8_experts_on_cuda_keep_the_reference_path(monkeypatch):
    """fp8 experts on a (fake) H100: no grouped fp8 kernel yet, so the reference path, said in each row."""
    _force(monkeypatch, "fake-cuda")
    model = Grouped(False).eval()
    offs = _offs((3, 0, 1, 5))
    _, backend, _ = _lowered(model, qpass.preset("fp8_dynamic", smoothing=None), None, _rows(9, 3, False), offs,
                             inductor=False)
    assert backend.report.rows["gate_up_proj"].kernel == "reference (fp8 fused experts: no grouped fp8 kernel yet)"


# ----------------------------------------------------------------------------- snapshots


def _snapshot(monkeypatch, target: str, name: str) -> str:
    _force(monkeypatch, target)
    torch.manual_seed(0)
    model = Grouped(False).eval()
    offs = _offs((3, 0, 1, 5))
    x = _rows(9, seed=3, worst_case=False)
    calib = _static_calibration(_rows(8, seed=4, worst_case=False), _offs((2, 2, 2, 2))) if name == "static" else None
    _, backend, _ = _lowered(model, CONFIGS[name].replace(smoothing=None), calib, x, offs, inductor=False)
    return qpass.format_graph(backend.graphs[0], focus=False)


class TestGroupedIntMmSnapshots(expecttest.TestCase):
    """The lowered grouped matmul (numerical twins: the integer tests above)."""

    @pytest.fixture(autouse=True)
    def _monkeypatch(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def test_cpu_symmetric_per_token(self):
        self.assertExpectedInline(_snapshot(self.monkeypatch, "cpu", "sym per-token"), """\
param gate_up_proj : f32[4,23,37]
%1 = input : f32[9,37]
%2 = input : i32[4]
const gate_up_proj.weight_int8 : i8[4,23,37]
const gate_up_proj.weight_scale : f32[4,23]
%5 = .to(%1, f32) : f32[9,37]
%6 = qpass.choose_qparams(%5, True, True, -128, 127) : (f32[9,1], f32[9,1])
%7 = getitem(%6, 0) : f32[9,1]
%8 = qpass.quantize(%5, %7, None, -128, 127, i8) : i8[9,37]
%9 = qpass.grouped_int_mm(%8, %2, const gate_up_proj.weight_int8, False) : i32[9,23]
%10 = prims.convert_element_type(%9, f32) : f32[9,23]
%11 = qpass.expert_of_rows(%5, %2) : i64[9]
%12 = index_select(const gate_up_proj.weight_scale, 0, %11) : f32[9,23]
%13 = mul(%7, %12) : f32[9,23]
%14 = mul(%10, %13) : f32[9,23]
""")

    def test_cpu_asymmetric_per_token(self):
        self.assertExpectedInline(_snapshot(self.monkeypatch, "cpu", "asym per-token"), """\
param gate_up_proj : f32[4,23,37]
%1 = input : f32[9,37]
%2 = input : i32[4]
const gate_up_proj.weight_int8 : i8[4,23,37]
const gate_up_proj.weight_scale : f32[4,23]
const gate_up_proj.weight_colsum : f32[4,23]
%6 = .to(%1, f32) : f32[9,37]
%7 = qpass.choose_qparams(%6, True, False, -128, 127) : (f32[9,1], f32[9,1])
%8 = getitem(%7, 0) : f32[9,1]
%9 = getitem(%7, 1) : f32[9,1]
%10 = qpass.quantize(%6, %8, %9, -128, 127, i8) : i8[9,37]
%11 = qpass.grouped_int_mm(%10, %2, const gate_up_proj.weight_int8, False) : i32[9,23]
%12 = prims.convert_element_type(%11, f32) : f32[9,23]
%13 = qpass.expert_of_rows(%6, %2) : i64[9]
%14 = index_select(const gate_up_proj.weight_scale, 0, %13) : f32[9,23]
%15 = mul(%8, %14) : f32[9,23]
%16 = mul(%12, %15) : f32[9,23]
%17 = index_select(const gate_up_proj.weight_colsum, 0, %13) : f32[9,23]
%18 = mul(%9, %8) : f32[9,1]
%19 = mul(%18, %17) : f32[9,23]
%20 = sub(%16, %19) : f32[9,23]
""")

    def test_cuda_static_padded(self):
        self.assertExpectedInline(_snapshot(self.monkeypatch, "fake-cuda", "static"), """\
param gate_up_proj : f32[4,23,37]
%1 = input : f32[9,37]
%2 = input : i32[4]
const gate_up_proj.input_scale : f32[4]
const gate_up_proj.weight_int8 : i8[4,24,40]
const gate_up_proj.weight_scale : f32[4,23]
%6 = .to(%1, f32) : f32[9,37]
%7 = qpass.expert_of_rows(%6, %2) : i64[9]
%8 = index_select(const gate_up_proj.input_scale, 0, %7) : f32[9]
%9 = unsqueeze(%8, -1) : f32[9,1]
%10 = qpass.quantize(%6, %9, None, -128, 127, i8) : i8[9,37]
%11 = qpass.grouped_int_mm(%10, %2, const gate_up_proj.weight_int8, True) : i32[9,24]
%12 = narrow(%11, 1, 0, 23) : i32[9,23]
%13 = prims.convert_element_type(%12, f32) : f32[9,23]
%14 = index_select(const gate_up_proj.weight_scale, 0, %7) : f32[9,23]
%15 = mul(%9, %14) : f32[9,23]
%16 = mul(%13, %15) : f32[9,23]
""")
