"""FBGEMM dynamic-quantized linear behind an integer handle: ``qpass::fbgemm_dynamic_linear``.

``quantized::linear_prepack`` returns a TorchScript object that makes Dynamo graph-break, so
packed weights live in a process-wide registry (handle -> packed params) and the custom op only
receives the integer handle, which Dynamo bakes into the graph as a constant.

What FBGEMM computes (``PackedLinearWeight::apply_dynamic_impl`` in ATen, checked against an
emulation in the tests):

* Weight: the ``int_repr`` of the qint8 tensor given to ``linear_prepack`` is used as is (no
  requantization, ``-128`` allowed); per-tensor or per-channel (axis 0) affine, scales rounded
  to float32. :func:`pack_fbgemm_dynamic` builds a symmetric per-channel qint8 tensor
  (zero points 0); a tensor from ``torch.quantize_per_channel(w, s, zeros, 0, torch.qint8)``
  gives the same packing.
* Activation: quantized per TENSOR (min/max over all rows at once), asymmetric uint8.
  ``min = min(x.min(), 0)``, ``max = max(x.max(), 0)``; ``[qmin, qmax] = [0, 255]``, halved to
  ``[0, 127]`` with ``reduce_range=True``; ``scale = (max - min) / (qmax - qmin)`` (double, then
  float32; 0 or inf-reciprocal -> 0.1; below 6.1e-5 clamped up to 6.1e-5 with min/max widened);
  ``zero_point = round(qmin - min / scale)`` (or from max, whichever has less rounding error),
  clamped to ``[qmin, qmax]``; ``q = clamp(round(x / scale) + zero_point, 0, 255)``.
  Per tensor equals per token only for one token.
* Output: ``scale_x * scale_w[n] * (sum_k (q - zp) * w) + bias`` in float32.
* ``reduce_range=False`` (the default of ``quantized::linear_dynamic``) uses full-range uint8,
  which saturates int16 pair sums on CPUs without VNNI (AVX2) and gives WRONG results there;
  this module therefore packs with ``reduce_range=True`` (7-bit activations, exact) unless told
  otherwise.

Quantized tensors (``torch.qint8``) are deprecated in PyTorch (issue 184982); this path may
disappear in a future release.
"""

from __future__ import annotations

import itertools
import logging
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ._lib import cpu_op
from .quant import quantize_weight_int8_per_channel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FbgemmPacked:
    """A registry entry: FBGEMM packed params plus what the fake implementation needs."""

    packed: torch.ScriptObject
    in_features: int
    out_features: int
    reduce_range: bool


_REGISTRY: dict[int, FbgemmPacked] = {}
_USERS: dict[int, int] = {}  # handle -> how many graphs use it
_Q_DQ_LINEAR = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default
_HANDLES = itertools.count(1)
_LOCK = threading.Lock()


