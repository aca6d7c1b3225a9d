"""Integer-only operators (I-LLM): matmul, softmax, exp, norms and activations on integers.

Every value between the integer region's input quantization and its output dequantization is an
integer tensor with a dyadic scale, four tensors that broadcast against each other::

    x = (q - zp) * m * 2**e      q: int8 / uint8 / int64, zp: int64 zero point,
                                 m: int64 mantissa (< 2**15; a weight's per-channel
                                 mantissas < 2**25 under one exponent), e: int64 exponent

Per-token scales have shape (..., 1); after a movement op (view, transpose, cat) they are
expanded to q's shape, so every element carries its scale and any view of q stays exact. The ops
use integer add / multiply / floor-divide, shifts, comparisons and reductions only (the dtype flow
is checked in tests/test_intops.py); ``int_quantize`` / ``int_dequantize`` are the two boundary ops
that touch floats. Each is a ``torch.library`` op with a ``CompositeImplicitAutograd`` kernel, so
the FX graph shows ``qpass.di_*`` nodes and Inductor compiles their aten decomposition.

The methods are I-LLM's:

- DI-MatMul: both operands 8-bit per token (asymmetric), int32 accumulation, output scale the
  product of the operands' dyadic scales; ``int_requant`` maps a row onto int8 with a dyadic
  multiplier ``m / 2**k`` (m 8-bit) computed from the row's integer range. ``search_dyadic`` is the
  paper's offline search (m = 256, k upward until the error first rises, then m refined) and turns
  the float constants (attention scale, log2 e) into dyadic numbers when the graph is rewritten.
- DI-Exp: ``e**x = 2**(x log2 e)``; the integer part of ``x log2 e`` is a shift, the fractional part
  ``r`` in (-1, 0] uses ``2**r ~ 1 + r / 2``.
- DI-ClippedSoftmax: row max subtracted, input clipped to ``[max - c, max]`` and quantized to 8 bits
  (c = 15), DI-Exp, integer sum, probabilities as uint8 with a per-row dyadic scale.
- DI-Norm: RMSNorm / LayerNorm with an exact integer square root (bit by bit).
- DI-SiLU / DI-GELU: sigmoid through DI-Exp and one integer division; SwiGLU is DI-SiLU times up.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "M_BITS", "bitlength", "shift", "normalize", "isqrt", "search_dyadic", "dyadic", "exp2_neg",
    "int_quantize", "int_dequantize", "int_requant", "di_matmul", "di_add", "di_mul", "di_exp",
    "di_softmax", "di_rmsnorm", "di_layernorm", "di_silu", "di_gelu", "di_swiglu", "const",
]

M_BITS = 15  # mantissa bits of every carried scale
EXP_BITS = 30  # fixed-point fraction bits of DI-Exp's output
SIG_BITS = 15  # fixed-point fraction bits of the sigmoid
LOG2E = 1.4426950408889634
_I64 = torch.int64


# -- integer helpers (plain tensor code, no float) ------------------------------------------------
def bitlength(x: Tensor) -> Tensor:
    """Bits of each non-negative int64 (0 -> 0, 1 -> 1, 255 -> 8): how many of 2**0 .. 2**62 are <= x,
    by one integer binary search (``bucketize``)."""
    powers = torch.ones(63, dtype=_I64, device=x.device) << torch.arange(63, dtype=_I64, device=x.device)
    return torch.bucketize(x.to(_I64), powers, right=True)


def rshift(x: Tensor, s: Tensor | int) -> Tensor:
    """``x / 2**s`` for ``s >= 0`` (per element), rounding half up."""
    s = torch.as_tensor(s, dtype=_I64, device=x.device).clamp(0, 62)
    return (x + ((torch.ones_like(s) << s) >> 1)) >> s


def shift(x: Tensor, s: Tensor | int) -> Tensor:
    """``x * 2**s`` for integer ``s`` (per element): a left shift, or a right shift rounding half up."""
    s = torch.as_tensor(s, dtype=_I64, device=x.device)
    return rshift(x << s.clamp(0, 62), (-s).clamp(0, 62))


def normalize(m: Tensor, e: Tensor | int, bits: int = M_BITS) -> tuple[Tensor, Tensor]:
    """(m, e) -> the same value ``m * 2**e`` with ``2**(bits-1) <= m < 2**bits`` (m >= 0; 0 stays 0)."""
    m = m.to(_I64)
    s = bitlength(m) - bits
    m2 = shift(m, -s)
    over = m2 >> bits  # rounding up to 2**bits
    return m2 >> over, torch.as_tensor(e, dtype=_I64, device=m.device) + s + over


def div_scale(num: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    """``num / den`` (positive int64) as a dyadic (m, e) with an M_BITS mantissa, by one integer division."""
    n, en = normalize(num, 0, 31)
    d, ed = normalize(den.clamp(min=1), 0, M_BITS)
    return normalize((n << 31) // d, en - ed - 31)


def squeeze(q: Tensor, e: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per row (last dim): shift ``q`` right until ``|q| < 2**bits``, adding the shift to ``e``."""
    big = q.abs().amax(dim=-1, keepdim=True) if q.dim() else q.abs()
    s = (bitlength(big) - bits).clamp(min=0)
    return rshift(q, s), e + s


