"""The quantization math, as short pure tensor functions (no FX).

Weights are ``(N, K)`` (out, in); activations ``(..., K)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from qpass import ops
from qpass.config import (
    AdaDim,
    Granularity,
    PerGroup,
    PerInputChannel,
    PerInputChannelGroup,
    PerOutputChannel,
    PerTensor,
    PerToken,
    QuantSpec,
)

__all__ = [
    "QuantizedWeight", "quantize_weight", "fake_quant_weight", "fake_quant_act", "static_act_qparams",
    "layer_error", "token_error", "static_or_per_token", "choose_adadim", "adadim_candidates", "describe",
]


@dataclass
class QuantizedWeight:
    q: Tensor  # (N, K) in the storage dtype
    scale: Tensor  # broadcastable to (N, K); (N, K // g) for groups, (N // g, K) for per-input-channel groups
    group_size: int  # 0 unless grouped
    zero_point: Tensor | None = None  # like scale; float32, None when symmetric
    group_dim: int = -1  # -2: groups of g rows within a column (PerInputChannelGroup)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.group_dim != -1:
            return ops.dequantize(self.q, self.scale, self.zero_point, self.group_size, dtype, self.group_dim)
        return ops.dequantize(self.q, self.scale, self.zero_point, self.group_size, dtype)

    def dequantize_into(self, out: Tensor) -> None:
        """Write ``dequantize()`` into ``out`` as one ``q * scale`` (the same float32 products), for
        per-channel or per-tensor int8 weights without a zero point (``qpass.load``'s weights)."""
        with torch.no_grad():
            torch.mul(self.q, self.scale, out=out)


# Granularity -> (w viewed as blocks, dim(s) to reduce over for one block's range), so that
# ``amax(view, dims, keepdim=True)`` has one entry per scale. One rule each.
_WEIGHT_BLOCKS: dict[type, Callable[[Tensor, Granularity], tuple[Tensor, tuple[int, ...]]]] = {
    PerTensor: lambda w, g: (w, (0, 1)),
    PerOutputChannel: lambda w, g: (w, (1,)),
    PerInputChannel: lambda w, g: (w, (0,)),
    PerGroup: lambda w, g: (w.reshape(w.shape[0], -1, g.group_size), (2,)),
    PerInputChannelGroup: lambda w, g: (w.reshape(-1, g.group_size, w.shape[1]), (1,)),
}


def quantize_weight(w: Tensor, spec: QuantSpec, granularity: Granularity | None = None) -> QuantizedWeight:
    """Quantize ``w`` (N, K) at ``granularity`` (default: the spec's).

    Symmetric: ``scale = absmax / qmax`` per block, no zero point. Asymmetric
    (``spec.symmetric=False``): ``scale = (max - min) / (qmax - qmin)`` and a float zero
    point ``zp = qmin - min / scale`` per block, so ``(q - zp) * scale`` puts both the
    block's minimum and maximum exactly on the grid (GGUF Q4_1's ``d * q + m``; torchao's
    float zero-point domain). With ``spec.zero_point == "int"`` the range is widened to hold 0 and
    ``zp = qmin - round(min / scale)`` is an integer on the grid (the compressed-tensors format's
    asymmetric scheme). Dequantize: ``(q - zp) * scale``.
    """
    g = granularity or spec.granularity
    if isinstance(g, AdaDim):
        raise ValueError("quantize_weight: resolve AdaDim with choose_adadim first")
    if isinstance(g, PerGroup) and w.shape[1] % g.group_size:
        raise ValueError(f"group size {g.group_size} does not divide {w.shape[1]} input channels")
    if isinstance(g, PerInputChannelGroup) and w.shape[0] % g.group_size:
        raise ValueError(f"group size {g.group_size} does not divide {w.shape[0]} output channels")
    qmin, qmax = spec.qrange
    w = w.detach().float()
    blocks, dims = _WEIGHT_BLOCKS[type(g)](w, g)
    group = g.group_size if isinstance(g, (PerGroup, PerInputChannelGroup)) else 0
    if spec.symmetric:
        scale = (blocks.abs().amax(dim=dims, keepdim=True) / qmax).clamp(min=1e-12)
        q = ops.quantize(blocks, scale, None, qmin, qmax, spec.storage_dtype)
        zero_point = None
    else:
        lo, hi = blocks.amin(dim=dims, keepdim=True), blocks.amax(dim=dims, keepdim=True)
        if spec.zero_point == "int":
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
            scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-12)
            zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
            q = (torch.round(blocks / scale) + zero_point).clamp(qmin, qmax).to(spec.storage_dtype)
        else:
            scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-12)
            q = (torch.round((blocks - lo) / scale) + qmin).clamp(qmin, qmax).to(spec.storage_dtype)
            zero_point = qmin - lo / scale
    q = q.reshape(w.shape)
    if group:  # scales (N, K // g, 1) -> (N, K // g); per-input-channel groups (N // g, 1, K) -> (N // g, K)
        scale = scale.squeeze(dims[0])
        zero_point = None if zero_point is None else zero_point.squeeze(dims[0])
    return QuantizedWeight(q, scale, group, zero_point, -2 if isinstance(g, PerInputChannelGroup) else -1)


