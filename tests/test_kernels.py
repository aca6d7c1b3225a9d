"""Exact tests for qpass.kernels.

Exactness argument: integer accumulators stay below 2**24 (so float32 holds them exactly), all
scales are powers of two and biases are multiples of 2**-4 with small magnitude, so every
float32 intermediate is exactly representable and kernel == int64/float64 reference bit for bit
(``rtol=atol=0``). Where a scale cannot be a power of two (random per-token scales) the
tolerance is two float32 roundings of the final scaling (``rtol=2**-22``).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing import assert_close

import qpass.kernels as K

SHAPES_KN = [(37, 23), (100, 70)]
MS = [1, 3, 17, 513]
EXACT = dict(rtol=0.0, atol=0.0)


def assert_rounding_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Two float32 roundings (per-token rescale, bias add) on top of an exact integer product:
    each contributes at most 2**-24 of the larger of |product| and |result|."""
    assert_close(out.double(), ref, rtol=2.0**-22, atol=2.0**-22 * float(ref.abs().max()))

needs_onednn = pytest.mark.skipif(not K.kernel_available("onednn"), reason="oneDNN not available")
needs_fbgemm = pytest.mark.skipif(not K.kernel_available("fbgemm"), reason="FBGEMM not available")
onednn_saturates = pytest.mark.skipif(
    not K.kernel_available("onednn") or K.int8_dot_exact("onednn"),
    reason="oneDNN's u8 x s8 products are exact here (VNNI / AMX): full-range u8 does not saturate",
)
fbgemm_saturates = pytest.mark.skipif(
    not K.kernel_available("fbgemm") or K.int8_dot_exact("fbgemm"),
    reason="FBGEMM's u8 x s8 products are exact here (VNNI / AMX): full-range u8 does not saturate",
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 (N, K) weight using the whole range (incl. -128 and 127); power-of-two scales."""
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w[0, 0], w[-1, -1] = -128, 127
    scales = 2.0 ** -torch.randint(4, 11, (n,), generator=g).to(torch.float32)
    return w, scales


def _bias(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(-256, 257, (n,), generator=g).to(torch.float32) / 16


def _u7(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    x = torch.randint(1, 128, shape, generator=g, dtype=torch.uint8)
    x.view(-1)[0], x.view(-1)[-1] = 1, 127
    return x


# ----------------------------------------------------------------------------- quantizers


def test_quantize_act_u7_per_token_range_and_error() -> None:
    g = _gen(0)
    x = torch.randn(5, 7, 33, generator=g) * torch.logspace(-3, 3, 7)[:, None]
    x[0, 0] = 0.0  # all-zero row
    q, s = K.quantize_act_u7_per_token(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (5, 7, 1)
    assert int(q.min()) >= 1 and int(q.max()) <= 127
    assert torch.all(q[0, 0] == K.U7_ZERO_POINT)
    # Each row reaches +-63 and the dequantization error is at most half a step.
    assert torch.all((q[1:].to(torch.int16) - 64).abs().amax(-1) == 63)
    err = (K.dequantize_act_u7(q, s) - x).abs()
    assert torch.all(err <= s * 0.5 * (1 + 1e-6))


def test_quantize_act_u7_per_tensor_matches_formula() -> None:
    g = _gen(1)
    x = torch.randn(9, 40, generator=g) * 3
    scale = 0.05
    q = K.quantize_act_u7_per_tensor(x, scale)
    expect = (torch.clamp(torch.round(x.double() / scale), -63, 63) + 64).to(torch.uint8)
    assert q.dtype == torch.uint8
    assert torch.equal(q, expect)
    assert int(q.min()) == 1 and int(q.max()) == 127  # clamped at both ends
    # Same scale per token -> same codes as the static quantizer.
    assert torch.equal(K.quantize_act_u7_per_tensor(x, torch.tensor(scale)), q)


def test_quantize_weight_int8_per_channel() -> None:
    w = torch.randn(23, 37, generator=_gen(2))
    wq, s = K.quantize_weight_int8_per_channel(w)
    assert wq.dtype == torch.int8 and s.shape == (23,)
    assert torch.all(wq.abs().amax(1) == 127)
    assert torch.all((wq.float() * s[:, None] - w).abs() <= s[:, None] * 0.5 * (1 + 1e-6))


# ----------------------------------------------------------------------------- oneDNN


@needs_onednn
@pytest.mark.parametrize("k,n", SHAPES_KN)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_qlinear_exact(m: int, k: int, n: int, with_bias: bool) -> None:
    g = _gen(1000 * m + k + n + with_bias)
    w, ws = _weight(n, k, g)
    bias = _bias(n, g) if with_bias else None
    pw = K.pack_onednn_int8(w, ws)
    x = _u7((m, k), g)
    x_scale = 2.0**-3
    out = torch.ops.qpass.onednn_qlinear(x, x_scale, 64, pw.packed, pw.scales, bias)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    ref = K.reference_int_linear(x, 64, w, x_scale, ws, bias)
    assert_close(out.double(), ref, **EXACT)


@needs_onednn
def test_onednn_qlinear_extremes_and_leading_dims() -> None:
    """Worst case for int16 pair sums: all activations 127 against weights -128 / 127."""
    k, n = 100, 70
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[::2] = -128
    pw = K.pack_onednn_int8(w, 1.0)
    x = torch.full((2, 3, k), 127, dtype=torch.uint8)
    x[1] = 1
    for zp in (64, 0):
        out = K.onednn_qlinear(x, 1.0, zp, pw.packed, pw.scales, None)
        assert out.shape == (2, 3, n)
        assert_close(out.double(), K.reference_int_linear(x, zp, w), **EXACT)
    empty = K.onednn_qlinear(x[:0], 1.0, 64, pw.packed, pw.scales, None)
    assert empty.shape == (0, 3, n)


@needs_onednn
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_dynamic_per_token_exact(m: int, with_bias: bool) -> None:
    """Per-token wrapper == fake-quant reference; rows built so every per-token scale is 2**e."""
    k, n = 100, 70
    g = _gen(7 + m + with_bias)
    w, ws = _weight(n, k, g)
    bias = _bias(n, g) if with_bias else None
    pw = K.pack_onednn_int8(w, ws)
    e = torch.randint(-6, 3, (2, m, 1), generator=g).to(torch.float32)
    x = (torch.rand(2, m, k, generator=g) * 2 - 1) * 63 * 2.0**e
    x[..., 5] = 63 * 2.0**e[..., 0]  # row amax = 63 * 2**e -> scale 2**e exactly
    out = K.onednn_dynamic_linear(x, pw.packed, pw.scales, bias)
    xq, s = K.quantize_act_u7_per_token(x)
    assert torch.equal(s, 2.0**e)
    ref = K.reference_int_linear(xq, 64, w, s, ws, bias)
    assert out.dtype == torch.float32 and out.shape == (2, m, n)
    assert_close(out.double(), ref, **EXACT)


@needs_onednn
@pytest.mark.parametrize("k,n", SHAPES_KN)
@pytest.mark.parametrize("m", MS)
def test_onednn_dynamic_per_token_random(m: int, k: int, n: int) -> None:
    """Random activations: equals fake quantization up to the float32 rescale + bias add."""
    g = _gen(11 + m + k)
    w, ws = _weight(n, k, g)
    bias = _bias(n, g)
    pw = K.pack_onednn_int8(w, ws)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]
    out = K.onednn_dynamic_linear(x, pw.packed, pw.scales, bias)
    xq, s = K.quantize_act_u7_per_token(x)
    x_dq = (xq.double() - 64) * s.double()  # fake quantization in float64
    fake_quant = torch.nn.functional.linear(x_dq, w.double() * ws.double()[:, None], bias.double())
    assert_rounding_close(out, fake_quant)
    assert_rounding_close(out, K.reference_int_linear(xq, 64, w, s, ws, bias))


@needs_onednn
def test_onednn_static_linear_exact() -> None:
    k, n, m = 37, 23, 17
    g = _gen(5)
    w, ws = _weight(n, k, g)
    bias = _bias(n, g)
    pw = K.pack_onednn_int8(w, ws)
    x_scale = 2.0**-2
    x = torch.randint(-70, 71, (m, k), generator=g).to(torch.float32) * x_scale  # clamps at 63
    out = K.onednn_static_linear(x, x_scale, pw.packed, pw.scales, bias)
    xq = K.quantize_act_u7_per_tensor(x, x_scale)
    assert_close(out.double(), K.reference_int_linear(xq, 64, w, x_scale, ws, bias), **EXACT)


@needs_onednn
def test_onednn_rejects_unpacked_weight_and_bad_inputs() -> None:
    w, ws = _weight(23, 37, _gen(3))
    x = _u7((3, 37), _gen(4))
    with pytest.raises(ValueError, match="packed"):
        K.onednn_qlinear(x, 1.0, 64, w, ws, None)  # would crash the process unguarded
    pw = K.pack_onednn_int8(w, ws)
    with pytest.raises(ValueError, match="uint8"):
        K.onednn_qlinear(x.to(torch.int8), 1.0, 0, pw.packed, pw.scales, None)
    with pytest.raises(ValueError, match="K="):
        K.onednn_qlinear(x[:, :36], 1.0, 64, pw.packed, pw.scales, None)
    with pytest.raises(ValueError):
        K.pack_onednn_int8(w, ws[:5])


@needs_onednn
@onednn_saturates
def test_onednn_full_range_u8_saturates_without_vnni() -> None:
    """Documents why activations are 7-bit: u8 255 x s8 127 pairs saturate int16 (AVX2)."""
    k, n = 38, 8
    pw = K.pack_onednn_int8(torch.full((n, k), 127, dtype=torch.int8), 1.0)
    x = torch.full((4, k), 255, dtype=torch.uint8)
    out = K.onednn_qlinear(x, 1.0, 0, pw.packed, pw.scales, None)
    exact = 255 * 127 * k
    assert float(out[0, 0]) != exact
    assert float(out[0, 0]) == 32767 * (k // 2)  # every pair sum clipped to int16 max


# ----------------------------------------------------------------------------- saturation probe


def _vpmaddubsw_dot(x_u8: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x_u8 @ w.T`` as AVX2 computes it: adjacent u8 x s8 products summed in saturating int16."""
    prod = x_u8.long()[:, None, :] * w.long()[None, :, :]
    pairs = prod[..., 0::2] + prod[..., 1::2]
    return pairs.clamp(-(2**15), 2**15 - 1).sum(-1)


def test_probe_operands_catch_int16_saturation() -> None:
    """The probe's worst case is off under an emulated ``vpmaddubsw`` (by half the result), while its
    rows that cannot saturate are not: a kernel that saturates fails the probe, one that does not passes."""
    x, w = K.saturation_probe_operands()
    exact = x.long() @ w.long().T
    saturated = _vpmaddubsw_dot(x, w)
    assert int(exact.abs().max()) == 64 * 255 * 128
    assert (saturated[0, :2] != exact[0, :2]).all()
    assert (saturated[0, :2] - exact[0, :2]).abs().min() > exact[0, :2].abs().min() // 3
    assert torch.equal(saturated[1:, :3], exact[1:, :3]), "rows without saturating pairs must agree"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@pytest.mark.skipif(bool({"ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS"} & set(os.environ)),
                    reason="an ISA limit is set: the CPU flags do not say what the kernels use")
@pytest.mark.parametrize("kernel", K.PROBED_KERNELS)
def test_probe_agrees_with_cpu_flags(kernel: str) -> None:
    """Without ISA limits, each kernel's probe finds what the CPU flags predict: exact with VNNI or AMX
    (the developers' AVX-512 VNNI EPYC), saturating on plain AVX2 / AVX-512F."""
    if not K.kernel_available(kernel):
        pytest.skip(f"{kernel} not available")
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    assert K.int8_dot_exact(kernel) == bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def test_probe_names_its_kernels() -> None:
    with pytest.raises(ValueError, match="no saturation probe"):
        K.int8_dot_exact("cuda_int8")


@needs_fbgemm
@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines, reason="needs the onednn engine")
def test_fbgemm_pack_refuses_other_engines() -> None:
    """FBGEMM weights are packed under the 'fbgemm' / 'x86' engine only; under another one the pack is
    refused and the process-wide engine left alone (not switched and back)."""
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "onednn"
    try:
        assert not K.fbgemm_packs() and not K.kernel_available("fbgemm")
        with pytest.raises(RuntimeError, match="does not change the process-wide engine"):
            K.pack_fbgemm_dynamic(torch.randn(4, 8))
        assert torch.backends.quantized.engine == "onednn"
    finally:
        torch.backends.quantized.engine = engine
    assert K.kernel_available("fbgemm")


