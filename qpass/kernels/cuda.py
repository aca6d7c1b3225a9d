"""Generic scaled integer / FP8 matmuls over ``torch._int_mm`` and ``torch._scaled_mm``.

Both run on CUDA (fast) and on CPU (slow, correct reference). They are plain functions made of
aten ops that already have meta implementations, so they trace under FakeTensorMode and
``torch.compile`` without custom ops; the scaling / bias epilogue stays outside the matmul so
Inductor can fuse it.

CUDA shape constraints, met by zero padding (padding contributes exact zeros to the dot
products and is sliced off the result):

* ``torch._int_mm``: ``M > 16``, ``K % 8 == 0``, ``N % 8 == 0`` -> M is padded to 17 when
  smaller, K and N up to multiples of 8;
* ``torch._scaled_mm`` (FP8): ``K % 16 == 0``, ``N % 16 == 0``, ``x`` row-major, ``w_t``
  column-major -> K and N padded to multiples of 16, rowwise scales padded with ones; a
  row-major ``w_t`` is made column-major. Rowwise scaling on CUDA generally wants
  ``out_dtype=torch.bfloat16`` and compute capability 9.0 (8.9 supports tensorwise).

``pad=None`` pads only on CUDA; ``pad=True`` forces the CUDA padding anywhere (the lowering for a
CUDA target, so that the same graph runs on CPU tensors in tests). Sizes are read from the operands
at run time; a symbolic M (a graph traced with dynamic shapes) is padded by 17 rows whatever its value,
so that the graph serves every M without a guard on it.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

INT_MM_MIN_M = 17
INT_MM_ALIGN = 8
FP8_ALIGN = 16


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _is_col_major(t: Tensor) -> bool:
    return t.dim() == 2 and t.stride(0) == 1 and (t.stride(1) >= t.size(0) or t.size(1) == 1)


def _pad2d(t: Tensor, rows: int, cols: int) -> Tensor:
    """Zero-pad a 2-D tensor by ``rows`` rows and ``cols`` columns, keeping column-major inputs
    column-major. Concatenates zeros: ``F.pad`` on a tensor of symbolic shape specializes it."""
    if rows == cols == 0:
        return t
    if _is_col_major(t) and not t.is_contiguous():
        return _pad2d(t.t(), cols, rows).t()
    fp8 = t.dtype.is_floating_point and t.element_size() == 1
    raw = t.view(torch.uint8) if fp8 else t  # float8: pad the raw bytes (0x00 is +0.0 in every format)
    if cols:
        raw = torch.cat([raw, raw.new_zeros((raw.shape[0], cols))], dim=1)
    if rows:
        raw = torch.cat([raw, raw.new_zeros((rows, raw.shape[1]))])
    return raw.view(t.dtype) if fp8 else raw


def _scale_2d(scale: Tensor | float, shape: tuple[int, int], device: torch.device) -> Tensor:
    """float32 scale broadcastable to ``shape`` (scalar stays scalar-shaped)."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=device)
    if s.numel() == 1:
        return s.reshape(())
    return s.to(torch.float32).reshape(shape)


