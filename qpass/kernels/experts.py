"""oneDNN INT8 grouped matmul for fused mixture-of-experts weights: ``qpass::onednn_grouped_qlinear``.

Rows of ``x_u8`` are sorted by expert; ``offs[e]`` is the end of expert ``e``'s segment (as
transformers' grouped matmul takes it). Each expert's ``(N, K)`` int8 weight is packed once by
:func:`~qpass.kernels.onednn.pack_onednn_int8`; at run time the op reads ``offs`` once and runs
``onednn::qlinear_pointwise`` on every non-empty segment, at unit activation scale: the caller
multiplies the output by each row's activation scale (per token, or its expert's static scale) as
an aten op, which Inductor fuses with what follows. Rows past ``offs[-1]`` give zeros, like the
grouped matmul it replaces. The same int16-saturation rules as the dense op apply (see
:mod:`qpass.kernels.onednn`): the lowering picks the grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._lib import cpu_op

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
