"""Reference quantize / dequantize ops, visible by name in the rewritten graph.

They are ``torch.library`` ops with a ``CompositeImplicitAutograd`` kernel: the
FX graph shows ``qpass.quantize`` / ``qpass.dequantize`` nodes, and when Inductor
traces the graph they decompose into plain aten ops that it fuses, on CPU and CUDA.
The lowering pass pattern-matches them into real low-precision kernels.

Semantics (``zp`` = zero point, all scales > 0)::

    quantize(x, scale, zp, qmin, qmax, dtype)   = clamp(round(x / scale) + zp, qmin, qmax).to(dtype)
                                                  (float8: clamp(x / scale, qmin, qmax).to(float8), no rounding)
    dequantize(q, scale, zp, group, out_dtype, group_dim=-1) = ((q - zp) * scale).to(out_dtype)
                                                  (group > 0: each scale column covers ``group`` columns of q;
                                                   group_dim=-2: each scale row covers ``group`` rows of q)
    choose_qparams(x, per_token, symmetric, qmin, qmax) -> (scale, zp)   from x's range at run time
    expert_of_rows(x, offs)                     = e per row r of x with offs[e-1] <= r < offs[e]
                                                  (a grouped matmul's expert segments; int64, (rows,))
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["quantize", "dequantize", "choose_qparams", "expert_of_rows", "META"]

_lib = torch.library.Library("qpass", "FRAGMENT")
_lib.define("quantize(Tensor x, Tensor scale, Tensor? zero_point, float qmin, float qmax, ScalarType dtype) -> Tensor")
_lib.define(
    "dequantize(Tensor q, Tensor scale, Tensor? zero_point, int group_size, ScalarType out_dtype, int group_dim=-1) -> Tensor"
)
_lib.define("choose_qparams(Tensor x, bool per_token, bool symmetric, float qmin, float qmax) -> (Tensor, Tensor)")
_lib.define("expert_of_rows(Tensor x, Tensor offs) -> Tensor")

_EPS = 1e-12


def _is_float8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


@torch.library.impl(_lib, "quantize", "CompositeImplicitAutograd")
def _quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: float, qmax: float, dtype: torch.dtype) -> Tensor:
    y = x.float() / scale
    if _is_float8(dtype):
        return y.clamp(qmin, qmax).to(dtype)
    y = torch.round(y)
    if zero_point is not None:
        y = y + zero_point
    return y.clamp(qmin, qmax).to(dtype)


@torch.library.impl(_lib, "dequantize", "CompositeImplicitAutograd")
def _dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | None, group_size: int, out_dtype: torch.dtype,
                group_dim: int = -1) -> Tensor:
    if group_size > 0 and group_dim == -2:  # groups of rows (per-input-channel groups): the transpose's column groups
        zp = None if zero_point is None else zero_point.transpose(-2, -1)
        return _dequantize(q.transpose(-2, -1), scale.transpose(-2, -1), zp, group_size, out_dtype).transpose(-2, -1)
    if group_size > 0 and group_dim != -1:
        raise ValueError(f"qpass.dequantize: group_dim must be -1 or -2, got {group_dim}")
    y = q.float()
    if group_size > 0:
        shape = q.shape
        y = y.reshape(*shape[:-1], shape[-1] // group_size, group_size)
        if zero_point is not None:
            y = y - zero_point.unsqueeze(-1)
        return (y * scale.unsqueeze(-1)).reshape(shape).to(out_dtype)
    if zero_point is not None:
        y = y - zero_point
    return (y * scale).to(out_dtype)


@torch.library.impl(_lib, "choose_qparams", "CompositeImplicitAutograd")
def _choose_qparams(x: Tensor, per_token: bool, symmetric: bool, qmin: float, qmax: float) -> tuple[Tensor, Tensor]:
    x = x.float()
    if per_token:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:
        lo, hi = x.amin().reshape(1), x.amax().reshape(1)
    return qparams_from_range(lo, hi, symmetric, qmin, qmax)


def qparams_from_range(lo: Tensor, hi: Tensor, symmetric: bool, qmin: float, qmax: float) -> tuple[Tensor, Tensor]:
    """Scale and zero point that map ``[lo, hi]`` (widened to include 0) onto ``[qmin, qmax]``."""
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        return scale.clamp(min=_EPS), torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=_EPS)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


quantize = torch.ops.qpass.quantize.default
dequantize = torch.ops.qpass.dequantize.default
choose_qparams = torch.ops.qpass.choose_qparams.default


@torch.library.impl(_lib, "expert_of_rows", "CompositeImplicitAutograd")
def _expert_of_rows(x: Tensor, offs: Tensor) -> Tensor:
    rows = torch.arange(x.shape[0], device=x.device)
    return torch.searchsorted(offs.long(), rows, right=True).clamp(max=offs.shape[0] - 1)


expert_of_rows = torch.ops.qpass.expert_of_rows.default


# Each op's output from its inputs' metadata alone (shape, dtype, device), for the ``meta['val']`` of
# the nodes the passes insert: under a fake mode this builds one empty tensor instead of running the
# op's decomposition (2-8 fake aten ops: 0.3-1.1 ms a node against 0.1 ms; SmolLM2's two graphs insert
# about 1,500 of them). Same shapes, dtypes and devices as the kernels above (``tests/test_quantize.py``).
def _broadcast(x, scale, zero_point) -> torch.Size:
    return torch.broadcast_shapes(x.shape, scale.shape, *(() if zero_point is None else (zero_point.shape,)))


def _quantize_meta(x, scale, zero_point, qmin, qmax, dtype):
    return x.new_empty(_broadcast(x, scale, zero_point), dtype=dtype)


def _dequantize_meta(q, scale, zero_point, group_size, out_dtype, group_dim=-1):
    return q.new_empty(q.shape if group_size > 0 else _broadcast(q, scale, zero_point), dtype=out_dtype)


def _choose_qparams_meta(x, per_token, symmetric, qmin, qmax):
    shape = (*x.shape[:-1], 1) if per_token else (1,)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


META = {quantize: _quantize_meta, dequantize: _dequantize_meta, choose_qparams: _choose_qparams_meta}
