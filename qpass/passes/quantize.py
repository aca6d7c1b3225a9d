"""Insert quant/dequant around every linear that the config quantizes.

Before::

    y = linear(x, W, b)

After (dynamic per-token activations, per-output-channel weights)::

    x_scale, x_zp = qpass.choose_qparams(x, per_token=True, ...)
    x_q = qpass.quantize(x, x_scale, None, -128, 127, int8)
    x_dq = qpass.dequantize(x_q, x_scale, None, 0, f32)
    w_dq = qpass.dequantize(const(W_q), const(W_scale), None, 0, f32)
    y = linear(x_dq, w_dq, b)

Asymmetric weights add a float zero point per block:
``qpass.dequantize(const(W_q), const(W_scale), const(W_zero_point), group, f32)``.
GPT-2's ``addmm(b, x, W)`` becomes ``linear(x, W.T, b)`` on the way. With
``OutlierSplit`` the outlier input channels bypass quantization::

    y = linear(qdq(x * const(mask)), dq(W_q without outlier columns), b)
        + linear(index_select(x, -1, const(outliers)), const(W[:, outliers]))
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import fx

from qpass import ops, qmath
from qpass.calibration import Calibration, ChannelStats
from qpass.config import AdaDim, PerGroup, PerToken, QuantConfig, QuantSpec
from qpass.graph import LinearSite, QGraph
from qpass.passes.smooth import fp32_value
from qpass.report import Report

logger = logging.getLogger(__name__)

__all__ = ["quantize"]


def quantize(qg: QGraph, config: QuantConfig, calibration: Calibration | None, report: Report) -> int:
    """Rewrite every quantized linear to the reference quant/dequant form; returns how many."""
    if config.weight is None:
        return 0
    done = 0
    shared: dict[tuple, fx.Node] = {}  # one activation quantization per input and scale
    for site in qg.linears():
        row = report.row(site.path)
        if config.skips(site.path):
            row.weight = row.activation = "fp32 (skipped)"
            continue
        w = qg.value(site.weight_node)
        if not w.dtype.is_floating_point:
            row.reason = f"weight dtype {w.dtype} is not floating point; left as is"
            logger.warning("%s: %s", site.path, row.reason)
            continue
        stats = calibration.get(site.path) if calibration is not None else None
        _quantize_site(qg, site, config, stats, calibration is not None, row, shared)
        done += 1
    fell_back = qg.memo.pop("new_per_token_fallbacks", [])
    if fell_back:  # one warning for the cause, the numbers in each report row
        logger.warning(
            "qpass: %d linears run per-token dynamic activations, their static scale losing by more than %gx "
            "on the calibration samples (see the report): %s", len(fell_back), config.dynamic_fallback,
            ", ".join(fell_back),
        )
    return done


def act_view(qg: QGraph, site: LinearSite, stats: ChannelStats | None):
    """The calibrated statistics of what reaches the linear after smoothing: (lo, hi, absmax, samples)."""
    if stats is None:
        return None
    s = qg.smoothing.get(site.node)
    if s is None:
        s = torch.ones_like(stats.absmax)
    samples = None if stats.samples is None else stats.samples / s
    return stats.min / s, stats.max / s, stats.absmax / s, samples


def _quantize_site(qg: QGraph, site: LinearSite, config: QuantConfig, stats, calibrated: bool, row, shared: dict) -> None:
    """``stats`` is None for a layer without usable statistics; ``calibrated`` says whether the
    backend has a calibration at all (without one, static scales are a configuration error; with
    one, such a layer falls back to what needs no statistics, and ``qpass.checks`` said why)."""
    wspec, aspec = config.weight, config.activation
    w = fp32_value(qg, site.weight_node)  # a half model's smoothed weight before its rounding to half
    w = (w.t() if site.weight_t else w).detach()
    view = act_view(qg, site, stats)
    samples = view[3] if view is not None else None

    granularity = wspec.granularity
    if isinstance(granularity, AdaDim):
        granularity, why = qmath.choose_adadim(samples, w, wspec, aspec)
        row.reason = f"{row.reason}; adadim: {why}" if row.reason else f"adadim: {why}"
    if isinstance(granularity, PerGroup) and w.shape[1] % granularity.group_size:
        raise ValueError(
            f"{site.path}: PerGroup({granularity.group_size}) does not divide its {w.shape[1]} input channels"
        )
    if aspec is not None and not aspec.dynamic and config.runs_dynamic(site.path):
        aspec = QuantSpec(aspec.dtype, PerToken(), symmetric=aspec.symmetric)
        row.per_token_fallback = True
        _note(row, "per-token dynamic activations (QuantConfig.dynamic_layers)")
    if aspec is not None and not aspec.dynamic and view is None:
        if not calibrated:
            raise ValueError(
                f"{site.path}: static activation scales need calibration statistics "
                "(pass calibration=qpass.calibrate(...), or use a dynamic activation spec)"
            )
        aspec = QuantSpec(aspec.dtype, PerToken(), symmetric=aspec.symmetric)
        row.per_token_fallback = True
        _note(row, "per-token dynamic activations: no usable statistics for a static scale")

    if config.outliers is not None and view is None:
        if not calibrated:
            raise ValueError(f"{site.path}: OutlierSplit needs calibration statistics (pass calibration=qpass.calibrate(...))")
        _note(row, "no outlier split: no usable statistics to find the outlier channels")
        outliers = None
    else:
        outliers = _outlier_channels(config, view)
    keep_mask = None
    if outliers is not None:
        keep_mask = torch.ones(w.shape[1], dtype=torch.bool)
        keep_mask[outliers] = False
        w_main = w * keep_mask
    else:
        w_main = w
    qw = qmath.quantize_weight(w_main, wspec, granularity)
    if aspec is not None and not aspec.dynamic and config.dynamic_fallback is not None:
        key = ("static_or_per_token", site.path)  # once per layer for every graph of the backend
        if key not in qg.memo:
            qg.memo[key] = _static_or_dynamic(aspec, config.dynamic_fallback, view, keep_mask, qw.dequantize(), site.path, row)
            if qg.memo[key] is not aspec:
                qg.memo.setdefault("new_per_token_fallbacks", []).append(site.path)
        aspec = qg.memo[key]

    x = site.input
    dtype = _dtype(x)
    before = site.node
    bias = site.bias_node
    wq = qg.constant(f"{site.path}.weight_q", qw.q)
    ws = qg.constant(f"{site.path}.weight_scale", qw.scale)
    wz = None if qw.zero_point is None else qg.constant(f"{site.path}.weight_zero_point", qw.zero_point)
    w_dq = qg.call(ops.dequantize, (wq, ws, wz, qw.group_size, dtype), before=before)

    x_main = x
    if keep_mask is not None:
        mask = qg.constant(f"{site.path}.inlier_mask", keep_mask.to(dtype))
        x_main = qg.call(torch.mul, (x, mask), before=before)
    x_dq = x_main if aspec is None else _fake_quant_act(qg, x_main, aspec, view, keep_mask, site, before, dtype, shared)
    y = qg.call(F.linear, (x_dq, w_dq, bias), before=before)
    if outliers is not None:
        idx = qg.constant(f"{site.path}.outlier_channels", outliers)
        w_out = qg.constant(f"{site.path}.outlier_weight", w[:, outliers].to(dtype))
        x_out = qg.call(torch.index_select, (x, -1, idx), before=before)
        y_out = qg.call(F.linear, (x_out, w_out, None), before=before)
        y = qg.call(torch.add, (y, y_out), before=before)
    site.node.replace_all_uses_with(y)
    qg.graph.erase_node(site.node)
    qg.quantized[y] = site.path

    row.weight = f"{wspec.dtype} {qmath.describe(granularity)}{'' if wspec.symmetric else ' asym'}"
    row.activation = "fp32" if aspec is None else _describe_act(aspec)
    if outliers is not None:
        row.activation += f" + {outliers.numel()} fp32 outlier channels"
        row.outlier_channels = outliers.numel()


def _fake_quant_act(qg, x, spec: QuantSpec, view, keep_mask, site, before, dtype, shared: dict) -> fx.Node:
    qmin, qmax = spec.qrange
    static = None
    if not spec.dynamic:
        lo, hi = view[0], view[1]
        if keep_mask is not None:
            lo, hi = lo[keep_mask], hi[keep_mask]
        static = qmath.static_act_qparams(lo, hi, spec)
    key = (x, spec, None if static is None else (float(static[0]), float(static[1])))
    if key in shared:  # q, k and v read one normed input: quantize it once
        return shared[key]
    if static is None:
        pair = qg.call(ops.choose_qparams, (x, isinstance(spec.granularity, PerToken), spec.symmetric, qmin, qmax), before=before)
        scale, zp = _pair(qg, pair, before)
    else:
        scale = qg.constant(f"{site.path}.input_scale", static[0])
        zp = qg.constant(f"{site.path}.input_zero_point", static[1])
    if spec.symmetric:
        zp = None
    xq = qg.call(ops.quantize, (x, scale, zp, qmin, qmax, spec.storage_dtype), before=before)
    shared[key] = qg.call(ops.dequantize, (xq, scale, zp, 0, dtype), before=before)
    return shared[key]


def _static_or_dynamic(spec: QuantSpec, factor: float, view, keep_mask, w_dq: torch.Tensor, path: str, row) -> QuantSpec:
    """``spec`` (static per-tensor), or per-token dynamic where the static scale's output error
    on the calibration samples is more than ``factor`` times the dynamic one's."""
    lo, hi, _, samples = view
    if samples is None:
        return spec
    if keep_mask is not None:
        lo, hi, samples = lo[keep_mask], hi[keep_mask], samples * keep_mask
    choice = qmath.static_or_per_token(samples, w_dq, spec, lo, hi, factor)
    if not choice.per_token:
        return spec
    why = (f"per-token dynamic activations: the static scale's error on calibration samples "
           f"{choice.static_error:.2e} is over {factor:g}x per-token's {choice.dynamic_error:.2e}")
    row.reason = f"{row.reason}; {why}" if row.reason else why
    row.per_token_fallback = True
    logger.debug("%s: %s", path, why)
    return choice.spec