# ----------------------------------------------------------------------------- FBGEMM


def _fbgemm_exact_input(
    m: int, k: int, s: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """x = xq * s with xq in [-64, 63] touching both ends -> FBGEMM picks scale s, zp 64."""
    xq = torch.randint(-64, 64, (m, k), generator=g)
    xq.view(-1)[0], xq.view(-1)[-1] = -64, 63
    return xq, xq.to(torch.float32) * s


@needs_fbgemm
@pytest.mark.parametrize("k,n", SHAPES_KN)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fbgemm_dynamic_linear_exact(m: int, k: int, n: int, with_bias: bool) -> None:
    g = _gen(2000 * m + k + n + with_bias)
    w, ws = _weight(n, k, g)
    bias = _bias(n, g) if with_bias else None
    h = K.pack_fbgemm_dynamic(w, ws)
    try:
        s = 2.0**-3
        xq, x = _fbgemm_exact_input(m, k, s, g)
        assert K.fbgemm_act_qparams(x, reduce_range=True) == (s, 64)
        out = torch.ops.qpass.fbgemm_dynamic_linear(x, h, bias)
        assert out.dtype == torch.float32 and out.shape == (m, n)
        assert_close(out.double(), K.reference_int_linear(xq, 0, w, s, ws, bias), **EXACT)
    finally:
        K.release_fbgemm(h)


@needs_fbgemm
def test_fbgemm_weight_formats_and_packed_bias() -> None:
    """int8+scales, torch.quantize_per_channel qint8 and a packed bias all give the same result."""
    k, n, m = 37, 23, 3
    g = _gen(21)
    w, ws = _weight(n, k, g)
    bias = _bias(n, g)
    s = 2.0**-4
    xq, x = _fbgemm_exact_input(m, k, s, g)
    ref = K.reference_int_linear(xq, 0, w, s, ws, bias)
    with warnings.catch_warnings():  # quantized tensors are deprecated (warned once per process)
        warnings.simplefilter("ignore", UserWarning)
        qw = torch.quantize_per_channel(
            w.float() * ws[:, None], ws.double(), torch.zeros(n, dtype=torch.int64), 0, torch.qint8
        )
    assert torch.equal(qw.int_repr(), w)  # per-channel qint8 keeps the integers (incl. -128)
    handles = [K.pack_fbgemm_dynamic(w, ws, bias), K.pack_fbgemm_dynamic(qw, bias=bias)]
    try:
        for h in handles:
            out = K.fbgemm_dynamic_linear(x.reshape(1, m, k), h, None)
            assert out.shape == (1, m, n)
            assert_close(out[0].double(), ref, **EXACT)
    finally:
        for h in handles:
            K.release_fbgemm(h)
    # A float weight is quantized symmetric per channel before packing.
    wf = torch.randn(n, k, generator=g)
    h = K.pack_fbgemm_dynamic(wf)
    try:
        wq, wsf = K.quantize_weight_int8_per_channel(wf)
        out = K.fbgemm_dynamic_linear(x, h, None)
        assert_rounding_close(out, K.reference_int_linear(xq, 0, wq, s, wsf))
    finally:
        K.release_fbgemm(h)
    with pytest.raises(KeyError):
        K.fbgemm_dynamic_linear(x, h, None)


@needs_fbgemm
@pytest.mark.parametrize("reduce_range", [True, False])
def test_fbgemm_activation_is_per_tensor_asymmetric(reduce_range: bool) -> None:
    """Random data with very different row magnitudes: FBGEMM == per-TENSOR emulation."""
    k, n = 100, 70
    g = _gen(31)
    # Half-range weights so that the full-range (reduce_range=False) case cannot saturate.
    w = torch.randint(-63, 64, (n, k), generator=g, dtype=torch.int8)
    ws = torch.full((n,), 2.0**-6)
    h = K.pack_fbgemm_dynamic(w, ws, reduce_range=reduce_range)
    try:
        for trial in range(20):
            m = [1, 3, 17][trial % 3]
            x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, m)[:, None] + trial * 0.1
            out = K.fbgemm_dynamic_linear(x, h, None)
            ref = K.reference_fbgemm_dynamic_linear(x, w, ws, reduce_range=reduce_range)
            assert_close(out.double(), ref, rtol=2.0**-21, atol=2.0**-21 * float(ref.abs().max()))
    finally:
        K.release_fbgemm(h)