def isqrt(n: Tensor) -> Tensor:
    """Exact ``floor(sqrt(n))`` of non-negative int64 values, bit by bit (32 steps of compare/subtract)."""
    n = n.to(_I64)
    res = torch.zeros_like(n)
    bit = torch.full_like(n, 1 << 62)
    for _ in range(32):
        take = n >= res + bit
        n = torch.where(take, n - res - bit, n)
        res = torch.where(take, (res >> 1) + bit, res >> 1)
        bit = bit >> 2
    return res


def exp2_neg(z: Tensor, k: Tensor | int, frac_bits: int = EXP_BITS) -> Tensor:
    """DI-Exp's core: ``2**(-z / 2**k) * 2**frac_bits`` for z >= 0, k >= 0 (int64, per element):
    the integer part ``n = z >> k`` is a right shift, the fraction ``r = -(z mod 2**k) / 2**k`` in
    (-1, 0] uses ``2**r ~ 1 + r / 2`` (exact at r = 0 and r = -1, at most 6.1% high in between)."""
    k = torch.as_tensor(k, dtype=_I64, device=z.device)
    n = (z >> k).clamp(max=62)
    f = z - ((z >> k) << k)
    base = (torch.ones_like(f) << (k + 1)) - f  # 2**(k+1) * (1 + r / 2)
    left = (frac_bits - (k + 1)).clamp(min=0)
    return rshift(base << left, n + (k + 1 - frac_bits).clamp(min=0))


# -- dyadic constants (offline, when the graph is rewritten) ---------------------------------------
def search_dyadic(err: Callable[[int, int], float], m_bits: int = 8, k_max: int = 62) -> tuple[int, int, int]:
    """I-LLM's search for a dyadic ``m / 2**k``: with m = 2**m_bits (256), try k = 0, 1, ... and stop
    at the first k whose error is larger than the previous one's (the error is unimodal in k), then
    refine m in [1, 2**m_bits - 1] at that k and at k - 1 (m = 256 itself needs 9 bits; at k - 1 the
    same value fits in 8). Returns (m, k, number of k tried)."""
    m0 = 1 << m_bits
    best_k, prev, tried = 0, math.inf, 0
    for k in range(k_max + 1):
        tried += 1
        cur = err(m0, k)
        if cur > prev:
            break
        best_k, prev = k, cur
    cands = [(err(m, k), -k, m) for k in {max(best_k - 1, 0), best_k} for m in range(1, m0)]
    e, neg_k, m = min(cands)
    return m, -neg_k, tried


def dyadic(value: float, m_bits: int = 8) -> tuple[int, int]:
    """A positive constant as ``m / 2**k`` by ``search_dyadic`` on the relative error."""
    if not value > 0:
        raise ValueError(f"dyadic: needs a positive value, got {value!r}")
    m, k, _ = search_dyadic(lambda m, k: abs(m / 2.0**k - value) / value, m_bits)
    return m, k


def const(value: float | Tensor, bits: int = M_BITS) -> tuple[Tensor, Tensor]:
    """A float constant (or per-channel vector of them, > 0) as (m, e) with ``bits`` of mantissa (offline)."""
    v = torch.as_tensor(value, dtype=torch.float64)
    e = torch.floor(torch.log2(v)).to(_I64) - (bits - 1)
    m = torch.round(v / torch.pow(2.0, e.double())).to(_I64)
    return normalize(m, e, bits)


