"""Quantizers written as plain aten ops, so Inductor can fuse them with their neighbours.

Activations for the oneDNN path are *7-bit* symmetric, stored as uint8 with zero point 64::

    q = clamp(round(x / scale), -63, 63) + 64        # uint8 in [1, 127]

7 bits because, on CPUs without VNNI, the u8 x s8 kernels sum pairs of products in int16 with
saturation (``vpmaddubsw``); raw uint8 values <= 127 times int8 weights never saturate
(2 * 127 * 128 = 32512 < 32767), so the 7-bit path is exact everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

U7_ZERO_POINT: int = 64
U7_QMAX: int = 63
INT8_QMAX: int = 127
# Scales below this are clamped, so all-zero rows quantize to the zero point instead of NaN.
SCALE_EPS: float = 1e-12


def quantize_act_u7_per_token(x: Tensor, eps: float = SCALE_EPS) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric 7-bit quantization, one scale per row (token) of the last dim.

    Returns ``(x_u8, scale)``: ``x_u8`` uint8 of ``x.shape`` in ``[1, 127]`` (zero point 64) and
    ``scale`` float32 of shape ``x.shape[:-1] + (1,)`` with ``x ~= (x_u8 - 64) * scale``.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=eps) / U7_QMAX
    q = torch.clamp(torch.round(xf / scale), -U7_QMAX, U7_QMAX) + U7_ZERO_POINT
    return q.to(torch.uint8), scale


def quantize_act_u7_per_tensor(x: Tensor, scale: float | Tensor) -> Tensor:
    """Static symmetric 7-bit quantization with a scalar scale: uint8 in ``[1, 127]``, zp 64."""
    q = torch.clamp(torch.round(x.float() / scale), -U7_QMAX, U7_QMAX) + U7_ZERO_POINT
    return q.to(torch.uint8)


def dequantize_act_u7(x_u8: Tensor, scale: float | Tensor) -> Tensor:
    """Inverse of the u7 quantizers: ``(x_u8 - 64) * scale`` in float32."""
    return (x_u8.to(torch.int16) - U7_ZERO_POINT).float() * scale


def quantize_weight_int8_per_channel(
    w: Tensor, qmax: int = INT8_QMAX, eps: float = SCALE_EPS
) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 quantization of an ``(N, K)`` weight.

    Returns ``(w_int8 (N, K) in [-qmax, qmax], scales float32 (N,))`` with
    ``w ~= w_int8 * scales[:, None]``.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D (N, K) weight, got shape {tuple(w.shape)}")
    wf = w.float()
    scales = wf.abs().amax(dim=1).clamp(min=eps) / qmax
    w_int8 = torch.clamp(torch.round(wf / scales[:, None]), -qmax, qmax).to(torch.int8)
    return w_int8, scales