def asym_label(spec: QuantSpec) -> str:
    """The report's note on a weight's zero point: none, float (`` asym``) or integer (`` asym int-zp``)."""
    return "" if spec.symmetric else " asym int-zp" if spec.zero_point == "int" else " asym"


def fake_quant_weight(w: Tensor, spec: QuantSpec, granularity: Granularity | None = None) -> Tensor:
    return quantize_weight(w, spec, granularity).dequantize(w.dtype)


def fake_quant_act(x: Tensor, spec: QuantSpec, scale: Tensor | None = None, zero_point: Tensor | None = None) -> Tensor:
    """Quantize-dequantize an activation: dynamic (``scale=None``) or with a static scale."""
    qmin, qmax = spec.qrange
    if scale is None:
        scale, zero_point = ops.choose_qparams(x, isinstance(spec.granularity, PerToken), spec.symmetric, qmin, qmax)
    if spec.symmetric:
        zero_point = None
    q = ops.quantize(x, scale, zero_point, qmin, qmax, spec.storage_dtype)
    return ops.dequantize(q, scale, zero_point, 0, x.dtype)


def static_act_qparams(lo: Tensor, hi: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-tensor scale and zero point from per-channel calibrated ranges."""
    qmin, qmax = spec.qrange
    return ops.qparams_from_range(lo.min().reshape(1), hi.max().reshape(1), spec.symmetric, qmin, qmax)


def layer_error(
    x: Tensor,
    w: Tensor,
    weight: QuantSpec | None,
    activation: QuantSpec | None,
    granularity: Granularity | None = None,
    act_qparams: tuple[Tensor, Tensor] | None = None,
) -> float:
    """Relative squared error of ``x @ w.T`` when both are quantized."""
    ref = x @ w.T
    xq = x if activation is None else fake_quant_act(x, activation, *(act_qparams or (None, None)))
    wq = w if weight is None else fake_quant_weight(w, weight, granularity)
    return float((xq @ wq.T - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))


def token_error(y: Tensor, ref: Tensor) -> float:
    """Relative squared error averaged over tokens (rows): ``mean_i |y_i - ref_i|^2 / |ref_i|^2``.

    Every token counts the same, as in perplexity. Pooled over tokens (``sum |y - ref|^2 /
    sum |ref|^2``), the few tokens with massive activations (an LLM's first position, hundreds
    of times the median row norm) hold nearly all the energy and decide alone.
    """
    energy = ref.pow(2).sum(dim=-1).clamp(min=1e-30)
    return float(((y - ref).pow(2).sum(dim=-1) / energy).mean())


@dataclass(frozen=True)
class FallbackChoice:
    """What ``static_or_per_token`` decided: the activation spec, the output ``y = x_q @ w.T``
    it gives, and the activation errors of both candidates (``token_error`` against ``x @ w.T``)."""

    spec: QuantSpec
    y: Tensor
    static_error: float
    dynamic_error: float

    @property
    def per_token(self) -> bool:
        return self.spec.dynamic


def static_or_per_token(x: Tensor, w: Tensor, spec: QuantSpec, lo: Tensor, hi: Tensor, factor: float) -> FallbackChoice:
    """The static per-tensor ``spec`` (scale from the calibrated ranges ``lo`` / ``hi``), or per-token
    dynamic where the static scale's output error on the samples ``x`` is over ``factor`` times
    per-token's. ``w`` is the quantized weight, so only the activation error counts."""
    ref = x @ w.T
    dynamic = dataclasses.replace(spec, granularity=PerToken(), dynamic=True)
    y_static = fake_quant_act(x, spec, *static_act_qparams(lo, hi, spec)) @ w.T
    y_dynamic = fake_quant_act(x, dynamic) @ w.T
    static_err, dynamic_err = token_error(y_static, ref), token_error(y_dynamic, ref)
    if static_err <= factor * dynamic_err:
        return FallbackChoice(spec, y_static, static_err, dynamic_err)
    return FallbackChoice(dynamic, y_dynamic, static_err, dynamic_err)


def shared_input_spec(specs: Iterable[QuantSpec | None]) -> QuantSpec | None:
    """The activation spec every linear reading one input runs when one of them runs per-token
    (``static_or_per_token`` chose it): that per-token spec, so the input is quantized once and the
    group runs as one GEMM, and the others lose nothing (per-token scales are at least as fine as a
    static one). None: none of them is per-token, each keeps its own. The quantize pass applies it to
    the linears of one input node, learned smoothing (``fsbr.decide_activations``) to the linears of
    one fold, so that learning scores the choices the compile makes."""
    return next((s for s in specs if s is not None and s.dynamic), None)


def adadim_candidates(a: AdaDim) -> tuple[Granularity, Granularity]:
    """(per-input-channel side, per-output-channel side) of AdaDim; the second is its default
    (no calibration samples, fused experts, auto alpha's scoring)."""
    if a.group_size is None:
        return PerInputChannel(), PerOutputChannel()
    return PerInputChannelGroup(a.group_size), PerGroup(a.group_size)


def choose_adadim(x: Tensor | None, w: Tensor, weight: QuantSpec, activation: QuantSpec | None,
                  adadim: AdaDim = AdaDim()) -> tuple[Granularity, str]:
    """AdaDim: the per-input-channel or per-output-channel side (scales, or groups of
    ``adadim.group_size``), whichever reconstructs the layer output ``x @ w.T`` on the samples ``x``
    better (relative squared error, ``layer_error``)."""
    ic, oc = adadim_candidates(adadim)
    if x is None:
        return oc, f"no calibration samples: {describe(oc)}"
    errors = {g: layer_error(x, w, weight, activation, g) for g in (ic, oc)}
    best = min(errors, key=errors.get)
    return best, ", ".join(f"{describe(g)} err {e:.2e}" for g, e in errors.items())


def describe(g: Granularity) -> str:
    if isinstance(g, PerGroup):
        return f"per-group({g.group_size})"
    if isinstance(g, PerInputChannelGroup):
        return f"per-input-channel-group({g.group_size})"
    if isinstance(g, AdaDim) and g.group_size is not None:
        return f"adadim({g.group_size})"
    return {
        PerTensor: "per-tensor", PerToken: "per-token", PerOutputChannel: "per-output-channel",
        PerInputChannel: "per-input-channel", AdaDim: "adadim",
    }[type(g)]
