"""Weight-only presets (``w8a16``, ``w4a16``) on ATen's weight-only CPU kernels, and ``llm_int8``'s
inlier linear on the int8 kernels.

The weight-only kernels are checked against the reference path's own dequantized weight (``(q - zp) *
scale`` in float32) element by element, within a bound written from bf16 rounding (of the kernel's
scales and zeros, of its output): a wrong zero-point convention, a wrong packing order or a scale on
the wrong axis is off by whole weights. ``llm_int8``'s inlier integer dot products are recovered
from the output, as ``tests/test_lower.py`` does for the dense int8 kernels.
"""

from __future__ import annotations

import logging

import pytest
import torch

import qpass
from qpass import qmath
from qpass.graph import constants
from qpass.passes import lower as lowering
from tests.models import tiny_model, token_batches
from tests.linears import Proj, int_reference, inputs
from tests.test_lower import CPU, _split, needs_onednn

W8 = "int8 weight-only (_weight_int8pack_mm)"
W4 = "int4 weight-only (_weight_int4pack_mm_for_cpu)"
FALLBACK = "proj: kept on the reference quant/dequant path: {}"


def _run(model, config, x, calib=None, *, lower=True, inductor=False):
    torch._dynamo.reset()
    backend = qpass.backend(config.replace(lower=lower), calibration=calib, inductor=inductor)
    with torch.no_grad():
        y = torch.compile(model, backend=backend, dynamic=False)(x)
    torch._dynamo.reset()
    return y, backend


def _proj(k: int, n: int, bias: bool, dtype: torch.dtype, seed: int) -> Proj:
    torch.manual_seed(seed)
    model = Proj(k, n, bias).eval()
    with torch.no_grad():
        model.proj.weight[:, :3] *= 8.0  # a few wide input channels: groups with very different ranges
        if bias:
            model.proj.bias.normal_()
    return model.to(dtype)