@needs_fbgemm
@fbgemm_saturates
def test_fbgemm_full_range_is_wrong_without_vnni() -> None:
    """linear_dynamic's default reduce_range=False saturates on AVX2 (why we pack with True)."""
    k, n, m = 38, 8, 2
    w = torch.full((n, k), 127, dtype=torch.int8)
    s = 2.0**-3
    xq = torch.full((m, k), 127)
    xq[:, 0] = -128  # full range: zp 128, codes up to 255
    x = xq.to(torch.float32) * s
    ref = K.reference_int_linear(xq, 0, w, s, 1.0)
    handles = {rr: K.pack_fbgemm_dynamic(w, 1.0, reduce_range=rr) for rr in (False, True)}
    try:
        wrong = K.fbgemm_dynamic_linear(x, handles[False], None)
        assert not torch.allclose(wrong.double(), ref, rtol=1e-3, atol=0)
        xq7 = xq.clamp(-64, 63)
        right = K.fbgemm_dynamic_linear(xq7.to(torch.float32) * s, handles[True], None)
        assert_close(right.double(), K.reference_int_linear(xq7, 0, w, s, 1.0), **EXACT)
    finally:
        for h in handles.values():
            K.release_fbgemm(h)


# ----------------------------------------------------------------------------- _int_mm / _scaled_mm