# -- the ops -----------------------------------------------------------------------------------------
_lib = torch.library.Library("qpass", "FRAGMENT")
_IV = "Tensor q, Tensor zp, Tensor m, Tensor e"
_IV2 = "Tensor qb, Tensor zb, Tensor mb, Tensor eb"
_OUT = "(Tensor, Tensor, Tensor, Tensor)"
for _schema in (
    f"int_quantize(Tensor x, int[] dims, int bits, bool signed) -> {_OUT}",
    f"int_dequantize({_IV}, ScalarType dtype) -> Tensor",
    f"int_requant({_IV}, int[] dims, int bits, bool signed) -> {_OUT}",
    f"di_matmul({_IV}, {_IV2}) -> {_OUT}",
    f"di_add({_IV}, {_IV2}) -> {_OUT}",
    f"di_mul({_IV}, {_IV2}) -> {_OUT}",
    f"di_softmax({_IV}, Tensor? mask, int grid_m, int grid_k, int log2e_m, int log2e_k) -> {_OUT}",
    f"di_rmsnorm({_IV}, Tensor wm, Tensor we, int eps_m, int eps_e) -> {_OUT}",
    f"di_layernorm({_IV}, Tensor wm, Tensor we, Tensor bq, Tensor be, int eps_m, int eps_e) -> {_OUT}",
    f"di_silu({_IV}, int lm, int le) -> {_OUT}",
):
    _lib.define(_schema)


def _impl(name):
    return torch.library.impl(_lib, name, "CompositeImplicitAutograd")


def _zeros(q: Tensor) -> Tensor:
    return torch.zeros((1,) * q.dim(), dtype=_I64, device=q.device)


@_impl("int_quantize")
def _int_quantize(x: Tensor, dims: list[int], bits: int, signed: bool):
    """Boundary (float -> integer): per row over ``dims``, a power-of-two scale giving ``|q| < 2**(bits-1)``
    (``bits`` up to 32, int64 storage, zero point 0). The only float arithmetic of the region's input."""
    x = x.float()
    amax = x.abs().amax(dim=dims, keepdim=True).clamp(min=1e-30)
    e = (torch.floor(torch.log2(amax)) - (bits - 2)).to(_I64)
    q = torch.round(x * torch.pow(2.0, -e.float())).to(_I64)
    return q, _zeros(q), torch.ones_like(e), e


@_impl("int_dequantize")
def _int_dequantize(q: Tensor, zp: Tensor, m: Tensor, e: Tensor, dtype: torch.dtype) -> Tensor:
    """Boundary (integer -> float): ``(q - zp) * m * 2**e``."""
    return ((q.to(_I64) - zp).double() * m.double() * torch.pow(2.0, e.double())).to(dtype)


def _align(q: Tensor, zp: Tensor, m: Tensor, e: Tensor, dims: list[int], bits: int = 40) -> tuple[Tensor, Tensor]:
    """One exponent per row over ``dims``: (A, e_row) with ``x = A * 2**e_row`` and ``|A| < 2**bits``."""
    a, e = squeeze(q.to(_I64) - zp, e.to(_I64), 31)
    a = a * m  # < 2**46
    e = e.expand_as(a)
    e_row = e.amax(dim=dims, keepdim=True)
    a = rshift(a, e_row - e)
    s = (bitlength(a.abs().amax(dim=dims, keepdim=True)) - bits).clamp(min=0)
    return rshift(a, s), e_row + s


def _requant_aligned(a: Tensor, e_row: Tensor, dims: list[int], bits: int, signed: bool):
    """``a * 2**e_row`` (|a| < 2**40) onto ``bits``-bit integers per row: multiplier ``mq / 2**kq``
    (mq ``bits``-bit) from the row's integer range, zero point from its minimum."""
    levels = (1 << bits) - 1
    lo, hi = a.amin(dim=dims, keepdim=True), a.amax(dim=dims, keepdim=True)
    r = (hi - lo).clamp(min=1)
    kq = bitlength(r) - 1
    # (levels - 1) / r as a dyadic with mq below 2**bits; one rounding per element (q - zp = round(a mq / 2**kq)),
    # and round(hi mq) - round(lo mq) <= levels - 1 + 1 keeps q inside [0, levels]
    mq = (torch.full_like(kq, levels - 1) << kq) // r
    zp = -rshift(lo * mq, kq)
    q = (rshift(a * mq, kq) + zp).clamp(0, levels)
    if signed:
        q, zp = q - (1 << (bits - 1)), zp - (1 << (bits - 1))
    m, e = div_scale(torch.ones_like(mq), mq)
    dtype = (torch.int8 if signed else torch.uint8) if bits <= 8 else _I64
    return q.to(dtype), zp, m, e + kq + e_row


@_impl("int_requant")
def _int_requant(q: Tensor, zp: Tensor, m: Tensor, e: Tensor, dims: list[int], bits: int, signed: bool):
    """DI requantization: any integer value -> ``bits``-bit integers with one scale and zero point per
    row over ``dims`` (8-bit: int8 with ``signed``, else uint8)."""
    a, e_row = _align(q, zp, m, e, dims)
    return _requant_aligned(a, e_row, dims, bits, signed)