def _bound(x: torch.Tensor, model: Proj, spec: qpass.QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exact, tol)``: the reference path's linear in float64 from its float32 dequantized weight
    ``(q - zp) * scale``, and an element-wise bound for a kernel that rounds the scale and ``zp *
    scale`` to bf16 (2**-9 relative each), may round the weight to bf16 once more, and rounds its
    output to bf16: ``2**-7 * |x| @ (|q * scale| + |zp * scale|).T + 2**-8 * |exact|``."""
    qw = qmath.quantize_weight(model.proj.weight.detach().float(), spec)
    w = qw.dequantize(torch.float32).double()
    scale = qw.scale.double()
    zp = torch.zeros(()) if qw.zero_point is None else qw.zero_point.double()
    if qw.group_size:  # (N, K / G) -> (N, K)
        scale = scale.repeat_interleave(qw.group_size, dim=1)
        zp = zp.repeat_interleave(qw.group_size, dim=1) if zp.dim() else zp
    magnitude = (qw.q.double() * scale).abs() + (zp * scale).abs()
    xd = x.reshape(-1, x.shape[-1]).double()
    exact = xd @ w.T
    if model.proj.bias is not None:
        exact = exact + model.proj.bias.detach().double()
    return exact, 2.0**-7 * (xd.abs() @ magnitude.T) + 2.0**-8 * exact.abs()


# (k, n): the int8 kernel needs K % 16 == 0; the int4 one N % 16 == 0 and K a multiple of the group (32).
SHAPES = {"w8a16": [(64, 32), (48, 23), (160, 7)], "w4a16": [(64, 32), (96, 48), (288, 80)]}


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("name,k,n", [(name, k, n) for name, shapes in SHAPES.items() for k, n in shapes])
def test_weight_only_kernel_equals_reference_dequantized_weight(name, k, n, bias, m):
    model = _proj(k, n, bias, torch.bfloat16, seed=k + n)
    x = torch.randn(1, m, k).to(torch.bfloat16)
    config = qpass.preset(name)
    y, backend = _run(model, config, x)
    assert backend.report.rows["proj"].kernel == (W8 if name == "w8a16" else W4)
    assert y.dtype == torch.bfloat16 and y.shape == (1, m, n)
    exact, tol = _bound(x, model, config.weight)
    err = (y.reshape(-1, n).double() - exact).abs()
    assert bool((err <= tol).all()), f"kernel off the dequantized weight by {(err / tol).max().item():.2f}x the bound"
    # the reference path (bf16 linear of the bf16-rounded weight) keeps the same bound
    y_ref, backend = _run(model, config, x, lower=False)
    assert backend.report.rows["proj"].kernel == ""
    assert bool(((y_ref.reshape(-1, n).double() - exact).abs() <= tol).all())


def test_int4_kernel_takes_symmetric_groups_and_other_group_sizes():
    """Symmetric int4 groups (zero 0 in the kernel) and groups of 64 and 128 map onto the kernel too."""
    model = _proj(256, 32, True, torch.bfloat16, seed=3)
    x = torch.randn(2, 7, 256).to(torch.bfloat16)
    for spec in (qpass.QuantSpec("int4", qpass.PerGroup(32)), qpass.QuantSpec("int4", qpass.PerGroup(64), symmetric=False),
                 qpass.QuantSpec("int4", qpass.PerGroup(128), symmetric=False)):
        config = qpass.preset("w4a16", weight=spec)
        y, backend = _run(model, config, x)
        assert backend.report.rows["proj"].kernel == W4, spec
        exact, tol = _bound(x, model, spec)
        assert bool(((y.reshape(-1, 32).double() - exact).abs() <= tol).all()), spec


@pytest.mark.parametrize("name,k,n,dtype,weight,why", [
    ("w8a16", 40, 16, torch.bfloat16, None,
     "int8 weight-only kernel needs K divisible by 16 (K=40); it crashed the process on AVX-512 otherwise"),
    ("w4a16", 64, 24, torch.bfloat16, None, "int4 weight-only kernel needs N divisible by 16 (N=24)"),
    ("w4a16", 64, 32, torch.bfloat16, qpass.QuantSpec("int4", qpass.PerGroup(16), symmetric=False),
     "int4 weight-only kernel needs groups of 32, 64, 128, 256 input channels (groups of 16)"),
    ("w4a16", 64, 32, torch.bfloat16, qpass.QuantSpec("int4", qpass.PerOutputChannel()),
     "int4 weight-only kernel needs groups of 32, 64, 128, 256 input channels (no groups)"),
    ("w8a16", 64, 32, torch.bfloat16, qpass.QuantSpec("int8", qpass.PerGroup(32)),
     "per-group int8 weights (the int8 weight-only kernel takes a scale per output channel)"),
    ("w8a16", 64, 32, torch.bfloat16, qpass.QuantSpec("int8", qpass.PerOutputChannel(), symmetric=False),
     "asymmetric int8 weights (the int8 weight-only kernel has no zero points)"),
    ("w8a16", 64, 32, torch.float32, None, "weight-only with float32 activations (its kernels are fast with bfloat16 only)"),
    ("w4a16", 64, 32, torch.float16, None, "weight-only with float16 activations (its kernels are fast with bfloat16 only)"),
], ids=["int8-K40", "int4-N24", "int4-group16", "int4-per-channel", "int8-groups", "int8-asym", "fp32", "fp16"])
def test_weight_only_fallback_names_the_layer(caplog, name, k, n, dtype, weight, why):
    """Where the kernel cannot take the layer: the reference path, its reason in the report, one
    warning naming the layer; the output is the reference path's."""
    model = _proj(k, n, True, dtype, seed=1)
    x = torch.randn(1, 5, k).to(dtype)
    config = qpass.preset(name, **({"weight": weight} if weight is not None else {}))
    with caplog.at_level(logging.WARNING, logger="qpass.passes.lower"):
        y, backend = _run(model, config, x)
    assert backend.report.rows["proj"].kernel == f"reference ({why})"
    assert [r.getMessage() for r in caplog.records if r.name == "qpass.passes.lower"] == [FALLBACK.format(why)]
    y_ref, _ = _run(model, config, x, lower=False)
    assert torch.equal(y, y_ref)


