"""qpass.intops: I-LLM's integer operators against their float counterparts, with the error bounds
they hold, the exactness of the integer helpers, and the dtype flow (no float tensor inside an op).

Bounds (measured, then set with a margin; each names its source of error):
- DI-Exp on the clipped 8-bit grid: relative error <= 6.3% (the linear 2**r is at most 6.1% high).
- DI-ClippedSoftmax (c = 15): max |p - softmax| < 0.047, the paper's bound (measured 0.02 on these rows).
- int_requant: |x - dequant(requant(x))| <= 0.51 of the row's step (one rounding; range / 254).
- DI-MatMul: the integer product equals the float product of its dequantized operands (exactly).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from qpass import intops as I

torch.manual_seed(0)


def _deq(v):
    return I.int_dequantize(*v, torch.float64)


def _int(x, bits=24, dims=(-1,)):
    return I.int_quantize(x, list(dims), bits, True)


# -- helpers -----------------------------------------------------------------------------------------
def test_isqrt_exact_int32_and_edges():
    g = torch.Generator().manual_seed(0)
    n = torch.randint(0, 2**31 - 1, (20_000,), generator=g)
    squares = torch.cat([torch.arange(0, 1000), torch.randint(1000, 46341, (2000,), generator=g), torch.tensor([46340])]) ** 2
    edges = torch.tensor([0, 1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 2**31 - 1, 2**31, 2**62, 2**63 - 1])
    for x in (n, squares, squares[1:] - 1, squares + 1, edges):
        got = I.isqrt(x)
        want = torch.tensor([math.isqrt(v) for v in x.tolist()])
        assert torch.equal(got, want)


def test_bitlength_and_shift():
    x = torch.tensor([0, 1, 2, 3, 255, 256, 2**40, 2**62 + 5])
    assert I.bitlength(x).tolist() == [v.bit_length() for v in x.tolist()]
    v = torch.tensor([5, -5, 6, -6, 7, 1 << 20])
    assert I.shift(v, 1).tolist() == [10, -10, 12, -12, 14, 1 << 21]
    assert I.shift(v, -1).tolist() == [3, -2, 3, -3, 4, 1 << 19]  # round half up
    m, e = I.normalize(torch.tensor([1, 3, 2**20 + 1, 2**15 - 1]), 0)
    assert ((m >= 2**14) & (m < 2**15)).all()
    assert torch.allclose(m.double() * torch.pow(2.0, e.double()), torch.tensor([1, 3, 2**20 + 1, 2**15 - 1]).double(),
                          rtol=2**-14)


# -- dyadic search ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.0123, 0.3, 1.0, 1.4427, 3.7, 200.0])
def test_search_dyadic_stops_at_first_rise_and_is_optimal(value):
    calls = []

    def err(m, k):
        calls.append((m, k))
        return abs(m / 2.0**k - value) / value

    m, k, tried = I.search_dyadic(err)
    k_star = max(kk for kk in range(tried) if all(err(256, j) >= err(256, kk) for j in range(tried)))
    # the k stage stopped right after the minimum: k* then one rise
    assert tried == k_star + 2
    assert err(256, tried - 1) > err(256, tried - 2)
    assert 1 <= m <= 255
    best = min(err(mm, kk) for kk in range(0, 40) for mm in range(1, 256))
    assert err(m, k) == pytest.approx(best, abs=1e-12)
    assert err(m, k) < 2**-8  # an 8-bit mantissa


def test_search_dyadic_on_requantization_error():
    """The paper's use: the multiplier that requantizes int32 accumulators onto int8; the error over
    k (m = 256) falls while clipping shrinks, then rises with rounding, and the search stops there."""
    acc = torch.randint(-(2**20), 2**20, (256,)).double()

    def err(m, k):
        q = torch.clamp(torch.round(acc * m / 2.0**k), -128, 127)
        return float((q * 2.0**k / m - acc).pow(2).mean())

    m, k, tried = I.search_dyadic(err)
    errs = [err(256, j) for j in range(tried)]
    assert errs[-1] > errs[-2] and all(a >= b for a, b in zip(errs[:-2], errs[1:-1]))
    brute = min(err(mm, kk) for kk in range(max(k - 2, 0), k + 3) for mm in range(1, 256))
    assert err(m, k) == pytest.approx(brute, rel=1e-9)


# -- requantization and DI-MatMul ---------------------------------------------------------------------
def test_requant_one_rounding_per_element():
    x = torch.randn(300, 64) * 3
    x[:, 0] += 50  # one-signed outlier channel
    r = I.int_requant(*_int(x), [-1], 8, True)
    assert r[0].dtype == torch.int8
    step = (x.amax(-1) - x.amin(-1)).double() / 254
    err = (_deq(r) - x.double()).abs().amax(-1)
    assert (err <= 0.51 * step).all()


def test_di_matmul_exact_against_dequantized_operands():
    a = I.int_requant(*_int(torch.randn(2, 8, 64)), [-1], 8, True)
    w = torch.randn(48, 64)
    s = w.abs().amax(1) / 127
    wq = torch.round(w / s[:, None]).to(torch.int8)
    wm, we = I.const(s)
    weight = (wq.t().contiguous(), torch.zeros(1, 1, dtype=torch.int64), wm[None], we[None])
    out = I.di_matmul(*a, *weight)
    assert out[0].dtype == torch.int64
    ref = _deq(a) @ _deq(weight)
    assert torch.allclose(_deq(out), ref, rtol=1e-12, atol=0)  # exact: the weight mantissas multiply the integers
    # activation x activation (QK^T): per-token operands on both sides
    q = I.int_requant(*_int(torch.randn(1, 4, 8, 16)), [-1], 8, True)
    k = I.int_requant(*_int(torch.randn(1, 4, 8, 16)), [-1], 8, True)
    kt = tuple(t.transpose(-2, -1) for t in k)
    s_ = I.di_matmul(*q, *kt)
    assert torch.allclose(_deq(s_), _deq(q) @ _deq(kt), rtol=1e-12)


# -- DI-Exp and DI-ClippedSoftmax ---------------------------------------------------------------------
def test_di_exp_relative_error_over_clipped_range():
    c = 15.0
    g = torch.arange(256)  # the 8-bit grid over [-c, 0]
    m, k = I.mk(c / 255 * I.LOG2E)
    got = I.di_exp(g, m, k).double() / 2**I.EXP_BITS
    want = torch.exp(-g.double() * c / 255)
    rel = ((got - want) / want).abs()
    assert rel.max() <= 0.063  # 2**r ~ 1 + r/2 is at most 6.1% high; exp(-15) * 2**30 rounds to 0.3%
    assert rel[0] == 0  # exp(0) exact


@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_di_clipped_softmax_error_below_paper_bound(scale):
    logits = torch.randn(4, 32, 64) * torch.tensor([0.5, 2.0, 6.0, 20.0])[:, None, None]
    mask = torch.ones(32, 64, dtype=torch.bool).tril(diagonal=32)
    p = I.di_softmax(*_int(logits), mask, *I.softmax_consts(scale, 15.0))
    assert p[0].dtype == torch.uint8
    want = (logits.double() * scale).masked_fill(~mask, -math.inf).softmax(-1)
    err = (_deq(p) - want).abs().max().item()
    assert err < 0.047, err  # I-LLM's bound at c = 15
    assert (_deq(p)[..., ~mask] == 0).all()


# -- DI-Norm ------------------------------------------------------------------------------------------
def _norm_input():
    h = torch.randn(16, 64) * 2
    h[:, 3] *= 50  # an outlier channel
    h[5] *= 1e-3  # a tiny row: eps matters there
    return h


def test_di_rmsnorm_close_to_float():
    h, w = _norm_input(), torch.rand(64) + 0.5
    wm, we = I.const(w)
    out = I.di_rmsnorm(*_int(h), wm, we, *[int(v) for v in I.const(1e-6)])
    assert out[0].dtype == torch.int8
    want = h.double() * torch.rsqrt(h.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    step = (want.amax(-1) - want.amin(-1)) / 254
    assert ((_deq(out) - want).abs().amax(-1) <= 0.6 * step).all()  # int8 rounding plus the 2**-15 scales


def test_di_layernorm_close_to_float():
    h, w, b = _norm_input(), torch.rand(64) + 0.5, torch.randn(64)
    wm, we = I.const(w)
    bm, be = I.const(b.abs())
    out = I.di_layernorm(*_int(h), wm, we, bm * torch.sign(b).long(), be, *[int(v) for v in I.const(1e-5)])
    want = F.layer_norm(h.double(), (64,), w.double(), b.double(), 1e-5)
    step = (want.amax(-1) - want.amin(-1)) / 254
    assert ((_deq(out) - want).abs().amax(-1) <= 0.6 * step).all()


# -- DI-SiLU / SwiGLU / GELU --------------------------------------------------------------------------
def test_di_silu_gelu_swiglu_close_to_float():
    x = I.int_requant(*_int(torch.randn(8, 96) * 3), [-1], 8, True)
    xf = _deq(x)
    step = (xf.amax(-1, keepdim=True) - xf.amin(-1, keepdim=True)) / 254
    silu = _deq(I.di_silu(*x, *I.SILU_CONST))
    # the sigmoid's DI-Exp is at most 6.1% high in exp(-|x|): |x| * 0.061 * s(1-s) <= 0.016 |x| ... bounded by 0.02
    assert ((silu - F.silu(xf)).abs() <= 0.02 * xf.abs() + 1e-6).all()
    gelu = _deq(I.di_gelu(*x))
    assert ((gelu - F.gelu(xf)).abs() <= 0.025 * xf.abs() + 0.02).all()  # + sigmoid(1.702x)'s own 0.02
    up = I.int_requant(*_int(torch.randn(8, 96)), [-1], 8, True)
    sw = I.di_swiglu(x, up)
    assert sw[0].dtype == torch.int8
    want = F.silu(xf) * _deq(up)
    assert ((_deq(sw) - want).abs() <= 0.02 * (xf * _deq(up)).abs() + 0.51 * (want.amax(-1, keepdim=True)
            - want.amin(-1, keepdim=True)) / 254).all()


# -- dtype flow -----------------------------------------------------------------------------------------
def _float_nodes(fn, *args):
    gm = make_fx(fn)(*args)
    bad = []
    for node in gm.graph.nodes:
        vals = node.meta.get("val")
        vals = vals if isinstance(vals, (tuple, list)) else (vals,)
        if node.op == "call_function" and any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in vals):
            bad.append(str(node.target))
    return bad


def test_no_float_tensor_inside_integer_ops():
    x = _int(torch.randn(2, 8, 64))
    x8 = I.int_requant(*x, [-1], 8, True)
    w = (torch.randint(-127, 128, (64, 32), dtype=torch.int8), torch.zeros(1, 1, dtype=torch.int64),
         *I.const(torch.rand(1, 32) + 0.1))
    wm, we = I.const(torch.rand(64) + 0.5)
    eps = [int(v) for v in I.const(1e-6)]
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    consts = I.softmax_consts(0.125)  # offline constants, computed before tracing
    scores = I.di_matmul(*x8, *tuple(t.transpose(-2, -1) for t in x8))
    cases = {
        "int_requant": (lambda *a: I.int_requant(*a, [-1], 8, True), x),
        "di_matmul": (lambda *a: I.di_matmul(*a), (*x8, *w)),
        "di_add": (lambda *a: I.di_add(*a), (*x, *x8)),
        "di_mul": (lambda *a: I.di_mul(*a), (*x8, *x8)),
        "di_softmax": (lambda *a: I.di_softmax(*a, mask, *consts), scores),
        "di_rmsnorm": (lambda *a: I.di_rmsnorm(*a, wm, we, *eps), x),
        "di_layernorm": (lambda *a: I.di_layernorm(*a, wm, we, wm, we, *eps), x),
        "di_silu": (lambda *a: I.di_silu(*a, *I.SILU_CONST), x8),
        "di_gelu": (lambda *a: I.di_gelu(*a), x8),
        "di_swiglu": (lambda *a: I.di_swiglu(a[:4], a[4:]), (*x8, *x8)),
    }
    for name, (fn, args) in cases.items():
        assert _float_nodes(fn, *args) == [], name
    # the check itself sees floats: the boundary ops have them
    assert _float_nodes(lambda *a: I.int_dequantize(*a, torch.float32), *x)
    assert _float_nodes(lambda t: I.int_quantize(t, [-1], 8, True), torch.randn(4, 8))