def _row_of(t: Tensor, dim: int) -> Tensor:
    """A scale constant along ``dim``: its first slice (scales of matmul operands are per row)."""
    return t.narrow(dim, 0, 1) if t.dim() and t.shape[dim] != 1 else t


@_impl("di_matmul")
def _di_matmul(qa, za, ma, ea, qb, zb, mb, eb):
    """DI-MatMul: ``a @ b`` with a's scale constant along its last dim and b's along its second to
    last (per-token a, per-column b; mb < 2**25): int32 accumulation, then b's per-column mantissa
    multiplied into the integers, so the output keeps a's per-row mantissa: ``(acc * mb) * ma *
    2**(ea + eb)`` (with one exponent for all of a weight's columns, the scale stays per row)."""
    acc = torch.matmul(qa.to(torch.int32) - za.to(torch.int32), qb.to(torch.int32) - zb.to(torch.int32))
    out = acc.to(_I64) * _row_of(mb, -2)
    return out, _zeros(out), _row_of(ma, -1).clone(), _row_of(ea, -1) + _row_of(eb, -2)


@_impl("di_add")
def _di_add(qa, za, ma, ea, qb, zb, mb, eb):
    """Integer add with aligned scales: both sides to the larger exponent (per element), m = 1."""
    a, ea = squeeze(qa.to(_I64) - za, ea.to(_I64), 31)
    b, eb = squeeze(qb.to(_I64) - zb, eb.to(_I64), 31)
    a, b = a * ma, b * mb
    e = torch.maximum(ea, eb)
    out = rshift(a, e - ea) + rshift(b, e - eb)
    return out, _zeros(out), torch.ones_like(e), e


@_impl("di_mul")
def _di_mul(qa, za, ma, ea, qb, zb, mb, eb):
    """Integer elementwise product: ``(qa - za) * (qb - zb)``, scale ``ma * mb * 2**(ea + eb)``."""
    a, ea = squeeze(qa.to(_I64) - za, ea.to(_I64), 30)
    b, eb = squeeze(qb.to(_I64) - zb, eb.to(_I64), 30)
    m, e = normalize(ma * mb, ea + eb)
    out = a * b
    return out, _zeros(out), m, e


def di_exp(g: Tensor, step_m: int, step_k: int) -> Tensor:
    """DI-Exp on the clipped 8-bit grid: ``exp(-g * step) * 2**EXP_BITS`` for integers g >= 0, with
    ``step * log2(e) = step_m / 2**step_k`` (a dyadic constant)."""
    return exp2_neg(g.to(_I64) * step_m, step_k)


@_impl("di_softmax")
def _di_softmax(q, zp, m, e, mask, grid_m: int, grid_k: int, log2e_m: int, log2e_k: int):
    """DI-ClippedSoftmax over the last dim. ``grid_m / 2**grid_k`` turns the input's real units into
    steps of the 8-bit clip grid (``attention scale * 255 / c``), ``log2e_m / 2**log2e_k`` is
    ``c / 255 * log2(e)``. ``mask`` (bool, True = attend) drops positions. Output: uint8
    probabilities (the row max is 255) with a dyadic scale per row."""
    a, e_row = _align(q, zp, m, e, [-1])
    if mask is not None:
        a = torch.where(mask, a, torch.full_like(a, -(1 << 62)))
    amax = a.amax(dim=-1, keepdim=True)
    d = (amax - a).clamp(max=1 << 44)
    g = shift(d * grid_m, e_row - grid_k).clamp(0, 255)  # the clipped 8-bit input, 255 = x_max - c
    ex = di_exp(g, log2e_m, log2e_k)
    if mask is not None:
        ex = torch.where(mask, ex, torch.zeros_like(ex))
    total = ex.sum(dim=-1, keepdim=True).clamp(min=1)
    p = rshift(ex * 255, EXP_BITS).clamp(0, 255)
    pm, pe = div_scale(torch.full_like(total, 1 << EXP_BITS), total * 255)
    return p.to(torch.uint8), _zeros(p), pm, pe


