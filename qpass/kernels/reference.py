"""Exact references for the kernels: integer accumulation in int64, scaling in float64."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_FBGEMM_SMALL_SCALE = float(torch.tensor(6.1e-5, dtype=torch.float32))


def _f64(v: Tensor | float | int) -> Tensor:
    return torch.as_tensor(v).to(torch.float64)


def reference_int_linear(
    xq_int: Tensor,
    x_zp: Tensor | int,
    wq_int: Tensor,
    x_scale: Tensor | float = 1.0,
    w_scale: Tensor | float = 1.0,
    bias: Optional[Tensor] = None,
    w_zp: Tensor | int = 0,
) -> Tensor:
    """``((xq - x_zp) @ (wq - w_zp).T) * x_scale * w_scale + bias`` in float64.

    ``xq_int``: integer ``(..., K)``; ``wq_int``: integer ``(N, K)``; ``x_scale``: scalar or
    broadcastable to ``(..., 1)`` (per token); ``w_scale`` / ``w_zp``: scalar or ``(N,)``.
    The integer product is computed exactly in int64.
    """
    acc = (xq_int.to(torch.int64) - torch.as_tensor(x_zp, dtype=torch.int64)) @ (
        wq_int.to(torch.int64) - torch.as_tensor(w_zp, dtype=torch.int64)
    ).T
    out = acc.to(torch.float64) * _f64(x_scale) * _f64(w_scale)
    if bias is not None:
        out = out + _f64(bias)
    return out


def fbgemm_act_qparams(x: Tensor, reduce_range: bool) -> tuple[float, int]:
    """The per-tensor ``(scale, zero_point)`` FBGEMM's dynamic linear picks for ``x``.

    Mirrors ``quant_utils::ChooseQuantizationParams`` (qmin 0, qmax 255, halved with
    ``reduce_range``); the scale is returned rounded to float32 as FBGEMM uses it.
    """
    qmin, qmax = (0, 127) if reduce_range else (0, 255)
    xmin = min(float(x.min()), 0.0) if x.numel() else 0.0
    xmax = max(float(x.max()), 0.0) if x.numel() else 0.0
    scale = (xmax - xmin) / (qmax - qmin)
    scale32 = float(torch.tensor(scale, dtype=torch.float32))
    if scale32 == 0.0 or math.isinf(1.0 / scale32):
        scale = 0.1
    if scale < _FBGEMM_SMALL_SCALE:
        org = scale
        scale = _FBGEMM_SMALL_SCALE
        if xmin == 0.0:
            xmax = scale * (qmax - qmin)
        elif xmax == 0.0:
            xmin = -scale * (qmax - qmin)
        else:
            xmin, xmax = xmin * scale / org, xmax * scale / org
    zp_min, zp_max = qmin - xmin / scale, qmax - xmax / scale
    err_min = abs(qmin) - abs(xmin / scale)
    err_max = abs(qmax) - abs(xmax / scale)
    zp = zp_min if err_min < err_max else zp_max
    zp_int = qmin if zp < qmin else qmax if zp > qmax else int(round(zp))
    return float(torch.tensor(scale, dtype=torch.float32)), zp_int


def reference_fbgemm_dynamic_linear(
    x: Tensor,
    wq_int: Tensor,
    w_scale: Tensor | float,
    bias: Optional[Tensor] = None,
    reduce_range: bool = True,
) -> Tensor:
    """Emulation of ``quantized::linear_dynamic`` (per-tensor uint8 activations) in float64."""
    scale, zp = fbgemm_act_qparams(x, reduce_range)
    q = torch.clamp(torch.round(x.to(torch.float64) / scale) + zp, 0, 255).to(torch.int64)
    return reference_int_linear(q, zp, wq_int, scale, w_scale, bias)