@pytest.mark.parametrize("k,n", SHAPES_KN)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("with_bias,pad", [(False, False), (True, True), (True, False)])
@pytest.mark.skipif(not K.int_mm_exact(), reason="this CPU's torch._int_mm saturates int16 pair sums (no VNNI)")
def test_int8_scaled_mm_exact(m: int, k: int, n: int, with_bias: bool, pad: bool) -> None:
    g = _gen(3000 * m + k + n + 2 * with_bias + pad)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w, ws = _weight(n, k, g)
    xs = 2.0 ** -torch.randint(0, 6, (m, 1), generator=g).to(torch.float32)
    bias = _bias(n, g) if with_bias else None
    out = K.int8_scaled_mm(x, w.t(), xs, ws[None, :], bias, pad=pad)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert_close(out.double(), K.reference_int_linear(x, 0, w, xs, ws, bias), **EXACT)
    out2 = K.int8_scaled_mm(x, w.t().contiguous(), 0.5, 0.25, bias, pad=pad)
    assert_close(out2.double(), K.reference_int_linear(x, 0, w, 0.5, 0.25, bias), **EXACT)


def _fp8_ints(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """float8_e4m3fn holding integers in [-16, 16] (all exact in e4m3)."""
    return torch.randint(-16, 17, shape, generator=g).to(torch.float32).to(torch.float8_e4m3fn)


@pytest.mark.skipif(not K.kernel_available("fp8_cpu"), reason="no float8 _scaled_mm")
@pytest.mark.parametrize("k,n", SHAPES_KN)
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("rowwise,pad", [(False, False), (True, False), (True, True)])
def test_fp8_scaled_mm_exact(m: int, k: int, n: int, rowwise: bool, pad: bool) -> None:
    g = _gen(4000 * m + k + n + 2 * rowwise + pad)
    x = _fp8_ints((m, k), g)
    w = _fp8_ints((n, k), g)
    bias = _bias(n, g)
    if rowwise:
        xs = 2.0 ** -torch.randint(0, 4, (m, 1), generator=g).to(torch.float32)
        ws = 2.0 ** -torch.randint(0, 4, (1, n), generator=g).to(torch.float32)
    else:
        xs, ws = torch.tensor(0.5), torch.tensor(0.125)
    xi, wi = x.to(torch.float32).to(torch.int64), w.to(torch.float32).to(torch.int64)
    ref = K.reference_int_linear(xi, 0, wi, xs, ws.reshape(-1), bias)
    out = K.fp8_scaled_mm(x, w.t(), xs, ws, bias, out_dtype=torch.float32, pad=pad)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert_close(out.double(), ref, **EXACT)
    # A row-major (K, N) weight works too (made column-major first when padding).
    out_rm = K.fp8_scaled_mm(x, w.t().contiguous(), xs, ws, bias, out_dtype=torch.float32, pad=pad)
    assert_close(out_rm.double(), ref, **EXACT)
    out_bf16 = K.fp8_scaled_mm(x, w.t(), xs, ws, None, out_dtype=torch.bfloat16, pad=pad)
    assert out_bf16.dtype == torch.bfloat16
    assert_close(out_bf16.double(), ref - bias.double(), rtol=2.0**-8, atol=0.0)


def test_cuda_helpers_fake_shapes() -> None:
    """Under FakeTensorMode on (fake) CUDA: odd shapes are padded to what the kernels accept."""
    m, k, n = 3, 37, 23
    with FakeTensorMode():
        dev = torch.device("cuda")
        x = torch.empty(m, k, dtype=torch.int8, device=dev)
        w_t = torch.empty(n, k, dtype=torch.int8, device=dev).t()
        out = K.int8_scaled_mm(x, w_t, torch.empty(m, 1, device=dev), torch.empty(1, n, device=dev))
        assert out.shape == (m, n) and out.dtype == torch.float32 and out.device.type == "cuda"
        out = K.int8_scaled_mm(
            x, w_t, 1.0, torch.empty(n, device=dev), torch.empty(n, device=dev), torch.bfloat16
        )
        assert out.shape == (m, n) and out.dtype == torch.bfloat16

        xf = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=dev)
        wf_t = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=dev).t()
        for xs, ws in [
            (torch.empty((), device=dev), torch.empty((), device=dev)),
            (torch.empty(m, 1, device=dev), torch.empty(1, n, device=dev)),
        ]:
            bias = torch.empty(n, device=dev, dtype=torch.bfloat16)
            out = K.fp8_scaled_mm(xf, wf_t, xs, ws, bias)
            assert out.shape == (m, n) and out.dtype == torch.bfloat16 and out.device.type == "cuda"
        out = K.fp8_scaled_mm(xf, wf_t, xs, ws, out_dtype=torch.float32)
        assert out.shape == (m, n) and out.dtype == torch.float32
        # Without the padding the CUDA meta checks reject K=37 / N=23.
        with pytest.raises(RuntimeError, match="divisible by 16"):
            K.fp8_scaled_mm(xf, wf_t, xs, ws, pad=False)


