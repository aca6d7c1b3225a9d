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

Fused experts split the same way over the expert segments (``_expert_outliers``)::

    y = grouped_mm(qdq(x * mask), dq(W_q).mT, offs) + grouped_mm(x[:, outliers], const(W_out).mT, offs)
"""

from __future__ import annotations

import functools
import logging
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from qpass import ops, qmath
from qpass.calibration import Calibration, ChannelStats
from qpass.config import AdaDim, PerGroup, PerInputChannelGroup, PerToken, QuantConfig, QuantSpec
from qpass.graph import ExpertsSite, LinearSite, QGraph, is_grouped_mm, meta_value, storage_mark
from qpass.passes.smooth import fp32_value
from qpass.report import Report

logger = logging.getLogger(__name__)

__all__ = ["quantize"]


def quantize(qg: QGraph, config: QuantConfig, calibration: Calibration | None, report: Report) -> int:
    """Rewrite every quantized linear to the reference quant/dequant form; returns how many."""
    if config.weight is None:
        return 0
    plans: list[_Plan] = []
    for site in qg.linears():
        row = report.row(site.path)
        if config.skips(site.path):
            row.weight = row.activation = "fp32 (skipped)"
            continue
        if qg.is_router(site):
            row.weight = row.activation = "fp32 (router)"
            if ROUTER_NOTE not in row.reason:
                _note(row, ROUTER_NOTE)
            continue
        w = qg.value(site.weight_node)
        if not w.dtype.is_floating_point:
            row.reason = f"weight dtype {w.dtype} is not floating point; left as is"
            logger.warning("%s: %s", site.path, row.reason)
            continue
        stats = calibration.get(site.path) if calibration is not None else None
        plans.append(_plan_site(qg, site, config, stats, calibration, row))
    if config.dynamic_fallback is not None:
        _per_token_together(qg, plans)
    shared: dict[tuple, fx.Node] = {}  # one activation quantization per input and scale
    for plan in plans:
        _emit_site(qg, plan, config, shared)
    done = len(plans)
    done += _experts(qg, config, calibration, report, shared)
    fell_back = qg.memo.pop("new_per_token_fallbacks", [])
    if fell_back:  # one warning for the cause, the numbers in each report row
        logger.warning(
            "qpass: %d linears run per-token dynamic activations, their static scale losing by more than %gx "
            "on the calibration samples (see the report): %s", len(fell_back), config.dynamic_fallback,
            ", ".join(fell_back),
        )
    return done


def _stored_weight(qg: QGraph, path: str, w: torch.Tensor, spec: QuantSpec, granularity,
                   param: torch.Tensor | None = None) -> qmath.QuantizedWeight | None:
    """The quantized weight a checkpoint stored for ``path`` (``qpass.load``), reshaped like the
    quantize pass's own, when the layer's weight is still its dequantized value; else None. Another
    tool may choose scales qpass would not (an observer that clips, or rounds the scale), so the
    stored integers and scales are used as they are rather than recomputed from the weight.
    ``param``: the parameter ``w`` was read from, if any."""
    stored = qg.stored_weights.get(path)
    if stored is None:
        return None
    # Checked once per backend: every later graph (decode, recompiles) reads the same unchanged
    # parameter (same storage, same version counter) and takes the same answer without comparing
    # the whole dequantized weight again (SmolLM2: 2 x 210 full-size dequantizations and compares).
    key = ("stored_weight", path)
    mark = (storage_mark(w), spec, granularity)
    if key in qg.memo and qg.memo[key][0] == mark:
        return qg.memo[key][1]
    qg.memo[key] = (mark, _checked_stored_weight(path, w, stored, spec, granularity, _written_by_load(qg, path, w, param)))
    return qg.memo[key][1]


def _quantized_weight(qg: QGraph, path: str, w: torch.Tensor, spec: QuantSpec, granularity) -> qmath.QuantizedWeight:
    """``quantize_weight(w)``, once per backend while ``w`` is the same unchanged tensor (storage, view,
    version counter, the storage alive): every graph (prefill, decode, recompiles) then holds the same
    integers as its constant, one copy, where the lowering keeps the reference's weight (an ``lm_head``
    under ``weight_only`` at one token reads them inside its reduction). A smoothed weight is a new
    tensor in each graph and is quantized again (its kernels share their packed copies by digest)."""
    key, mark = ("quantized_weight", path), (storage_mark(w), spec, granularity)
    hit = qg.memo.get(key)
    # The integers are held weakly: alive only while a graph keeps them as its constant (a lowered
    # layer's graphs hold their kernel's copy instead), so the backend holds no copy of its own.
    if hit is not None and hit[0] == mark and hit[1]() is not None and (q := hit[2]()) is not None:
        return qmath.QuantizedWeight(q, *hit[3])
    qw = qmath.quantize_weight(w, spec, granularity)
    qg.memo[key] = (mark, weakref.ref(w.untyped_storage()), weakref.ref(qw.q), (qw.scale, qw.group_size, qw.zero_point, qw.group_dim))
    return qw


def _written_by_load(qg: QGraph, path: str, w: torch.Tensor, param: torch.Tensor | None) -> bool:
    """Whether ``w`` is the very parameter ``qpass.load`` filled with ``path``'s stored weight
    dequantized, unchanged since (same tensor, storage, view and version counter): then it equals
    the stored weight without reading it (SmolLM2: 210 dequantizations and compares, 1-9 s of startup)."""
    written = qg.stored_params.get(path)
    return (written is not None and param is not None and written[0]() is param
            and storage_mark(param) == written[1] == storage_mark(w))


def _checked_stored_weight(path: str, w: torch.Tensor, stored: qmath.QuantizedWeight, spec: QuantSpec,
                           granularity, written_by_load: bool = False) -> qmath.QuantizedWeight | None:
    q_shape, scale_shape, group_size = _weight_layout(tuple(w.shape), spec, granularity)
    if stored.q.shape != q_shape or stored.scale.numel() != math.prod(scale_shape) or stored.group_size != group_size:
        raise ValueError(f"{path}: the stored quantized weight {tuple(stored.q.shape)} does not fit this layer's config")
    stored = qmath.QuantizedWeight(stored.q, stored.scale.reshape(scale_shape), stored.group_size,
                                   None if stored.zero_point is None else stored.zero_point.reshape(scale_shape))
    if not written_by_load and not torch.equal(stored.dequantize(), w):
        logger.warning("qpass: %s: its weight is no longer the checkpoint's (changed after loading); quantizing it again", path)
        return None
    return stored


@functools.lru_cache(maxsize=256)
def _weight_layout(shape: tuple[int, ...], spec: QuantSpec, granularity) -> tuple[torch.Size, torch.Size, int]:
    """(integers' shape, scales' shape, group size) the quantize pass gives a weight of ``shape``:
    the shapes the kernels expect, from ``quantize_weight`` on a meta tensor (no values needed),
    once per shape and spec (a model has a few shapes and hundreds of layers)."""
    ours = qmath.quantize_weight(torch.empty(shape, device="meta"), spec, granularity)
    return ours.q.shape, ours.scale.shape, ours.group_size


#: Why a mixture-of-experts router keeps full precision.
ROUTER_NOTE = "router: kept in full precision (its output picks the experts; quantizing it changes the choice)"


def _activation_spec(path: str, config: QuantConfig, aspec: QuantSpec | None, have_stats: bool, calibrated: bool,
                     row, statistics: str) -> QuantSpec | None:
    """The activation spec a layer runs: per-token dynamic instead of static where the config says
    so (``dynamic_layers``) or where the layer has no usable ``statistics`` (a configuration error
    when the backend has no calibration at all)."""
    if aspec is None or aspec.dynamic:
        return aspec
    if config.runs_dynamic(path):
        reason = "per-token dynamic activations (QuantConfig.dynamic_layers)"
    elif not have_stats:
        if not calibrated:
            raise ValueError(
                f"{path}: static activation scales need calibration statistics "
                "(pass calibration=qpass.calibrate(...), or use a dynamic activation spec)"
            )
        reason = f"per-token dynamic activations: no usable {statistics}"
    else:
        return aspec
    row.per_token_fallback = True
    _note(row, reason)
    return QuantSpec(aspec.dtype, PerToken(), symmetric=aspec.symmetric)


def act_view(qg: QGraph, site: LinearSite, stats: ChannelStats | None):
    """The calibrated statistics of what reaches the linear after smoothing: (lo, hi, absmax, samples)."""
    if stats is None:
        return None
    s = qg.smoothing.get(site.node)
    if s is None:
        s = torch.ones_like(stats.absmax)
    samples = None if stats.samples is None else stats.samples / s
    return stats.min / s, stats.max / s, stats.absmax / s, samples


@dataclass
class _Plan:
    """What the quantize pass chose for one linear, before it rewrites the graph."""

    site: LinearSite
    row: object  # its report row
    w: torch.Tensor  # (N, K) fp32 weight, smoothed
    view: tuple | None  # act_view
    granularity: object
    aspec: QuantSpec | None  # the activation spec it runs
    outliers: torch.Tensor | None
    keep_mask: torch.Tensor | None
    qw: qmath.QuantizedWeight


def _plan_site(qg: QGraph, site: LinearSite, config: QuantConfig, stats, calibration: Calibration | None,
               row) -> _Plan:
    """``stats`` is None for a layer without usable statistics; ``calibration`` is None when the
    backend has none at all (then static scales are a configuration error; with one, such a layer
    falls back to what needs no statistics, and ``qpass.checks`` said why)."""
    calibrated = calibration is not None
    wspec, aspec = config.weight, config.activation
    if config.quantizes_weight_only(site.path):
        aspec = None
        _note(row, "weight-only (QuantConfig.weight_only)")
    w = fp32_value(qg, site.weight_node)  # a half model's smoothed weight before its rounding to half
    w = (w.t() if site.weight_t else w).detach()
    view = act_view(qg, site, stats)
    samples = view[3] if view is not None else None

    granularity = wspec.granularity
    _check_groups(site.path, granularity, w.shape[0], w.shape[1])
    if isinstance(granularity, AdaDim):
        granularity, why = qmath.choose_adadim(samples, w, wspec, aspec, granularity)
        row.reason = f"{row.reason}; adadim: {why}" if row.reason else f"adadim: {why}"
    aspec = _activation_spec(site.path, config, aspec, view is not None, calibrated, row, "statistics for a static scale")

    if aspec is None:  # weight-only: nothing to split
        outliers = None
    elif config.outliers is not None and view is None:
        if not calibrated:
            raise ValueError(f"{site.path}: OutlierSplit needs calibration statistics (pass calibration=qpass.calibrate(...))")
        _note(row, "no outlier split: no usable statistics to find the outlier channels")
        outliers = None
    else:
        outliers = _outlier_channels(config, view, _common_count(qg, config, calibration, site.path))
        _note_common_size(row, config, view, outliers)
    keep_mask = None
    if outliers is not None:
        keep_mask = torch.ones(w.shape[1], dtype=torch.bool)
        keep_mask[outliers] = False
        w_main = w * keep_mask
    else:
        w_main = w
    param = qg.params[site.weight_node][1] if site.weight_node in qg.params else None
    qw = _stored_weight(qg, site.path, w_main, wspec, granularity, param) or _quantized_weight(qg, site.path, w_main, wspec, granularity)
    if aspec is not None and not aspec.dynamic and config.dynamic_fallback is not None:
        key = ("static_or_per_token", site.path)  # once per layer for every graph of the backend
        if key not in qg.memo:
            qg.memo[key] = _static_or_dynamic(aspec, config.dynamic_fallback, view, keep_mask, qw.dequantize(), site.path, row)
            if qg.memo[key] is not aspec:
                qg.memo.setdefault("new_per_token_fallbacks", []).append(site.path)
        aspec = qg.memo[key]
    return _Plan(site, row, w, view, granularity, aspec, outliers, keep_mask, qw)


def _per_token_together(qg: QGraph, plans: list[_Plan]) -> None:
    """Static activations chosen per-token for one linear (``dynamic_fallback``) go per-token for
    every linear that reads the same input (q/k/v, gate/up; ``qmath.shared_input_spec``, the rule
    learned smoothing scores with too): then the input is quantized once and the group runs as one
    GEMM (``lower.FUSE_SHARED_INPUT``). Decided once per layer for every graph. Only for the
    budget's own choices: a config's explicit ``dynamic_layers`` are kept as given."""
    by_input: dict[fx.Node, list[_Plan]] = {}
    for p in plans:
        if p.aspec is not None and p.keep_mask is None:
            by_input.setdefault(p.site.input, []).append(p)
    for group in by_input.values():
        spec = qmath.shared_input_spec(p.aspec for p in group)
        if spec is None:
            continue
        source = next(p for p in group if p.aspec is spec)
        for p in group:
            if p.aspec.dynamic:
                continue
            key = ("per_token_with", p.site.path)
            if key not in qg.memo:
                why = f"per-token dynamic activations: shares its input with {source.site.path}, which runs per-token"
                qg.memo[key] = spec
                _note(p.row, why)
                p.row.per_token_fallback = True
                qg.memo.setdefault("new_per_token_fallbacks", []).append(p.site.path)
            p.aspec = qg.memo[key]


def _emit_site(qg: QGraph, plan: _Plan, config: QuantConfig, shared: dict) -> None:
    """Rewrite ``plan``'s linear to the reference quant/dequant form."""
    site, row, w, view, granularity = plan.site, plan.row, plan.w, plan.view, plan.granularity
    aspec, outliers, keep_mask, qw = plan.aspec, plan.outliers, plan.keep_mask, plan.qw
    wspec = config.weight
    x = site.input
    dtype = _dtype(x)
    before = site.node
    bias = site.bias_node
    wq = qg.constant(f"{site.path}.weight_q", qw.q)
    ws = qg.constant(f"{site.path}.weight_scale", qw.scale)
    wz = None if qw.zero_point is None else qg.constant(f"{site.path}.weight_zero_point", qw.zero_point)
    w_dq = qg.call(ops.dequantize, (wq, ws, wz, qw.group_size, dtype, *_group_dim(qw)), before=before)

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

    row.weight = f"{wspec.dtype} {qmath.describe(granularity)}{qmath.asym_label(wspec)}"
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


