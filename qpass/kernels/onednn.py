"""oneDNN INT8 linear on x86 CPUs: ``qpass::onednn_qlinear``.

The op wraps ``onednn::qlinear_pointwise`` with float32 output. Constraints measured on an
AVX2 CPU without VNNI (see :mod:`qpass.kernels.quant`):

* activations must be uint8 with values in ``[0, 127]`` (use the 7-bit quantizers, zero point
  64), or full-range uint8 with weights in ``[-63, 63]`` (what the lowering pass uses: the
  activations carry the outliers, so they keep the 8th bit); full-range uint8 with full-range int8
  weights saturates int16 pair sums inside oneDNN and gives wrong results, signed int8
  activations are wrong too;
* ``qlinear_pointwise`` takes ONE activation scale / zero point. Per-token dynamic quantization
  therefore quantizes each row with its own scale but the common zero point 64, calls the op
  with ``x_scale=1.0, x_zp=64`` and multiplies the float output by the per-token scale
  afterwards. :func:`onednn_dynamic_linear` does exactly that, keeping quantization and rescale
  as ordinary aten ops outside the custom op so Inductor fuses them;
* the weight must be packed by :func:`pack_onednn_int8` (an mkldnn-layout tensor of logical
  shape ``(K, N)``); a plain tensor passed to ``qlinear_pointwise`` crashes the process, so the
  op checks ``is_mkldnn`` first;
* ``onednn::qlinear_prepack`` has no fake implementation and the packed weight has a
  non-strided (``torch._mkldnn``) layout, so the op carries ``torch.Tag.flexible_layout`` so that
  Inductor never inserts a layout-fixing copy of it. (With torch 2.13 the untagged op also
  compiled in every setting tried: closure constant, module buffer, freezing, dynamic shapes,
  get_attr of a fresh root module; the tag is kept as a safeguard.)
* Pack outside the graph: the packed weight is a constant (closure, buffer or get_attr).
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._lib import cpu_op
from .quant import U7_ZERO_POINT, quantize_act_u7_per_tensor, quantize_act_u7_per_token

logger = logging.getLogger(__name__)


class OnednnInt8Weight(NamedTuple):
    """A packed oneDNN weight and its float32 per-output-channel scales ``(N,)``."""

    packed: Tensor
    scales: Tensor


def pack_onednn_int8(w_int8: Tensor, w_scales: Tensor | float) -> OnednnInt8Weight:
    """Pack an ``(N, K)`` int8 weight for :func:`onednn_qlinear`.

    ``w_scales`` is ``(N,)`` (per output channel) or a scalar (broadcast to ``(N,)``). The
    weight values may use the full int8 range ``[-128, 127]``.
    """
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise ValueError(
            f"expected a 2-D int8 (N, K) weight, got {w_int8.dtype} {tuple(w_int8.shape)}"
        )
    n, k = w_int8.shape
    scales = torch.as_tensor(w_scales, dtype=torch.float32).detach().reshape(-1)
    if scales.numel() == 1:
        scales = scales.expand(n)
    if scales.numel() != n:
        raise ValueError(f"w_scales has {scales.numel()} elements, expected {n}")
    # qlinear_prepack takes the (N, K) weight as is; x_shape=None keeps it valid for every M.
    packed = torch.ops.onednn.qlinear_prepack(w_int8.detach().contiguous().cpu(), None)
    logger.debug("packed oneDNN int8 weight N=%d K=%d", n, k)
    return OnednnInt8Weight(packed, scales.contiguous().clone())


_QLINEAR = torch.ops.onednn.qlinear_pointwise.default


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _onednn_qlinear_fake(
    x_u8: Tensor,
    x_scale: float,
    x_zp: int,
    packed_w: Tensor,
    w_scales: Tensor,
    bias: Optional[Tensor],
) -> Tensor:
    n = w_scales.shape[0]
    return x_u8.new_empty((*x_u8.shape[:-1], n), dtype=torch.float32)


@cpu_op(
    "onednn_qlinear",
    "(Tensor x_u8, float x_scale, int x_zp, Tensor packed_w, Tensor w_scales, Tensor? bias) -> Tensor",
    fake=_onednn_qlinear_fake,
    tags=(torch.Tag.flexible_layout,),
    keys=("CPU", "MkldnnCPU"),  # the packed weight dispatches as MkldnnCPU
)
def onednn_qlinear(
    x_u8: Tensor,
    x_scale: float,
    x_zp: int,
    packed_w: Tensor,
    w_scales: Tensor,
    bias: Optional[Tensor],
) -> Tensor:
    """``(x_u8 - x_zp) * x_scale @ (w_int8 * w_scales[:, None]).T + bias`` in float32.

    ``x_u8``: uint8 ``(..., K)`` with values in ``[0, 127]``; ``packed_w`` from
    :func:`pack_onednn_int8`; ``w_scales`` float32 ``(N,)``; ``bias`` ``(N,)`` or None.
    Returns float32 ``(..., N)``.
    """
    if not packed_w.is_mkldnn:
        # An unpacked weight makes qlinear_pointwise crash the process: refuse it here.
        raise ValueError("qpass::onednn_qlinear needs a weight packed by pack_onednn_int8")
    if x_u8.dtype != torch.uint8:
        raise ValueError(f"qpass::onednn_qlinear expects uint8 activations, got {x_u8.dtype}")
    k, n = packed_w.shape
    if x_u8.shape[-1] != k:
        raise ValueError(f"activation has K={x_u8.shape[-1]}, packed weight has K={k}")
    if w_scales.numel() != n:
        raise ValueError(f"w_scales has {w_scales.numel()} elements, expected N={n}")
    lead = x_u8.shape[:-1]
    x2 = x_u8.reshape(-1, k).contiguous()
    if x2.shape[0] == 0:
        return x_u8.new_zeros((*lead, n), dtype=torch.float32)
    b = None if bias is None else _f32(bias)
    out = _QLINEAR(
        x2,
        float(x_scale),
        int(x_zp),
        packed_w,
        _f32(w_scales),
        None,  # weight zero points: symmetric
        b,
        1.0,  # output scale
        0,  # output zero point
        torch.float32,
        "none",
        [],
        "",
    )
    return out.reshape(*lead, n)


def onednn_dynamic_linear(
    x: Tensor,
    packed_w: Tensor,
    w_scales: Tensor,
    bias: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """W8A8 linear with dynamic per-token 7-bit activations (quantize + rescale as aten ops).

    Output dtype is ``out_dtype`` or ``x.dtype``.
    """
    x_u8, scale = quantize_act_u7_per_token(x)
    y = onednn_qlinear(x_u8, 1.0, U7_ZERO_POINT, packed_w, w_scales, None)
    y = y * scale
    if bias is not None:
        y = y + bias
    return y.to(out_dtype or x.dtype)


def onednn_static_linear(
    x: Tensor,
    x_scale: float,
    packed_w: Tensor,
    w_scales: Tensor,
    bias: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """W8A8 linear with a static per-tensor 7-bit activation scale (bias added inside oneDNN)."""
    x_u8 = quantize_act_u7_per_tensor(x, x_scale)
    y = onednn_qlinear(
        x_u8, float(x_scale), U7_ZERO_POINT, packed_w, w_scales, bias
    )
    return y.to(out_dtype or x.dtype)