RED = lowering.KERNELS["cpu_wo_reduction"].label
#: weight layouts the reference path dequantizes, all of them for the one-token reduction
REDUCTION_SPECS = {
    "int8 per-channel": qpass.QuantSpec("int8", qpass.PerOutputChannel()),
    "int8 asymmetric": qpass.QuantSpec("int8", qpass.PerOutputChannel(), symmetric=False),
    "int4 groups of 32": qpass.QuantSpec("int4", qpass.PerGroup(32), symmetric=False, zero_point="int"),
    "int3 per-input-channel groups": qpass.QuantSpec("int3", qpass.PerInputChannelGroup(16), symmetric=False),
}


@pytest.mark.parametrize("inductor", [False, True], ids=["eager", "inductor"])
@pytest.mark.parametrize("spec", REDUCTION_SPECS.values(), ids=REDUCTION_SPECS.keys())
def test_float32_weight_only_at_one_token_is_a_reduction_over_the_stored_integers(spec, inductor):
    """One float32 token through a weight-only linear: ``sum(x * dequantize(W_q, ...), -1) + b``,
    the reference's products in another summation order (1e-6 relative); at 2 tokens the reference
    path as before. Under Inductor no float32 copy of the weight is made: the generated code
    allocates no (N, K) buffer and calls no GEMM."""
    from torch._inductor.utils import run_and_get_code

    model = _proj(64, 48, True, torch.float32, seed=2)
    config = qpass.preset("w8a16", weight=spec)
    x = torch.randn(1, 1, 64)
    y_ref, _ = _run(model, config, x, lower=False, inductor=inductor)
    if inductor:
        (y, backend), code = run_and_get_code(_run, model, config, x, inductor=True)
        code = "\n".join(code)
        assert "empty_strided_cpu((48, 64)" not in code and "extern_kernels." not in code.split("def call")[-1]
        assert code.count("async_compile.cpp_pybinding") == 1  # dequantize, multiply, sum and bias: one kernel
    else:
        y, backend = _run(model, config, x)
    assert backend.report.rows["proj"].kernel == RED
    assert ((y - y_ref).abs().max() / y_ref.abs().max()).item() < 1e-6
    _, backend = _run(model, config, torch.randn(1, 2, 64), inductor=inductor)
    assert backend.report.rows["proj"].kernel.startswith("reference (")


def test_weight_only_kernels_through_inductor():
    """Inductor compiles both kernels with their constants (packed int4 weight, bf16 scales) and
    gives the eager lowered graph's output up to bf16 rounding of the bias add."""
    model = _proj(64, 32, True, torch.bfloat16, seed=5)
    x = torch.randn(1, 5, 64).to(torch.bfloat16)
    for name in ("w8a16", "w4a16"):
        y, backend = _run(model, qpass.preset(name), x, inductor=True)
        assert backend.report.rows["proj"].kernel == (W8 if name == "w8a16" else W4)
        exact, tol = _bound(x, model, qpass.preset(name).weight)
        assert bool(((y.reshape(-1, 32).double() - exact).abs() <= tol).all()), name


@pytest.mark.parametrize("name", ["w8a16", "w4a16"])
def test_weight_only_prefill_and_decode_share_one_weight_copy(name):
    """Prefill and decode graphs of one backend read the same low-bit weights and scales (one copy
    per layer, not one per graph)."""
    model = tiny_model("llama", layers=1).to(torch.bfloat16)
    backend = qpass.backend(name, inductor=False)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(token_batches(1, batch=1, seq=8)[0], use_cache=False)
        compiled(token_batches(1, batch=1, seq=1)[0], use_cache=False)
    assert len(backend.graphs) == 2
    storages = [{n: t.untyped_storage().data_ptr() for n, t in constants(gm).items() if "proj" in n} for gm in backend.graphs]
    assert len(storages[0]) == 14 and storages[0] == storages[1]  # 7 linears: weights and scales