def _experts(qg: QGraph, config: QuantConfig, calibration: Calibration | None, report: Report, shared: dict) -> int:
    """Quantize every grouped matmul over fused expert weights, one expert at a time::

        y = grouped_mm(x, W.transpose(-2, -1), offs)
    ->  y = grouped_mm(dq(q(x)), dequantize(const(W_q), const(W_scale), ...).transpose(-2, -1), offs)

    Weights: each expert's (N, K) matrix at the config's granularity (AdaDim: per output channel).
    Activations: dynamic as the config says (each row is one token routed to one expert); static
    per-tensor scales per expert, from the calibrated tokens routed to it, each row taking its
    expert's scale (``ops.expert_of_rows`` reads the expert segments from ``offs``). With
    ``QuantConfig.outliers``, the outlier input channels bypass quantization (``_expert_outliers``)."""
    done = 0
    for site in qg.experts():
        row = report.row(site.path)
        if config.skips(site.path):
            row.weight = row.activation = "fp32 (skipped)"
            continue
        stats = calibration.get(site.path) if calibration is not None else None
        _quantize_experts(qg, site, config, stats, calibration is not None, row, shared)
        done += 1
    return done


def _quantize_experts(qg: QGraph, site: ExpertsSite, config: QuantConfig, stats, calibrated: bool, row, shared: dict) -> None:
    wspec, aspec = config.weight, config.activation
    if config.quantizes_weight_only(site.path):
        raise ValueError(f"{site.path}: QuantConfig.weight_only names dense linears; fused experts take the config's "
                         "activation spec (or skip them)")
    w = fp32_value(qg, site.weight_node).transpose(1, 2).detach()  # (E, N, K): each expert's weight
    experts, k = w.shape[0], w.shape[2]
    granularity = wspec.granularity
    if isinstance(granularity, AdaDim):
        granularity = qmath.adadim_candidates(granularity)[1]
        _note(row, f"adadim: {qmath.describe(granularity)} for fused experts (no per-expert search)")
    _check_groups(site.path, granularity, w.shape[1], k)
    s = qg.smoothing.get(site.node)
    outliers = _expert_outliers(qg, site, config, stats, s, calibrated, row)
    keep = None if outliers is None else outliers.keep
    w_main = w if keep is None else w * keep[:, None, :]
    qws = (None if keep is not None else _stored_experts(qg, site.path, w, wspec, granularity)) or [
        qmath.quantize_weight(w_main[e], wspec, granularity) for e in range(experts)]
    q = torch.stack([qw.q for qw in qws])
    scale = torch.stack([qw.scale for qw in qws])
    zero_point = None if qws[0].zero_point is None else torch.stack([qw.zero_point for qw in qws])

    view = None
    if stats is not None:
        s = torch.ones(k) if s is None else s
        view = (stats.min / s, stats.max / s, stats)
        if keep is not None:  # the static scales cover what reaches the int8 grouped matmul: the inliers
            view = (view[0] * keep, view[1] * keep, stats)
    aspec = _activation_spec(site.path, config, aspec, view is not None, calibrated, row,
                             "per-expert statistics for static scales")
    if aspec is not None and not aspec.dynamic and config.dynamic_fallback is not None:
        key = ("static_or_per_token", site.path)
        if key not in qg.memo:
            qg.memo[key] = _experts_static_or_dynamic(aspec, config.dynamic_fallback, view, s, q, scale, zero_point, qws, row,
                                                      keep)
            if qg.memo[key] is not aspec:
                qg.memo.setdefault("new_per_token_fallbacks", []).append(site.path)
        aspec = qg.memo[key]

    x, before = site.input, site.node
    dtype = _dtype(x)
    wdtype = qg.value(site.weight_node).dtype
    wq = qg.constant(f"{site.path}_q", q)
    ws = qg.constant(f"{site.path}_scale", scale)
    wz = None if zero_point is None else qg.constant(f"{site.path}_zero_point", zero_point)
    w_dq = qg.call(ops.dequantize, (wq, ws, wz, qws[0].group_size, wdtype, *_group_dim(qws[0])), before=before)
    w_arg = qg.call(torch.transpose, (w_dq, -2, -1), before=before)
    x_main = x if outliers is None else _inliers(qg, site, x, outliers, before, dtype)
    if aspec is None:
        x_dq = x_main
    elif aspec.dynamic:
        x_dq = _fake_quant_act(qg, x_main, aspec, None, None, site, before, dtype, shared)
    else:
        x_dq = _static_per_expert(qg, site, x_main, aspec, view, before, dtype, row)
    site.node.update_arg(0, x_dq)
    site.node.update_arg(1, w_arg)
    qg.quantized_experts[site.node] = site.path
    if outliers is not None:
        _add_outlier_part(qg, site, x, w, outliers, wdtype)
        qg.memo[("expert_outliers", site.path)] = outliers  # for the lowering: its grid and its label

    row.weight = f"{wspec.dtype} {qmath.describe(granularity)} per expert{qmath.asym_label(wspec)}"
    row.activation = "fp32" if aspec is None else _describe_act(aspec) + ("" if aspec.dynamic else " per expert")
    if outliers is not None:
        row.activation += outliers.describe()
        row.outlier_channels = outliers.width


