"""INT8 grouped matmuls for fused mixture-of-experts weights.

Rows of the activation are sorted by expert; ``offs[e]`` is the end of expert ``e``'s segment (as
transformers' grouped matmul takes it). Each op reads ``offs`` once and runs one GEMM per non-empty
segment; rows past ``offs[-1]`` give zeros, like the grouped matmul they replace. The caller applies
the scales as aten ops, which Inductor fuses with what follows.

* ``qpass::onednn_grouped_qlinear``: each expert's ``(N, K)`` int8 weight packed once by
  :func:`~qpass.kernels.onednn.pack_onednn_int8`, ``onednn::qlinear_pointwise`` at unit activation
  scale on uint8 rows. The same int16-saturation rules as the dense op apply (see
  :mod:`qpass.kernels.onednn`): the lowering picks the grid.
* ``qpass::grouped_int_mm``: ``torch._int_mm`` on the reference's own int8 integers and each
  expert's plain int8 weight (nothing packed), int32 out: on CPUs where its probe finds it exact
  (VNNI / AMX) and on CUDA (padded to its shape rules).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._lib import cpu_op
from .cuda import INT_MM_ALIGN, INT_MM_MIN_M

_QLINEAR = torch.ops.onednn.qlinear_pointwise.default


def _fake(x_u8: Tensor, offs: Tensor, packed_w: list[Tensor], w_scales: Tensor, x_zp: int) -> Tensor:
    torch._check(offs.shape[0] == len(packed_w))
    return x_u8.new_empty((x_u8.shape[0], w_scales.shape[1]), dtype=torch.float32)


@cpu_op(
    "onednn_grouped_qlinear",
    "(Tensor x_u8, Tensor offs, Tensor[] packed_w, Tensor w_scales, int x_zp) -> Tensor",
    fake=_fake,
    tags=(torch.Tag.flexible_layout,),
    keys=("CPU", "MkldnnCPU"),  # the packed weights dispatch as MkldnnCPU
)
def onednn_grouped_qlinear(x_u8: Tensor, offs: Tensor, packed_w: list[Tensor], w_scales: Tensor, x_zp: int) -> Tensor:
    """``y[r] = (x_u8[r] - x_zp) @ (W_e * w_scales[e][:, None]).T`` in float32 for each row ``r`` of
    expert ``e``'s segment ``offs[e-1] <= r < offs[e]``.

    ``x_u8``: uint8 ``(rows, K)``; ``offs``: ``(E,)`` int32/int64 segment ends; ``packed_w``: ``E``
    weights from :func:`~qpass.kernels.onednn.pack_onednn_int8`; ``w_scales``: float32 ``(E, N)``.
    Returns float32 ``(rows, N)``.
    """
    if x_u8.dtype != torch.uint8 or x_u8.dim() != 2:
        raise ValueError(f"qpass::onednn_grouped_qlinear expects 2-D uint8 activations, got {x_u8.dtype} "
                         f"{tuple(x_u8.shape)}")
    experts, n = w_scales.shape
    if offs.shape != (experts,) or len(packed_w) != experts:
        raise ValueError(f"{len(packed_w)} packed weights and offs of shape {tuple(offs.shape)} for {experts} experts")
    if not all(w.is_mkldnn for w in packed_w):
        # An unpacked weight makes qlinear_pointwise crash the process: refuse it here.
        raise ValueError("qpass::onednn_grouped_qlinear needs weights packed by pack_onednn_int8")
    k = x_u8.shape[1]
    out = x_u8.new_zeros((x_u8.shape[0], n), dtype=torch.float32)
    x = x_u8.contiguous()
    scales = w_scales.to(torch.float32).contiguous()
    start = 0
    for e, end in enumerate(offs.tolist()):  # one read of the segment ends
        end = min(end, x.shape[0])
        if end <= start:
            continue
        if packed_w[e].shape[0] != k:
            raise ValueError(f"activation has K={k}, expert {e}'s packed weight has K={packed_w[e].shape[0]}")
        out[start:end] = _QLINEAR(x[start:end], 1.0, int(x_zp), packed_w[e], scales[e], None, None,
                                  1.0, 0, torch.float32, "none", [], "")
        start = end
    return out


def _grouped_int_mm_fake(x_i8: Tensor, offs: Tensor, w_i8: Tensor, pad: bool) -> Tensor:
    torch._check(offs.shape[0] == w_i8.shape[0])
    torch._check(w_i8.shape[2] >= x_i8.shape[1])
    return x_i8.new_empty((x_i8.shape[0], w_i8.shape[1]), dtype=torch.int32)


@cpu_op(
    "grouped_int_mm",
    "(Tensor x_i8, Tensor offs, Tensor w_i8, bool pad) -> Tensor",
    fake=_grouped_int_mm_fake,
    keys=("CPU", "CUDA"),
)
def grouped_int_mm(x_i8: Tensor, offs: Tensor, w_i8: Tensor, pad: bool) -> Tensor:
    """``acc[r] = x_i8[r] @ w_i8[e].T`` in int32 for each row ``r`` of expert ``e``'s segment
    ``offs[e-1] <= r < offs[e]``: one ``torch._int_mm`` per expert with rows, the int32 dot products
    only (the caller applies the scales as aten ops, which Inductor fuses). Rows past ``offs[-1]``
    give zeros, like the grouped matmul it replaces.

    ``x_i8``: int8 ``(rows, K)``; ``offs``: ``(E,)`` int32/int64 segment ends; ``w_i8``: int8
    ``(E, N, K')`` with ``K' >= K`` (columns past K are zero: the CUDA padding), each expert's
    ``(N, K')`` row-major, read as the column-major ``(K', N)`` operand ``_int_mm`` wants. Returns
    int32 ``(rows, N)``.

    ``pad``: CUDA's ``_int_mm`` shape rules (M > 16, K and N multiples of 8): the activation's
    columns are zero-padded to K' (the lowering pads the weight once, N and K' to multiples of 8) and
    a segment of fewer than 17 rows runs as 17 rows, zeros below. True on a CUDA target, also when
    the graph runs on CPU tensors (tests).
    """
    if x_i8.dtype != torch.int8 or x_i8.dim() != 2 or w_i8.dtype != torch.int8 or w_i8.dim() != 3:
        raise ValueError(f"qpass::grouped_int_mm expects 2-D int8 activations and 3-D int8 weights, got "
                         f"{x_i8.dtype} {tuple(x_i8.shape)} and {w_i8.dtype} {tuple(w_i8.shape)}")
    experts, n, k_w = w_i8.shape
    rows, k = x_i8.shape
    if offs.shape != (experts,):
        raise ValueError(f"offs of shape {tuple(offs.shape)} for {experts} experts")
    if k_w < k:
        raise ValueError(f"activation has K={k}, the expert weights K={k_w}")
    if pad and (n % INT_MM_ALIGN or k_w % INT_MM_ALIGN):
        raise ValueError(f"padded expert weights must have N and K multiples of {INT_MM_ALIGN}, got {tuple(w_i8.shape)}")
    x = x_i8.contiguous()
    if k_w != k:
        x = torch.cat([x, x.new_zeros((rows, k_w - k))], dim=1)
    out = x.new_zeros((rows, n), dtype=torch.int32)
    start = 0
    for e, end in enumerate(offs.tolist()):  # one read of the segment ends
        end = min(end, rows)
        if end <= start:
            continue
        m = end - start
        seg = x[start:end]
        if pad and m < INT_MM_MIN_M:
            acc = torch._int_mm(torch.cat([seg, seg.new_zeros((INT_MM_MIN_M - m, k_w))]), w_i8[e].t())
            out[start:end] = acc[:m]
        else:
            if m == 1:
                # torch 2.13's CPU _int_mm reads a (1, K) operand's row stride as its leading dimension,
                # and a size-1 dim may carry any stride (Inductor gives 0): set it.
                seg = seg.as_strided((1, k_w), (k_w, 1))
            torch._int_mm(seg, w_i8[e].t(), out=out[start:end])
        start = end
    return out