def _norm_core(d: Tensor, e_row: Tensor, dims: list[int], eps_m: int, eps_e: int) -> Tensor:
    """``sqrt(mean(d**2) + eps) * 2**8`` in d's units (|d| < 2**15), with an exact integer square root."""
    n = 1
    for dim in dims:
        n *= d.shape[dim]
    ss = (d * d).sum(dim=dims, keepdim=True)
    eps = shift(torch.full_like(e_row, eps_m), (eps_e - 2 * e_row).clamp(max=40))
    ms = (ss + n // 2) // n + eps
    return isqrt(ms << 16).clamp(min=1)


@_impl("di_rmsnorm")
def _di_rmsnorm(q, zp, m, e, wm, we, eps_m: int, eps_e: int):
    """DI-Norm (RMSNorm): ``x / sqrt(mean(x**2) + eps) * w`` over the last dim, with weights ``wm * 2**we``
    per channel; output int8 per token."""
    a, e_row = _align(q, zp, m, e, [-1], bits=15)
    rms = _norm_core(a, e_row, [-1], eps_m, eps_e)
    z = a * wm  # x / rms = a * 2**8 / rms (scale-free)
    sm, se = div_scale(torch.full_like(rms, 1 << 8), rms)
    return _int_requant(z, _zeros(z), sm, se + we, [-1], 8, True)


@_impl("di_layernorm")
def _di_layernorm(q, zp, m, e, wm, we, bq, be, eps_m: int, eps_e: int):
    """DI-Norm (LayerNorm): ``(x - mean) / sqrt(var + eps) * w + b``; w = ``wm * 2**we``, b = ``bq * 2**be``."""
    a, e_row = _align(q, zp, m, e, [-1], bits=14)
    n = a.shape[-1]
    d = a - (a.sum(dim=-1, keepdim=True) + n // 2) // n
    rms = _norm_core(d, e_row, [-1], eps_m, eps_e)
    z = d * wm + shift(bq * rms, be - we - 8)  # b in units of 2**(we + 8) / rms
    sm, se = div_scale(torch.full_like(rms, 1 << 8), rms)
    return _int_requant(z, _zeros(z), sm, se + we, [-1], 8, True)


@_impl("di_silu")
def _di_silu(q, zp, m, e, lm: int, le: int):
    """DI-SiLU ``x * sigmoid(b x)`` with ``b * log2(e) = lm / 2**le`` (SiLU: b = 1; GELU: b = 1.702).
    ``exp(-b|x|)`` by DI-Exp, the sigmoid ``2**F / (2**F + E)`` (or ``E / (2**F + E)``) by one integer
    division (SIG_BITS fraction bits). Output: ``(q - zp) * sigmoid`` with scale ``m * 2**(e - SIG_BITS)``."""
    x = q.to(_I64) - zp
    z = x.abs() * m * lm  # |x| b log2 e = z * 2**(e - le)
    k = le - e.to(_I64)
    z = torch.where(k < 0, shift(z.clamp(max=1 << 40), (-k).clamp(max=22)), z)
    ex = exp2_neg(z, k.clamp(min=0))
    one = torch.full_like(ex, 1 << EXP_BITS)
    sig = torch.where(x >= 0, (one << SIG_BITS) // (one + ex), (ex << SIG_BITS) // (one + ex))
    out = x * sig
    return out, _zeros(out), m.clone(), e - SIG_BITS


int_quantize = torch.ops.qpass.int_quantize.default
int_dequantize = torch.ops.qpass.int_dequantize.default
int_requant = torch.ops.qpass.int_requant.default
di_matmul = torch.ops.qpass.di_matmul.default
di_add = torch.ops.qpass.di_add.default
di_mul = torch.ops.qpass.di_mul.default
di_softmax = torch.ops.qpass.di_softmax.default
di_rmsnorm = torch.ops.qpass.di_rmsnorm.default
di_layernorm = torch.ops.qpass.di_layernorm.default
di_silu = torch.ops.qpass.di_silu.default

def mk(value: float) -> tuple[int, int]:
    """A positive float constant as ``m / 2**k`` with an M_BITS mantissa (offline)."""
    m, e = const(value)
    return int(m), int(-e)


SILU_CONST = mk(LOG2E)  # (m, k): b log2(e) with b = 1
GELU_CONST = mk(1.702 * LOG2E)  # x * sigmoid(1.702 x), GELU's sigmoid approximation


def di_gelu(q, zp, m, e):
    """DI-GELU: ``x * sigmoid(1.702 x)`` through DI-SiLU's integer sigmoid."""
    return di_silu(q, zp, m, e, *GELU_CONST)


def di_swiglu(gate: tuple, up: tuple) -> tuple:
    """DI-SwiGLU: ``silu(gate) * up`` requantized to int8 per token (two integer multiplies)."""
    return int_requant(*di_mul(*di_silu(*gate, *SILU_CONST), *up), [-1], 8, True)


def softmax_consts(scale: float, c: float = 15.0) -> tuple[int, int, int, int]:
    """DI-ClippedSoftmax's dyadic constants for logits times ``scale``, clip ``c``."""
    return (*mk(scale * 255.0 / c), *mk(c / 255.0 * LOG2E))