@dataclass
class ExpertOutliers:
    """An outlier split of fused experts (``QuantConfig.outliers``): per expert, the input channels
    that bypass quantization. ``channels`` is padded to one width for all experts, a multiple of 8
    (``torch._grouped_mm`` wants rows of a multiple of 16 bytes), with weight columns of zero, so
    one float grouped matmul over the same segments computes every expert's outlier part
    (``OutlierSplit.common_size`` does not apply to fused experts yet)."""

    keep: torch.Tensor  # (E, K) bool: the inlier channels of each expert
    channels: torch.Tensor  # (E, width) int64: each expert's outlier channels, padded
    counts: torch.Tensor  # (E,) how many of each row of ``channels`` are real
    shared: bool  # one set for every expert (an input every expert reads the same channels of)

    @property
    def width(self) -> int:
        """The most outlier channels of one expert (the padding not counted)."""
        return int(self.counts.max())

    def describe(self) -> str:
        if self.shared:
            return f" + {self.width} fp32 outlier channels"
        lo, hi = int(self.counts.min()), int(self.counts.max())
        counts = f"{lo}-{hi}" if lo != hi else f"{hi}"
        return f" + {counts} fp32 outlier channels per expert"


def _expert_outliers(qg: QGraph, site: ExpertsSite, config: QuantConfig, stats, s, calibrated: bool,
                     row) -> ExpertOutliers | None:
    """The outlier channels of a grouped matmul, by the config's rule on the calibrated absmax after
    smoothing. ``gate_up``'s input is the normed hidden state, the same channels for every expert
    (only the tokens differ): one set from all routed tokens, as the dense linears reading that norm
    get, so an expert with few calibration tokens does not miss a channel its later tokens will
    have. ``down``'s input is each expert's own ``act(gate) * up`` (its channels mean something else
    in every expert): a set per expert from the tokens routed to it; an expert no calibration token
    reached takes the rule over all experts' absmax. Which one: whether the input is computed from
    another grouped matmul over the same expert segments (``_reads_expert_output``)."""
    if config.outliers is None:
        return None
    if stats is None:
        if not calibrated:
            raise ValueError(f"{site.path}: OutlierSplit needs calibration statistics (pass calibration=qpass.calibrate(...))")
        _note(row, "no outlier split: no usable statistics to find the outlier channels")
        return None
    experts, k = stats.absmax.shape
    absmax = stats.absmax / (torch.ones(k) if s is None else s)
    over_all = absmax.amax(0)
    shared = not _reads_expert_output(site)
    if shared:
        sets = [_outlier_channels(config, (None, None, over_all))] * experts
    else:
        seen = stats.expert_tokens > 0
        sets = [_outlier_channels(config, (None, None, absmax[e] if seen[e] else over_all)) for e in range(experts)]
    sets = [torch.zeros(0, dtype=torch.long) if idx is None else idx for idx in sets]
    counts = torch.tensor([idx.numel() for idx in sets])
    width = int(counts.max())
    if width == 0:
        _note(row, "no outlier split: no input channel passes the outlier rule")
        return None
    keep = torch.ones(experts, k, dtype=torch.bool)
    channels = torch.zeros(experts, -(-width // 8) * 8, dtype=torch.long)
    for e, idx in enumerate(sets):
        keep[e, idx] = False
        channels[e, : idx.numel()] = idx
    return ExpertOutliers(keep, channels, counts, shared)


def _reads_expert_output(site: ExpertsSite, depth: int = 6) -> bool:
    """Whether the grouped matmul's input is computed (within ``depth`` ops) from another grouped
    matmul over the same expert segments (``down`` reading ``act(gate) * up``), rather than
    gathered from a value every expert shares (``gate_up`` reading the normed hidden state)."""
    frontier, seen = [site.input], set()
    for _ in range(depth):
        nxt = []
        for node in frontier:
            if node in seen:
                continue
            seen.add(node)
            if is_grouped_mm(node) and node is not site.node:
                offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
                if offs is site.offsets:
                    return True
            nxt += node.all_input_nodes
        frontier = nxt
    return False


def _inliers(qg: QGraph, site: ExpertsSite, x: fx.Node, o: ExpertOutliers, before: fx.Node, dtype) -> fx.Node:
    """``x`` with each row's outlier channels zeroed: ``x * mask`` (one set), or each row times its
    expert's mask, ``x * mask[expert_of_rows(x, offs)]``."""
    if o.shared:
        return qg.call(torch.mul, (x, qg.constant(f"{site.path}.inlier_mask", o.keep[0].to(dtype))), before=before)
    mask = qg.constant(f"{site.path}.inlier_mask", o.keep.to(dtype))
    ids = qg.call(ops.expert_of_rows, (x, site.offsets), before=before)
    return qg.call(torch.mul, (x, qg.call(torch.index_select, (mask, 0, ids), before=before)), before=before)


def outlier_weight(w: torch.Tensor, o: ExpertOutliers) -> torch.Tensor:
    """(E, N, width): each expert's fp32 weight columns at its outlier channels, zero at the padding."""
    real = torch.arange(o.channels.shape[1])[None, :] < o.counts[:, None]  # (E, padded width)
    cols = torch.stack([w[e][:, o.channels[e]] for e in range(w.shape[0])])
    return cols * real[:, None, :]


def _add_outlier_part(qg: QGraph, site: ExpertsSite, x: fx.Node, w: torch.Tensor, o: ExpertOutliers, wdtype) -> None:
    """``y = grouped_mm(int8 part) + grouped_mm(x_out, W_out.transpose(-2, -1), offs)``: the outlier
    channels of each row (``index_select`` for one set; per expert, ``gather`` of each row's
    expert's channels) times that expert's float weight columns, over the same segments."""
    before = site.node
    if o.shared:
        channels = qg.constant(f"{site.path}.outlier_channels", o.channels[0])
        x_out = qg.call(torch.index_select, (x, -1, channels), before=before)
    else:
        channels = qg.constant(f"{site.path}.outlier_channels", o.channels)
        ids = qg.call(ops.expert_of_rows, (x, site.offsets), before=before)
        per_row = qg.call(torch.index_select, (channels, 0, ids), before=before)
        x_out = qg.call(torch.gather, (x, 1, per_row), before=before)
    w_out = qg.constant(f"{site.path}.outlier_weight", outlier_weight(w, o).to(wdtype))
    w_arg = qg.call(torch.transpose, (w_out, -2, -1), before=before)
    y_out = qg.call(site.node.target, (x_out, w_arg, *site.node.args[2:]), dict(site.node.kwargs), before=before)
    y = qg.call(torch.add, (site.node, y_out), before=site.node.next)
    site.node.replace_all_uses_with(y, delete_user_cb=lambda user: user is not y)


def _stored_experts(qg: QGraph, path: str, w: torch.Tensor, spec: QuantSpec, granularity) -> list[qmath.QuantizedWeight] | None:
    """``_stored_weight`` for fused experts: the checkpoint's (E, N, K) integers and scales, one
    quantized weight per expert, when the parameter is still their dequantized value; else None."""
    stored = qg.stored_weights.get(path)
    if stored is None:
        return None
    ours = qmath.quantize_weight(w[0], spec, granularity)  # the shapes the kernels expect
    if (stored.q.shape != w.shape or stored.group_size != ours.group_size or stored.zero_point is not None
            or stored.scale.shape[0] != w.shape[0] or stored.scale[0].numel() != ours.scale.numel()):
        raise ValueError(f"{path}: the stored quantized experts {tuple(stored.q.shape)} do not fit this layer's config")
    if not torch.equal(stored.dequantize(), w):
        logger.warning("qpass: %s: its weight is no longer the checkpoint's (changed after loading); quantizing it again", path)
        return None
    return [qmath.QuantizedWeight(stored.q[e], stored.scale[e].reshape(ours.scale.shape), stored.group_size)
            for e in range(w.shape[0])]


def _expert_ranges(view, spec: QuantSpec, row) -> tuple[torch.Tensor, torch.Tensor]:
    """(E,) static scales and zero points, one per expert from its tokens' range after smoothing;
    an expert no calibration token reached takes the range of all experts together."""
    lo, hi, stats = view
    seen = stats.expert_tokens > 0
    all_lo, all_hi = lo[seen].amin(0), hi[seen].amax(0)
    scales, zps = [], []
    for e in range(lo.shape[0]):
        lo_e, hi_e = (lo[e], hi[e]) if seen[e] else (all_lo, all_hi)
        sc, zp = qmath.static_act_qparams(lo_e, hi_e, spec)
        scales.append(sc)
        zps.append(zp)
    if not bool(seen.all()):
        unseen = [str(e) for e in range(lo.shape[0]) if not seen[e]]
        _note(row, f"experts {', '.join(unseen)} got no calibration tokens: their static scale covers all experts' range")
    return torch.cat(scales), torch.cat(zps)


def _static_per_expert(qg, site: ExpertsSite, x, spec: QuantSpec, view, before, dtype, row) -> fx.Node:
    qmin, qmax = spec.qrange
    scales, zps = _expert_ranges(view, spec, row)
    ids = qg.call(ops.expert_of_rows, (x, site.offsets), before=before)
    scale = qg.call(torch.unsqueeze, (qg.call(torch.index_select, (qg.constant(f"{site.path}.input_scale", scales), 0, ids),
                                               before=before), -1), before=before)
    zp = None
    if not spec.symmetric:
        zp = qg.call(torch.unsqueeze, (qg.call(torch.index_select, (qg.constant(f"{site.path}.input_zero_point", zps), 0, ids),
                                                before=before), -1), before=before)
    xq = qg.call(ops.quantize, (x, scale, zp, qmin, qmax, spec.storage_dtype), before=before)
    return qg.call(ops.dequantize, (xq, scale, zp, 0, dtype), before=before)


def _experts_static_or_dynamic(spec, factor, view, s, q, scale, zero_point, qws, row, keep=None) -> QuantSpec:
    """``_static_or_dynamic`` for fused experts: one choice for the layer, from the errors of every
    expert's static scale on its own sampled tokens (summed over experts) against per-token's
    (``keep`` (E, K): an outlier split's inlier channels, all that the int8 activations see)."""
    lo, hi, stats = view
    if stats.samples is None or stats.sample_experts is None:
        return spec
    static_err = dynamic_err = 0.0
    total = 0
    for e in range(q.shape[0]):
        rows = stats.sample_experts == e
        if not bool(rows.any()):
            continue
        s_e = s[e] if s.dim() == 2 else s
        w_dq = qws[e].dequantize()
        x_e = stats.samples[rows] / s_e
        if keep is not None:
            x_e = x_e * keep[e]
        choice = qmath.static_or_per_token(x_e, w_dq, spec, lo[e], hi[e], factor)
        n = int(rows.sum())
        static_err += choice.static_error * n
        dynamic_err += choice.dynamic_error * n
        total += n
    if not total:
        return spec
    static_err, dynamic_err = static_err / total, dynamic_err / total  # averaged over the sampled tokens
    if static_err <= factor * dynamic_err:
        return spec
    why = (f"per-token dynamic activations: the per-expert static scales' error on calibration samples "
           f"{static_err:.2e} is over {factor:g}x per-token's {dynamic_err:.2e}")
    _note(row, why)
    row.per_token_fallback = True
    return QuantSpec(spec.dtype, PerToken(), symmetric=spec.symmetric)


def _check_groups(path: str, granularity, n: int, k: int) -> None:
    """Groups must tile the weight: PerGroup(g) its ``k`` input channels, PerInputChannelGroup(g) its
    ``n`` output channels, AdaDim(group_size=g) both (it may pick either)."""
    g = getattr(granularity, "group_size", None)
    if g is None:
        return
    name = f"{type(granularity).__name__}({g})"
    if not isinstance(granularity, PerInputChannelGroup) and k % g:
        raise ValueError(f"{path}: {name} does not divide its {k} input channels")
    if not isinstance(granularity, PerGroup) and n % g:
        raise ValueError(f"{path}: {name} does not divide its {n} output channels")


def _group_dim(qw: qmath.QuantizedWeight) -> tuple[int, ...]:
    """The dequantize op's ``group_dim`` argument, given only for per-input-channel groups (so the
    graphs of every other granularity read as before)."""
    return () if qw.group_dim == -1 else (qw.group_dim,)


def _note(row, why: str) -> None:
    """Add ``why`` to the row's reason, once (prefill, decode and recompiles rewrite the layer again)."""
    if why not in row.reason.split("; "):
        row.reason = f"{row.reason}; {why}" if row.reason else why


def _pair(qg: QGraph, node: fx.Node, before: fx.Node) -> tuple[fx.Node, fx.Node]:
    import operator

    return qg.call(operator.getitem, (node, 0), before=before), qg.call(operator.getitem, (node, 1), before=before)


def _outlier_channels(config: QuantConfig, view, common: int = 0) -> torch.Tensor | None:
    """The input channels the config's outlier rule picks from ``view``'s absmax, sorted; at least
    ``common`` of them (the role's common size, ``_common_count``), the largest first."""
    split = config.outliers
    if split is None:
        return None
    absmax = view[2]  # _quantize_site handled a layer without statistics
    count = min(max(_rule_count(split, absmax), common), absmax.numel())
    # The channels over a threshold are the largest ``count``: topk picks the same set.
    return absmax.topk(count).indices.sort().values if count else None


def _rule_count(split, absmax: torch.Tensor) -> int:
    """How many channels ``split``'s rule keeps in floating point for this absmax."""
    if split.top_k is not None:
        return min(split.top_k, absmax.numel())
    threshold = split.threshold if split.ratio is None else split.ratio * float(absmax.median())
    return int((absmax > threshold).sum())


def role(path: str) -> str:
    """``path`` with its numbers starred (``model.layers.*.mlp.down_proj``): the layers of one role
    in every block (and every expert), which compile to the same graph when their shapes agree."""
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def _common_count(qg: QGraph, config: QuantConfig, calibration: Calibration | None, path: str) -> int:
    """``OutlierSplit.common_size``: the most outlier channels the rule gives any calibrated linear
    of ``path``'s role, on the calibration's statistics as recorded (before
    smoothing, which only the graph of each layer knows); 0 when the sizes are not shared. Once
    per role for every graph of the backend."""
    split = config.outliers
    if calibration is None or split is None or not split.common_size or split.top_k is not None:
        return 0
    key = ("outlier_common_count", role(path))
    if key not in qg.memo:
        qg.memo[key] = max((_rule_count(split, calibration[p].channel_absmax) for p in calibration if role(p) == key[1]),
                           default=0)
    return qg.memo[key]


def _note_common_size(row, config: QuantConfig, view, outliers: torch.Tensor | None) -> None:
    if outliers is None or config.outliers.top_k is not None:
        return
    own = _rule_count(config.outliers, view[2])
    if own != outliers.numel():
        _note(row, f"outlier channels: {own} by the rule, {outliers.numel()} as the most of its role (OutlierSplit.common_size)")


def _describe_act(spec: QuantSpec) -> str:
    mode = "dynamic" if spec.dynamic else "static"
    sym = "" if spec.symmetric else " asym"
    return f"{spec.dtype} {qmath.describe(spec.granularity)} {mode}{sym}"


def _dtype(node: fx.Node) -> torch.dtype:
    val = meta_value(node)
    return val.dtype if isinstance(val, torch.Tensor) and val.dtype.is_floating_point else torch.float32