def _note(row, why: str) -> None:
    row.reason = f"{row.reason}; {why}" if row.reason else why


def _pair(qg: QGraph, node: fx.Node, before: fx.Node) -> tuple[fx.Node, fx.Node]:
    import operator

    return qg.call(operator.getitem, (node, 0), before=before), qg.call(operator.getitem, (node, 1), before=before)


def _outlier_channels(config: QuantConfig, view) -> torch.Tensor | None:
    split = config.outliers
    if split is None:
        return None
    absmax = view[2]  # _quantize_site handled a layer without statistics
    if split.top_k is not None:
        idx = absmax.topk(min(split.top_k, absmax.numel())).indices
    else:
        threshold = split.threshold if split.ratio is None else split.ratio * float(absmax.median())
        idx = (absmax > threshold).nonzero().flatten()
    return idx.sort().values if idx.numel() else None


def _describe_act(spec: QuantSpec) -> str:
    mode = "dynamic" if spec.dynamic else "static"
    sym = "" if spec.symmetric else " asym"
    return f"{spec.dtype} {qmath.describe(spec.granularity)} {mode}{sym}"


def _dtype(node: fx.Node) -> torch.dtype:
    val = node.meta.get("val", node.meta.get("example_value"))
    return val.dtype if isinstance(val, torch.Tensor) and val.dtype.is_floating_point else torch.float32