@pytest.mark.parametrize("name", ["w8a16", "w4a16"])
def test_bf16_llama_runs_weight_only_kernels(name):
    """A bf16 2-layer Llama: every decoder linear on its kernel (named in the report, ``lowered``
    in the stage summary), the logits within bf16 noise of the reference path's."""
    model = tiny_model("llama").to(torch.bfloat16)
    ids = token_batches(1, batch=1, seq=16, seed=7)[0]
    out, backend = _run(model, qpass.preset(name), ids)
    rows = {p: r for p, r in backend.report.rows.items() if p != "lm_head"}
    assert len(rows) == 14 and {r.kernel for r in rows.values()} == {W8 if name == "w8a16" else W4}
    stages = backend.report.stages()
    assert set(stages["lowered"]) == {f"{p}.weight" for p in rows}
    ref, _ = _run(model, qpass.preset(name), ids, lower=False)
    with torch.no_grad():
        eager = model(ids).logits
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    # bf16 noise of this model: the reference path against the eager model is 3.8% (w8a16) and 29%
    # (w4a16, mostly int4's own error); the kernels against the reference path 1.3-1.4%.
    assert rel(out.logits, ref.logits) < 0.03
    assert rel(out.logits, eager) < 1.1 * rel(ref.logits, eager) + 0.03


# ----------------------------------------------------------------------------- llm_int8


@needs_onednn
@pytest.mark.parametrize("m", [1, 17, 300])
def test_llm_int8_inliers_equal_integer_reference(m):
    """The inlier linear's integer dot products (per-token int8 activations with the outlier
    channels zeroed, int8 weights without the outlier columns) recovered from the output after
    the outlier columns' float64 product and the bias are taken off: equal to an int64 matmul
    written from the definitions, on the grid the report names."""
    k, n = 100, 70
    torch.manual_seed(m)
    model = Proj(k, n, True).eval()
    calib = qpass.calibrate(model, [inputs(64, k, seed=99, worst_case=False)])
    x = inputs(m, k, seed=m + k, worst_case=False)
    config = qpass.preset("llm_int8")
    y, backend = _run(model, config, x, calib)
    row = backend.report.rows["proj"]
    kernel, grid = _split(row.kernel)
    assert kernel == ("fbgemm" if m <= lowering.DECODE_M and CPU.fbgemm else "onednn") + lowering.SPLIT_NOTE, row
    assert grid in lowering.kernel_grids(CPU, kernel.removesuffix(lowering.SPLIT_NOTE), config.split_weights)

    absmax = calib["proj"].absmax
    outliers = (absmax > 2.0 * absmax.median()).nonzero().flatten()
    assert row.outlier_channels == outliers.numel() == 3  # the three planted channels
    mask = torch.ones(k)
    mask[outliers] = 0.0
    inliers = Proj(k, n, False)
    with torch.no_grad():
        inliers.proj.weight.copy_(model.proj.weight * mask)
    acc, unit = int_reference(inliers, x * mask, config, calib, grid)
    x2 = x.reshape(-1, k).double()
    outlier_part = x2[:, outliers] @ model.proj.weight.detach().double()[:, outliers].T
    rest = y.reshape(-1, n).double() - model.proj.bias.detach().double() - outlier_part
    acc_hat = rest / unit
    # float32 roundings of the outlier product, of the adds and of the result, in integer units
    tol = 0.25 + 8 * 2.0**-24 * ((x2[:, outliers].abs() @ model.proj.weight.detach().double()[:, outliers].abs().T)
                                 + y.reshape(-1, n).double().abs()) / unit
    err = (acc_hat - acc.double()).abs()
    assert bool((err < tol).all()), f"integer dot products differ by {err.max().item():.3f} units"


@needs_onednn
def test_llm_int8_lowered_llama_close_to_reference_path():
    """A 2-layer Llama: every decoder linear splits (each layer's input has the planted outliers),
    runs its inliers on an int8 kernel, and the logits stay within the reference path's error."""
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(4))
    ids = token_batches(1, batch=1, seq=48, seed=7)[0]
    out, backend = _run(model, qpass.preset("llm_int8"), ids, calib)
    kernels_used = {_split(r.kernel)[0] for p, r in backend.report.rows.items() if p != "lm_head"}
    assert kernels_used <= {"onednn" + lowering.SPLIT_NOTE, "onednn"} and "onednn" + lowering.SPLIT_NOTE in kernels_used
    ref, _ = _run(model, qpass.preset("llm_int8"), ids, calib, lower=False)
    with torch.no_grad():
        eager = model(ids).logits
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert 0 < rel(ref.logits, eager) < 0.1
    assert rel(out.logits, eager) < 2.0 * rel(ref.logits, eager)