# ----------------------------------------------------------------------------- fake impls / compile


@needs_onednn
def test_custom_op_fake_impls() -> None:
    w, ws = _weight(23, 37, _gen(41))
    pw = K.pack_onednn_int8(w, ws)
    h = K.pack_fbgemm_dynamic(w, ws)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            x = mode.from_tensor(torch.zeros(2, 5, 37, dtype=torch.uint8))
            out = torch.ops.qpass.onednn_qlinear(x, 1.0, 64, pw.packed, mode.from_tensor(ws), None)
            assert out.shape == (2, 5, 23) and out.dtype == torch.float32
            xf = mode.from_tensor(torch.zeros(4, 37, dtype=torch.bfloat16))
            out = torch.ops.qpass.fbgemm_dynamic_linear(xf, h, None)
            assert out.shape == (4, 23) and out.dtype == torch.float32
        x = torch.randn(3, 37, generator=_gen(42))
        torch.library.opcheck(torch.ops.qpass.fbgemm_dynamic_linear.default, (x, h, None))
    finally:
        K.release_fbgemm(h)


class _OnednnLinear(torch.nn.Module):
    """Packed weight held as module buffers (how a lowering pass would keep constants)."""

    def __init__(self, w: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        pw = K.pack_onednn_int8(w, ws)
        self.register_buffer("packed", pw.packed)
        self.register_buffer("scales", pw.scales)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.onednn_dynamic_linear(x, self.packed, self.scales, self.bias)


@needs_onednn
@needs_fbgemm
def test_ops_compile_with_inductor_fullgraph() -> None:
    torch._dynamo.reset()
    k, n = 100, 70
    g = _gen(51)
    w, ws = _weight(n, k, g)
    bias = _bias(n, g)
    pw = K.pack_onednn_int8(w, ws)
    h = K.pack_fbgemm_dynamic(w, ws)
    try:

        def fn(x: torch.Tensor) -> torch.Tensor:
            # Closure constants: packed oneDNN weight and the FBGEMM handle.
            a = K.onednn_dynamic_linear(x, pw.packed, pw.scales, bias)
            b = K.onednn_static_linear(x, 2.0**-4, pw.packed, pw.scales, bias)
            c = K.fbgemm_dynamic_linear(x, h, bias)
            return torch.relu(a) + b + c

        x = torch.randn(2, 9, k, generator=g)
        compiled = torch.compile(fn, backend="inductor", fullgraph=True)
        assert_close(compiled(x), fn(x), **EXACT)

        mod = _OnednnLinear(w, ws, bias)
        cmod = torch.compile(mod, backend="inductor", fullgraph=True)
        for m in (1, 17):
            xm = torch.randn(m, k, generator=g)
            assert_close(cmod(xm), mod(xm), **EXACT)
    finally:
        K.release_fbgemm(h)
        torch._dynamo.reset()


def test_kernel_available() -> None:
    avail = K.available_kernels()
    assert set(avail) == set(K.KERNEL_NAMES)
    assert avail["int_mm"]
    assert avail["cuda_int8"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert not avail["cuda_fp8"]
    with pytest.raises(ValueError):
        K.kernel_available("nope")


def test_reference_int_linear_small() -> None:
    xq = torch.tensor([[65, 63, 64]], dtype=torch.uint8)
    wq = torch.tensor([[1, 2, 3], [-128, 127, 0]], dtype=torch.int8)
    ws, bias = torch.tensor([1.0, 2.0]), torch.tensor([0.25, 0.0])
    out = K.reference_int_linear(xq, 64, wq, 0.5, ws, bias)
    # (1 - 2) * 0.5 * 1 + 0.25 ; (-128 - 127) * 0.5 * 2
    assert out.dtype == torch.float64
    assert out.tolist() == [[-0.25, -255.0]]
