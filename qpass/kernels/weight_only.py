"""Weight-only CPU kernels: ATen's int8 and int4 weight-packed matmuls.

* ``aten._weight_int8pack_mm(x (M, K), w_int8 (N, K), scales (N,))`` = ``x @ (w_int8 * scales[:, None]).T``;
* ``aten._weight_int4pack_mm_for_cpu(x (M, K), packed, group_size, scales_and_zeros (K / G, N, 2))``
  with ``packed = aten._convert_weight_to_int4pack_for_cpu(q (N, K) int32 in [0, 15], inner_k_tiles)``
  and, per group ``g`` of ``group_size`` input channels, ``w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]``.

Both take 2-D activations, and scales in the activations' dtype. Measured on the project's CPUs
(torch 2.13, M=1): fast with bf16 activations only (576 x 1536, 2 threads: int8 14 us, int4 95 us
against 201 us for an fp32 ``F.linear``); with fp32 or fp16 activations 10-80x slower than an fp32
``F.linear``. What each accepts (probed; outside it they raise, or the int8 kernel crashes the process):

* int8: ``K % 16 == 0`` (AVX-512: K = 8, 24, 33, 40, 100 crashed the process with a segmentation
  fault; the AVX2 kernel took them);
* int4: ``N % 16 == 0`` ("expect N to be dividable by 16") and ``group_size`` in 32, 64, 128, 256.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["INT4_GROUP_SIZES", "WEIGHT_ONLY_DTYPES", "int8_refusal", "int4_refusal", "pack_int4"]

#: The group sizes ``_weight_int4pack_mm_for_cpu`` takes.
INT4_GROUP_SIZES = (32, 64, 128, 256)
#: Activation dtypes on which these kernels beat a float linear.
WEIGHT_ONLY_DTYPES = (torch.bfloat16,)
#: ``_convert_weight_to_int4pack_for_cpu``'s inner_k_tiles (the CPU packing gives the same bytes for 1..8).
_INNER_K_TILES = 2


def int8_refusal(n: int, k: int) -> str | None:
    """Why ``_weight_int8pack_mm`` cannot take an (N, K) weight, or None."""
    if k % 16:
        return f"int8 weight-only kernel needs K divisible by 16 (K={k}); it crashed the process on AVX-512 otherwise"
    return None


def int4_refusal(n: int, k: int, group_size: int) -> str | None:
    """Why ``_weight_int4pack_mm_for_cpu`` cannot take an (N, K) weight in groups of ``group_size``, or None."""
    if group_size not in INT4_GROUP_SIZES:
        sizes = ", ".join(map(str, INT4_GROUP_SIZES))
        got = f"groups of {group_size}" if group_size else "no groups"
        return f"int4 weight-only kernel needs groups of {sizes} input channels ({got})"
    if n % 16:
        return f"int4 weight-only kernel needs N divisible by 16 (N={n})"
    if k % group_size:
        return f"int4 weight-only kernel needs K divisible by the group size (K={k}, group {group_size})"
    return None


def pack_int4(q: Tensor, scale: Tensor, zero_point: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(packed, scales_and_zeros)`` for ``_weight_int4pack_mm_for_cpu`` from qpass's int4 weight:
    ``q`` (N, K) in [-8, 7] (int8 storage), ``scale`` and ``zero_point`` (N, K / G), dequantized as
    ``(q - zero_point) * scale``. The kernel's ``(q' - 8) * scale + zero`` with ``q' = q + 8`` is
    that with ``zero = -zero_point * scale`` (0 when symmetric); scales and zeros in ``dtype``, the
    activations' dtype, as the kernel requires."""
    if q.dim() != 2 or scale.dim() != 2 or scale.shape[0] != q.shape[0]:
        raise ValueError(f"pack_int4: expected q (N, K) and scale (N, K / G), got {tuple(q.shape)} and {tuple(scale.shape)}")
    if int(q.min()) < -8 or int(q.max()) > 7:
        raise ValueError("pack_int4: int4 values must lie in [-8, 7]")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), _INNER_K_TILES)
    s = scale.double()
    zero = torch.zeros_like(s) if zero_point is None else -zero_point.double() * s
    scales_and_zeros = torch.stack([s.t(), zero.t()], dim=-1).to(dtype).contiguous()  # (K / G, N, 2)
    return packed, scales_and_zeros