def int8_scaled_mm(
    x_i8: Tensor,
    w_i8_t: Tensor,
    x_scale: Tensor | float,
    w_scale: Tensor | float,
    bias: Optional[Tensor] = None,
    out_dtype: torch.dtype = torch.float32,
    pad: Optional[bool] = None,
) -> Tensor:
    """``(x_i8 @ w_i8_t) * x_scale * w_scale + bias`` with an int32 accumulator.

    ``x_i8``: int8 ``(M, K)``; ``w_i8_t``: int8 ``(K, N)`` (e.g. ``w.t()`` of an ``(N, K)``
    weight); ``x_scale``: scalar or ``(M, 1)``; ``w_scale``: scalar or ``(1, N)`` / ``(N,)``.
    """
    if x_i8.dim() != 2 or w_i8_t.dim() != 2:
        raise ValueError("int8_scaled_mm expects 2-D operands")
    m, k = x_i8.shape
    k2, n = w_i8_t.shape
    if k != k2:
        raise ValueError(f"inner dimensions differ: {k} vs {k2}")
    if pad is None:
        pad = x_i8.is_cuda
    if pad:
        # A symbolic M (dynamic shapes) gets 17 zero rows whatever its value: any M-dependent amount
        # (max(17, M) - M) makes the tracer guard on M and recompile for every M.
        extra_m = max(INT_MM_MIN_M - m, 0) if isinstance(m, int) else INT_MM_MIN_M
        kp, np_ = _round_up(k, INT_MM_ALIGN), _round_up(n, INT_MM_ALIGN)
        acc = torch._int_mm(_pad2d(x_i8, extra_m, kp - k), _pad2d(w_i8_t, kp - k, np_ - n))
        if extra_m:
            acc = acc.narrow(0, 0, m)
        if np_ != n:
            acc = acc.narrow(1, 0, n)
    else:
        acc = torch._int_mm(x_i8, w_i8_t)
    y = acc.to(torch.float32) * _scale_2d(x_scale, (m, 1), acc.device)
    y = y * _scale_2d(w_scale, (1, n), acc.device)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def fp8_scaled_mm(
    x_fp8: Tensor,
    w_fp8_t: Tensor,
    x_scale: Tensor | float,
    w_scale: Tensor | float,
    bias: Optional[Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    pad: Optional[bool] = None,
    use_fast_accum: bool = False,
) -> Tensor:
    """``(x_fp8 @ w_fp8_t) * x_scale * w_scale + bias`` via ``torch._scaled_mm``.

    ``x_fp8``: float8 ``(M, K)``; ``w_fp8_t``: float8 ``(K, N)``, ideally column-major (``w.t()``
    of a contiguous ``(N, K)`` weight); scales float32, both scalars (tensorwise) or
    ``x_scale (M, 1)`` and ``w_scale (1, N)`` (rowwise; a scalar is expanded when the other is
    rowwise). The bias is added after the matmul, in ``out_dtype``.
    """
    if x_fp8.dim() != 2 or w_fp8_t.dim() != 2:
        raise ValueError("fp8_scaled_mm expects 2-D operands")
    m, k = x_fp8.shape
    k2, n = w_fp8_t.shape
    if k != k2:
        raise ValueError(f"inner dimensions differ: {k} vs {k2}")
    dev = x_fp8.device
    sx = torch.as_tensor(x_scale, dtype=torch.float32, device=dev)
    sw = torch.as_tensor(w_scale, dtype=torch.float32, device=dev)
    rowwise = sx.numel() != 1 or sw.numel() != 1
    if rowwise:
        sx = sx.reshape(-1, 1).expand(m, 1) if sx.numel() == 1 else sx.reshape(m, 1)
        sw = sw.reshape(1, -1).expand(1, n) if sw.numel() == 1 else sw.reshape(1, n)
        sx, sw = sx.contiguous(), sw.contiguous()
    else:
        sx, sw = sx.reshape(()), sw.reshape(())
    if pad is None:
        pad = x_fp8.is_cuda
    kp, np_ = k, n
    xx, ww = x_fp8, w_fp8_t
    if pad:
        kp, np_ = _round_up(k, FP8_ALIGN), _round_up(n, FP8_ALIGN)
        xx = _pad2d(x_fp8.contiguous(), 0, kp - k)
        if not _is_col_major(ww):
            ww = ww.t().contiguous().t()
        ww = _pad2d(ww, kp - k, np_ - n)
        if rowwise and np_ != n:
            sw = F.pad(sw, (0, np_ - n), value=1.0)
    y = torch._scaled_mm(xx, ww, sx, sw, out_dtype=out_dtype, use_fast_accum=use_fast_accum)
    if np_ != n:
        y = y.narrow(1, 0, n)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y