def _make_qint8_per_channel(w_int8: Tensor, scales: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return torch._make_per_channel_quantized_tensor(
            w_int8, scales.to(torch.float64), torch.zeros_like(scales, dtype=torch.int64), 0
        )


#: The quantized engines under which ``quantized::linear_prepack`` packs for FBGEMM.
FBGEMM_ENGINES = ("fbgemm", "x86")


def fbgemm_packs() -> bool:
    """Whether FBGEMM weights can be packed now. Every way to build them (``quantized::linear_prepack``
    in ATen's ``qlinear_prepack.cpp``, the packed params' ``__setstate__`` in ``fbgemm_utils.cpp``)
    dispatches on the process-wide ``torch.backends.quantized.engine``, which qpass never changes,
    not even for a moment (other threads read it). Running packed weights does not read it."""
    return torch.backends.quantized.engine in FBGEMM_ENGINES


def _prepack(qweight: Tensor, bias: Optional[Tensor]) -> torch.ScriptObject:
    if not fbgemm_packs():
        raise RuntimeError(
            f"FBGEMM weights are packed only under torch.backends.quantized.engine 'fbgemm' or 'x86' "
            f"(it is {torch.backends.quantized.engine!r}); qpass does not change the process-wide engine")
    return torch.ops.quantized.linear_prepack(qweight, bias)


def pack_fbgemm_dynamic(
    weight: Tensor,
    w_scales: Tensor | float | None = None,
    bias: Optional[Tensor] = None,
    *,
    reduce_range: bool = True,
) -> int:
    """Pack a weight for :func:`fbgemm_dynamic_linear` and return its registry handle.

    ``weight`` is one of: a float ``(N, K)`` weight (quantized here, symmetric per channel,
    int8 in ``[-127, 127]``); an int8 ``(N, K)`` weight with ``w_scales`` ``(N,)`` or scalar; a
    qint8 quantized tensor (per tensor or per channel on axis 0), used as is. ``bias`` is fused
    into FBGEMM's epilogue. Keep ``reduce_range=True`` on CPUs without VNNI (see module doc).
    Raises RuntimeError unless the quantized engine is ``"fbgemm"`` or ``"x86"`` (:func:`fbgemm_packs`).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (N, K) weight, got shape {tuple(weight.shape)}")
    weight = weight.detach().cpu()
    if weight.is_quantized:
        if weight.dtype != torch.qint8:
            raise ValueError(f"expected a qint8 weight, got {weight.dtype}")
        qweight = weight
    else:
        if weight.dtype == torch.int8:
            if w_scales is None:
                raise ValueError("an int8 weight needs w_scales")
            w_int8 = weight
            scales = torch.as_tensor(w_scales, dtype=torch.float32).reshape(-1)
            if scales.numel() == 1:
                scales = scales.expand(weight.shape[0])
        elif weight.is_floating_point():
            if w_scales is not None:
                raise ValueError("w_scales is only used with an int8 weight")
            w_int8, scales = quantize_weight_int8_per_channel(weight)
        else:
            raise ValueError(f"unsupported weight dtype {weight.dtype}")
        if scales.numel() != weight.shape[0]:
            raise ValueError(f"w_scales has {scales.numel()} elements, expected {weight.shape[0]}")
        qweight = _make_qint8_per_channel(w_int8.contiguous(), scales.contiguous())
    b = None if bias is None else bias.detach().cpu().to(torch.float32).contiguous()
    packed = _prepack(qweight, b)
    n, k = qweight.shape
    with _LOCK:
        handle = next(_HANDLES)
        _REGISTRY[handle] = FbgemmPacked(packed, k, n, reduce_range)
        _USERS[handle] = 1
    logger.debug("packed FBGEMM weight N=%d K=%d as handle %d", n, k, handle)
    return handle


def fbgemm_packed(handle: int) -> FbgemmPacked:
    """The registry entry for ``handle`` (KeyError with a clear message if unknown)."""
    try:
        return _REGISTRY[handle]
    except KeyError:
        raise KeyError(f"no FBGEMM packed weight registered under handle {handle!r}") from None


def retain_fbgemm(handle: int) -> None:
    """One more user of ``handle`` (a second graph sharing the packed weight): the entry stays
    until every user has called :func:`release_fbgemm`. KeyError if it was released already."""
    with _LOCK:
        fbgemm_packed(handle)
        _USERS[handle] += 1


def release_fbgemm(handle: int) -> None:
    """One user of ``handle`` is done with it; the last one drops the packed weight from the
    registry (graphs that still use the handle then fail)."""
    with _LOCK:
        _USERS[handle] = _USERS.get(handle, 1) - 1
        if _USERS[handle] <= 0:
            _USERS.pop(handle)
            _REGISTRY.pop(handle, None)


def fbgemm_registry_bytes() -> int:
    """Bytes of the packed weights the registry holds (outside every graph: count them too)."""
    with _LOCK:
        entries = list(_REGISTRY.values())
    return sum(e.in_features * e.out_features for e in entries)  # one int8 per weight element


# "int handle" (not SymInt): Dynamo specializes on it, so the fake impl can look the entry up.
def _fbgemm_dynamic_linear_fake(x: Tensor, handle: int, bias: Optional[Tensor]) -> Tensor:
    if not isinstance(handle, int):
        raise TypeError("qpass::fbgemm_dynamic_linear needs a constant integer handle")
    n = fbgemm_packed(handle).out_features
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@cpu_op("fbgemm_dynamic_linear", "(Tensor x, int handle, Tensor? bias) -> Tensor", fake=_fbgemm_dynamic_linear_fake)
def fbgemm_dynamic_linear(x: Tensor, handle: int, bias: Optional[Tensor]) -> Tensor:
    """Dynamic W8A8 linear by FBGEMM: float ``x (..., K)`` -> float32 ``(..., N)``.

    The activation is quantized per tensor inside FBGEMM (see module doc); ``bias`` (if any) is
    added afterwards in float32, on top of a bias packed with the weight.
    """
    entry = fbgemm_packed(handle)
    k, n = entry.in_features, entry.out_features
    if x.shape[-1] != k:
        raise ValueError(f"activation has K={x.shape[-1]}, packed weight has K={k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    if x2.shape[0] == 0:
        y = x2.new_zeros((0, n))
    else:
        y = torch.ops.quantized.linear_dynamic(x2, entry.packed, entry.reduce_range)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*lead, n)


# FBGEMM with the activation grid chosen by the caller (static per-tensor scale and zero point):
# ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` quantizes x as
# ``clamp(round(x / x_scale) + x_zp, 0, 255)``. Given x already rounded (integers as float32)
# and ``x_scale = 1`` that is exactly ``x + x_zp``: the caller's symmetric per-token grid, with
# the per-token scale applied afterwards, as in the oneDNN path.
def _fbgemm_qlinear_fake(x_int: Tensor, x_zp: int, handle: int) -> Tensor:
    if not isinstance(handle, int):
        raise TypeError("qpass::fbgemm_qlinear needs a constant integer handle")
    n = fbgemm_packed(handle).out_features
    return x_int.new_empty((*x_int.shape[:-1], n), dtype=torch.float32)


@cpu_op("fbgemm_qlinear", "(Tensor x_int, int x_zp, int handle) -> Tensor", fake=_fbgemm_qlinear_fake)
def fbgemm_qlinear(x_int: Tensor, x_zp: int, handle: int) -> Tensor:
    """``x_int @ (w_int8 * w_scales[:, None]).T`` in float32 by FBGEMM, for decode-sized inputs.

    ``x_int``: float32 ``(..., K)`` holding integers in ``[-x_zp, 255 - x_zp]`` (already quantized,
    zero point not added; on CPUs without VNNI keep ``x_int + x_zp <= 127`` or the weights in
    ``[-63, 63]``, so u8 x s8 pair sums cannot saturate int16); ``handle`` from
    :func:`pack_fbgemm_dynamic`. The integer product is exact (int32 accumulation).
    """
    # Decode calls this ~200 times per token: keep the Python around the GEMM minimal.
    entry = _REGISTRY.get(handle) or fbgemm_packed(handle)
    k = entry.in_features
    if x_int.shape[-1] != k:
        raise ValueError(f"activation has K={x_int.shape[-1]}, packed weight has K={k}")
    x2 = x_int if x_int.dim() == 2 else x_int.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    if x2.shape[0] == 0:
        return x2.new_zeros((*x_int.shape[:-1], entry.out_features))
    y = _Q_DQ_LINEAR(x2, 1.0, x_zp, entry.packed)
    return y if x_int.dim() == 2 else y.reshape(*x_int.shape[:-1], entry.out_features)
