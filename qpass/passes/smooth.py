"""SmoothQuant: move activation outliers into the weights, exactly.

Before (Llama attention input)::

    y = input_layernorm.weight * norm(x)
    q, k, v = linear(y, Wq), linear(y, Wk), linear(y, Wv)

After::

    y = const(input_layernorm.weight / s) * norm(x)
    q, k, v = linear(y, const(Wq * s)), linear(y, const(Wk * s)), linear(y, const(Wv * s))

Where nothing before the linears can take ``1/s`` (``fc1 -> relu -> fc2``), the
fallback inserts ``y = mul(x, const(1/s))`` in front of them instead.

``Smoothing("learned")`` folds the same way; only ``s`` differs: one factor per channel of every
fold, learned by block reconstruction from the auto-alpha start (``qpass.passes.learned``).

Half-precision models (bf16 / fp16): every folded value is computed in fp32 from the original
weights and rounded to the model's dtype once, when the pass writes it (v_proj's columns and rows,
up's columns and rows are two folds of one weight, never two roundings); the quantize pass reads
the fp32 value (``fp32_value``), not the rounded one. With nothing quantized, the scales are
powers of two, so the fold changes no bit (``_pow2_scales``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import fx

from qpass.calibration import Calibration
from qpass import qmath
from qpass.config import AdaDim, PerToken, QuantConfig
from qpass.graph import ExpertsSite, LinearSite, QGraph
from qpass.report import Match, Report

from qpass.patterns import PATTERNS, Absorber, ArgEdits, NotChannelPreserving, Region, Walk, trace_channels, walk_back
from qpass.patterns.walk import nonlinear_use

logger = logging.getLogger(__name__)

__all__ = ["smoothing_scales", "smooth", "weight_absmax", "fp32_value"]

#: ``meta`` key of a constant this pass wrote in a half dtype: its fp32 value before the rounding.
FP32_META = "qpass_fp32_value"


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = a**alpha / w**(1 - alpha)`` per channel; 1 where ``a`` or ``w`` is zero or not finite."""
    a, w = act_absmax.double(), weight_absmax.double()
    ok = torch.isfinite(a) & torch.isfinite(w) & (a > 0) & (w > 0)
    s = a.clamp(min=1e-12).pow(alpha) / w.clamp(min=1e-12).pow(1 - alpha)
    s = torch.where(ok & torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s.float()


def weight_absmax(site: LinearSite | ExpertsSite, w: torch.Tensor, per_expert: bool = False) -> torch.Tensor:
    """Per-input-channel absmax of a linear weight, or of fused expert weights over every expert
    ((K,)), or per expert ((E, K), ``per_expert``)."""
    w = w.detach().abs()
    if per_expert:
        return w.amax(dim=2).float()  # the experts' weight argument is (E, K, N)
    return w.amax(dim=[d for d in range(w.dim()) if d != site.in_dim]).float()


def scale_columns(site: LinearSite | ExpertsSite, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W[:, j] * s[j]`` (Conv1D: ``W[j, :] * s[j]``; experts (E, K, N): ``W[e, j, :] * s[j]``, or
    ``* s[e, j]`` for a scale per expert)."""
    if isinstance(site, ExpertsSite):
        return (w * (s[:, :, None] if s.dim() == 2 else s[None, :, None])).to(w.dtype)
    return (w * (s[:, None] if site.weight_t else s[None, :])).to(w.dtype)


def fp32_value(qg: QGraph, node: fx.Node) -> torch.Tensor | None:
    """``node``'s value in fp32: for a weight this pass folded in a half dtype, the fp32 result of
    the fold before it was rounded to that dtype; otherwise ``qg.value(node)`` as fp32."""
    exact = node.meta.get(FP32_META) if isinstance(node, fx.Node) else None
    if exact is not None:
        return exact
    value = qg.value(node)
    return None if value is None else value.float()


def _is_half(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize < 4


class _Fp32Edits(ArgEdits):
    """``ArgEdits`` whose values are fp32 while the pass works: a half-precision argument is read
    as fp32 and every fold of it composes in fp32; ``commit`` rounds each to its original dtype
    once and keeps the fp32 value on the constant (``FP32_META``)."""

    def __init__(self, qg: QGraph):
        super().__init__(qg)
        self._dtypes: dict[tuple[fx.Node, int], torch.dtype] = {}

    def get(self, node: fx.Node, pos: int, kwarg: str | None = None) -> torch.Tensor | None:
        value = super().get(node, pos, kwarg)
        if (node, pos) not in self._dtypes and value is not None and _is_half(value.dtype):
            self._dtypes[(node, pos)] = value.dtype
        return value.float() if value is not None and _is_half(value.dtype) else value

    def commit(self) -> None:
        exact = {}
        for key, (value, name, kwarg) in list(self._values.items()):
            if (dtype := self._dtypes.get(key)) is not None:
                exact[key] = (value, kwarg)
                self._values[key] = (value.to(dtype), name, kwarg)
        super().commit()
        for (node, pos), (value, kwarg) in exact.items():
            const = node.args[pos] if len(node.args) > pos else node.kwargs[kwarg]
            const.meta[FP32_META] = value


@dataclass
class Consumer:
    site: LinearSite | ExpertsSite
    walk: Walk | None
    act_absmax: torch.Tensor  # (K,) calibrated, before smoothing
    expert_absmax: torch.Tensor | None = None  # (E, K) for fused expert weights: over each expert's tokens
    router: bool = False  # a mixture-of-experts router: takes s into its columns, is never quantized
    why: str = ""  # why ``walk`` is None


def smooth(qg: QGraph, config: QuantConfig, calibration: Calibration | None, report: Report) -> int:
    """Fold SmoothQuant scales for every linear; returns the number of linears smoothed."""
    sm = config.smoothing
    if sm is None:
        return 0
    edits = _Fp32Edits(qg)
    groups: dict[fx.Node, list[Consumer]] = {}
    for site in [*qg.linears(), *qg.experts()]:
        row = report.row(site.path)
        if config.skips(site.path):
            row.smoothing, row.reason = "none", "skipped by config"
            continue
        if config.quantizes_weight_only(site.path):  # float activations: nothing to smooth for
            row.smoothing = "none"
            continue
        router = isinstance(site, LinearSite) and qg.is_router(site)
        if (calibration is None or site.path not in calibration) and not router:
            # qpass.checks.vet_calibration left out statistics that are missing, non-finite or of
            # another width, and said why, once for all such layers
            row.smoothing = "none"
            continue
        stats = calibration.get(site.path) if calibration is not None else None
        if stats is None:  # a router without statistics: the other readers of its input set s
            w = qg.value(site.weight_node)
            absmax, per_expert = torch.zeros(w.shape[site.in_dim]), None
        else:
            absmax, per_expert = stats.channel_absmax, (stats.absmax if stats.per_expert else None)
        producer, path = walk_back(site.input, qg)
        why = ""
        try:
            walk = trace_channels(producer, path)
        except NotChannelPreserving as e:
            walk, producer = None, site.input
            why = f"input path not channel-preserving: {e}"
        groups.setdefault(producer, []).append(Consumer(site, walk, absmax, per_expert, router, why))

    smoothed = 0
    unabsorbed: list[tuple[Consumer, str]] = []
    folds: list[tuple[fx.Node, list[Consumer], Absorber]] = []
    for producer, consumers in groups.items():
        absorber, reason = _absorber(qg, producer, consumers)
        if absorber is None:
            unabsorbed += [(c, reason) for c in consumers]
            continue
        folds.append((producer, consumers, absorber))
    learned = {}
    if sm.alpha == "learned" and (config.weight is not None or config.activation is not None):
        from qpass.passes.learned import learned_scales

        learned = learned_scales(qg, edits, folds, config, calibration)
    for producer, consumers, absorber in folds:
        _fold_group(qg, edits, absorber, producer, consumers, config, calibration, report, learned.get(producer))
        smoothed += len(consumers)
    smoothed += _multiply_fallback(qg, edits, unabsorbed, config, calibration, report)
    edits.commit()
    return smoothed


def _absorber(qg: QGraph, producer: fx.Node, consumers: list[Consumer]) -> tuple[Absorber | None, str]:
    if any(c.walk is None for c in consumers):
        return None, next(c.why for c in consumers if c.walk is None)
    channels = consumers[0].walk.probes[producer].shape[-1]
    scaled = torch.zeros(channels, dtype=torch.bool)
    for c in consumers:
        scaled[c.walk.index] = True
    refused = ""
    for pattern in PATTERNS:
        try:
            absorber = pattern.match(qg, producer, scaled)
        except NotChannelPreserving as e:
            absorber, refused = None, f"; {e}"
        if absorber is not None:
            break
    else:
        return None, f"nothing before the linear can absorb 1/s (it reads {_describe(producer)}){refused}"
    if absorber.experts is not None and (why := _per_expert_readers(absorber, consumers)) is not None:
        return None, f"cannot fold into {absorber.name} per expert: {why}"
    consumer_paths = [
        Region(c.walk.path, c.walk.probes, scaled) for c in consumers
    ]
    readers = {c.site.reader for c in consumers}
    if (escape := _escape(absorber.regions + consumer_paths, readers)) is not None:
        return None, f"cannot fold into {absorber.name}: {escape}"
    return absorber, ""


def _per_expert_readers(absorber: Absorber, consumers: list[Consumer]) -> str | None:
    """A scale per expert is undone only by grouped matmuls over the same expert segments (``offs``),
    reached without moving rows."""
    from qpass.patterns.experts import moves_rows, rows_of

    for c in consumers:
        if not isinstance(c.site, ExpertsSite) or c.site.offsets is not absorber.offsets:
            return f"{c.site.path} is not a grouped matmul over the same expert segments"
        if c.expert_absmax is None:
            return f"{c.site.path} has no per-expert statistics"
        if (why := moves_rows(c.walk.path, rows_of(c.walk.producer))) is not None:
            return why
    return None


def _escape(regions: list[Region], readers: set[fx.Node]) -> str | None:
    """Who else reads a value the fold would scale; None if nobody does."""
    inside = {n for r in regions for n in r.nodes}
    for region in regions:
        for node in region.nodes:
            for user in node.users:
                if user in inside:
                    if (why := nonlinear_use(user, node, inside)) is not None:
                        return why
                    continue
                if user in readers and _reads_as_input(user, node):
                    continue
                if _reads_unscaled_channels(user, node, region):
                    continue
                return f"{node.name} is also read by {_describe(user)}"
    return None


def _reads_as_input(linear: fx.Node, node: fx.Node) -> bool:
    data = linear.args[1] if linear.target is torch.addmm else linear.args[0]
    return data is node and sum(a is node for a in linear.args) == 1


def _reads_unscaled_channels(user: fx.Node, node: fx.Node, region: Region) -> bool:
    """A slice (``getitem``) of ``node`` that only touches channels the fold leaves alone."""
    from qpass.patterns.walk import replay

    if node not in region.probes or not (user.op == "call_function" and user.target.__name__ == "getitem"):
        return False
    try:
        channels = replay(user, region.probes).round().long().unique()
    except Exception:
        return False
    return not bool(region.scaled[channels].any())


def _describe(node: fx.Node) -> str:
    if node.op == "output":
        return "the graph output (e.g. a returned KV cache)"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


def _group_scales(
    qg: QGraph,
    consumers: list[Consumer],
    weights: list[torch.Tensor],
    channels: int,
    alpha: float,
    pow2: bool = False,
) -> torch.Tensor:
    """Shared scale per producer channel: the max activation and weight over every
    consumer channel that reads it (GQA: all query heads of one value head).

    ``pow2``: each scale rounded to the nearest power of two (in log2), so that in a half dtype
    ``w * s`` and ``gamma / s`` are exact and the fold changes no bit of the function."""
    a = torch.zeros(channels)
    w = torch.zeros(channels)
    for c, weight in zip(consumers, weights):
        idx = c.walk.index if c.walk is not None else torch.arange(channels)
        a.scatter_reduce_(0, idx, c.act_absmax.float(), "amax")
        w.scatter_reduce_(0, idx, weight_absmax(c.site, weight), "amax")
    s = smoothing_scales(a, w, alpha)
    return torch.exp2(torch.round(torch.log2(s))) if pow2 else s


def _expert_scales(consumers: list[Consumer], weights: list[torch.Tensor], experts: int, channels: int,
                   alpha: float | torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """(E, channels): ``_group_scales`` for each expert, from the tokens routed to it and its own
    weights, at one ``alpha`` or at an alpha per expert ((E,)). An expert no calibration token
    reached keeps s = 1."""
    a = torch.zeros(experts, channels)
    w = torch.zeros(experts, channels)
    for c, weight in zip(consumers, weights):
        idx = c.walk.index.expand(experts, -1)
        a.scatter_reduce_(1, idx, c.expert_absmax.float(), "amax")
        w.scatter_reduce_(1, idx, weight_absmax(c.site, weight, per_expert=True), "amax")
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.double()[:, None].expand(experts, channels).flatten()
    s = smoothing_scales(a.flatten(), w.flatten(), alpha).view(experts, channels)
    return torch.exp2(torch.round(torch.log2(s))) if pow2 else s


def _outlier_ratio(a: torch.Tensor) -> float:
    a = a.float().abs()
    med = a.median().clamp(min=1e-12)
    return float(a.max() / med)


def _fold_group(qg, edits, absorber, producer, consumers, config, calibration, report, learned=None) -> None:
    """Fold one group's factors: closed form, or ``learned`` ((factors, note) from ``Smoothing("learned")``)."""
    channels = consumers[0].walk.probes[producer].shape[-1]
    weights = [edits.weight(c.site) for c in consumers]
    pow2 = _pow2_scales(qg, config, consumers, producer)
    note = ""
    if absorber.experts is not None and learned is None:  # a fold per expert: an alpha per expert
        alpha = _expert_alphas(qg, config, calibration, consumers, weights, absorber.experts, channels, pow2)
        s = _expert_scales(consumers, weights, absorber.experts, channels, alpha, pow2)
    elif learned is not None:  # the start's alpha, if that block learned (factors read back: not searched)
        alpha = qg.memo.get(("alpha", tuple(c.site.path for c in consumers), False))
    else:
        alpha = _alpha(qg, config, calibration, consumers, weights, channels, pow2)
    if learned is not None:
        s, note = learned
    elif absorber.experts is None:
        s = _group_scales(qg, consumers, weights, channels, alpha, pow2)
    absorber.fold(edits, s)
    for c, w in zip(consumers, weights):
        sc = s[..., c.walk.index]
        edits.set_weight(c.site, scale_columns(c.site, w, sc))
        qg.smoothing[c.site.node] = sc
        act = c.expert_absmax if sc.dim() == 2 else c.act_absmax
        kind = f"{absorber.kind} (per expert)" if sc.dim() == 2 else absorber.kind
        _record(report.row(c.site.path), kind, absorber.name, alpha, act, sc, note)
    report.add_match(Match(absorber.kind, absorber.name, tuple(c.site.path for c in consumers)))


def _multiply_fallback(qg, edits, unabsorbed, config, calibration, report) -> int:
    """Smooth linears whose producer cannot absorb 1/s by inserting ``x * (1/s)`` before them.

    Linears that read one input node share one multiply with a scale per channel of that node.
    Linears that read one producer through views of their own (``addmm`` on ``x.view(-1, k)``) share
    one scale per producer channel, as a fold would: one multiply per input node, each with ``1/s``
    gathered through its channel map."""
    by_producer: dict[fx.Node, list[tuple[Consumer, str]]] = {}
    for c, reason in unabsorbed:
        by_producer.setdefault(c.walk.producer if c.walk is not None else c.site.input, []).append((c, reason))
    done = 0
    for producer, group in by_producer.items():
        consumers = [c for c, _ in group]
        reasons = {c.site.path: reason for c, reason in group}
        if config.smoothing.fallback == "skip":
            for c in consumers:
                row = report.row(c.site.path)
                row.smoothing, row.reason = "none", reasons[c.site.path]
            continue
        weights = [edits.weight(c.site) for c in consumers]
        if len({c.site.input for c in consumers}) == 1:  # one input node: a scale per channel of it
            producer = consumers[0].site.input
            consumers = [replace(c, walk=None) for c in consumers]
        channels = next((c.walk.probes[producer].shape[-1] for c in consumers if c.walk is not None),
                        consumers[0].act_absmax.numel())
        pow2 = _pow2_scales(qg, config, consumers, producer)
        alpha = _alpha(qg, config, calibration, consumers, weights, channels, pow2)
        s = _group_scales(qg, consumers, weights, channels, alpha, pow2)
        # In a half dtype ``1/s`` is rounded where it is stored: the columns take the inverse of the
        # rounded value, so ``x * inv`` times them is the unsmoothed product up to the multiply's rounding.
        inv_value = (1.0 / s).to(_dtype(producer))
        s = 1.0 / inv_value.float()
        scaled_inputs: dict[fx.Node, fx.Node] = {}
        for c in sorted(consumers, key=lambda c: _order(qg)(c.site.reader)):
            x = c.site.input
            index = c.walk.index if c.walk is not None else torch.arange(channels)
            if x not in scaled_inputs:
                readers = [d.site.reader for d in consumers if d.site.input is x]
                inv = qg.constant(f"{c.site.path}.smooth_inv_scale", inv_value[index])
                scaled_inputs[x] = qg.call(torch.mul, (x, inv), before=min(readers, key=_order(qg)))
            c.site.reader.replace_input_with(x, scaled_inputs[x])
        for c, w in zip(consumers, weights):
            sc = s[c.walk.index] if c.walk is not None else s
            edits.set_weight(c.site, scale_columns(c.site, w, sc))
            qg.smoothing[c.site.node] = sc
            _record(report.row(c.site.path), "multiply", "inserted mul", alpha, c.act_absmax, sc, reasons[c.site.path])
        report.add_match(Match("multiply", f"mul before {consumers[0].site.path}", tuple(c.site.path for c in consumers)))
        done += len(consumers)
    return done


def _pow2_scales(qg: QGraph, config: QuantConfig, consumers: list[Consumer], producer: fx.Node) -> bool:
    """Powers of two for a group that computes in a half dtype (its weights or the producer's output)
    when nothing is quantized: the scales' values then do not matter, and powers of two fold exactly
    (bf16: bit for bit; fp16: except where a value falls below its normal range). When the linears
    are quantized the scales are not rounded, so a half model gets the scales the presets were
    measured with (on SmolLM2, 2 x 512 tokens, power-of-two scales moved perplexity either way:
    w8a8_dynamic +1.46% against +0.67%, w8a8_static +3.59% against +5.06%); the fold rounds once."""
    if config.weight is not None or config.activation is not None:
        return False
    return _is_half(_dtype(producer)) or any(_is_half(qg.value(c.site.weight_node).dtype) for c in consumers)


def _record(row, kind, absorber, alpha, act_absmax, s, reason) -> None:
    """``alpha``: a float, or (E,) for a fold per expert (the row's ``alpha`` is then their median,
    ``expert_alphas`` each expert's)."""
    if isinstance(alpha, torch.Tensor):
        row.expert_alphas = tuple(round(float(a), 4) for a in alpha)
        alpha = float(alpha.median())
    row.smoothing, row.absorber, row.alpha, row.reason = kind, absorber, alpha, reason
    row.outlier_ratio = (_outlier_ratio(act_absmax), _outlier_ratio(act_absmax / s))


def _alpha(qg, config, calibration, consumers, weights, channels, pow2: bool = False) -> float:
    """``_search_alpha``, once per group of consumers for every graph the backend compiles
    (prefill, decode and each recompile share one choice: ``QGraph.memo``)."""
    key = ("alpha", tuple(c.site.path for c in consumers), pow2)
    if key not in qg.memo:
        qg.memo[key] = _search_alpha(qg, config, calibration, consumers, weights, channels, pow2)
    return qg.memo[key]


def _search_alpha(qg, config, calibration, consumers, weights, channels, pow2: bool = False) -> float:
    """The configured alpha, or for ``"auto"`` the grid value whose quantized layer
    outputs are closest to fp32 on the calibration samples of this group: the sum over its
    consumers of the per-token relative error (``_smoothed_error``); a grouped matmul over fused
    experts counts as one consumer, each expert scored on the samples routed to it and the errors
    averaged over its sampled rows (``_expert_errors``). Routers stay fp32 and are not scored."""
    alpha = config.smoothing.alpha
    if alpha not in ("auto", "learned"):  # learned factors start from the auto-alpha ones
        return float(alpha)
    if config.weight is None and config.activation is None:
        return 0.5  # nothing is quantized: any alpha keeps the function; take the usual one
    problems = _problems(consumers, weights, calibration)
    if not problems:
        return 0.5
    best, best_err = 0.5, float("inf")
    for a in config.smoothing.alpha_grid:
        s = _group_scales(qg, consumers, weights, channels, a, pow2)
        err = 0.0
        for p in problems:
            if isinstance(p, _ExpertsProblem):
                err += float(_decided(config, _expert_errors(config, p, s)).sum()) / p.rows
            else:
                err += _smoothed_error(config, p, s)
        if err < best_err:
            best, best_err = a, err
    return best


def _problems(consumers, weights, calibration) -> list:
    """The scored consumers' calibration problems (linears and fused experts, not routers); empty
    (with a warning) where one of them has no calibration samples."""
    scored = [(c, w) for c, w in zip(consumers, weights) if not c.router]
    stats = [calibration[c.site.path] for c, _ in scored]
    if any(st.samples is None or (isinstance(c.site, ExpertsSite) and st.sample_experts is None)
           for (c, _), st in zip(scored, stats)):
        logger.warning("%s: no calibration samples for alpha='auto'; using 0.5", consumers[0].site.path)
        return []
    return [(_ExpertsProblem if isinstance(c.site, ExpertsSite) else _SmoothingProblem)(c, w, st)
            for (c, w), st in zip(scored, stats)]


def _expert_alphas(qg, config, calibration, consumers, weights, experts: int, channels: int,
                   pow2: bool = False) -> torch.Tensor:
    """(E,): the alpha of each expert in a fold per expert (up rows / down columns of that expert).
    For ``"auto"``, each expert takes the grid value with the smallest quantized output error on
    its own routed samples (an expert's factors change only its own products, so the per-expert
    choices minimise the layer's summed error). An expert without samples takes the alpha best
    for all experts together (its factors are 1 where no token reached it). With static
    activations and ``dynamic_fallback`` the quantize pass decides static or per-token once for the
    layer: each expert's best alpha is taken for both modes, and the pair with the smaller error
    under its own decision wins. Once per fold for every graph (``QGraph.memo``)."""
    key = ("expert_alphas", tuple(c.site.path for c in consumers), pow2)
    if key in qg.memo:
        return qg.memo[key]
    alpha = config.smoothing.alpha
    fixed = alpha not in ("auto", "learned")
    quantized = config.weight is not None or config.activation is not None
    problems = _problems(consumers, weights, calibration) if not fixed and quantized else []
    if not problems:  # a configured alpha; or nothing quantized, or no samples: the usual 0.5
        qg.memo[key] = torch.full((experts,), float(alpha) if fixed else 0.5)
        return qg.memo[key]
    grid = torch.tensor(config.smoothing.alpha_grid, dtype=torch.float64)
    # (grid, modes, E): per-expert errors at each alpha, summed over the fold's grouped matmuls
    errors = torch.stack([
        sum(_expert_errors(config, p, _expert_scales(consumers, weights, experts, channels, float(a), pow2))
            for p in problems)
        for a in grid
    ])
    sampled = torch.stack([p.sampled for p in problems]).any(0)
    candidates = []
    for mode in range(min(errors.shape[1], 2)):  # static, and per-token where the layer may fall back
        pick = errors[:, mode].argmin(0)
        pick = torch.where(sampled, pick, errors[:, mode].sum(1).argmin())
        chosen = errors.gather(0, pick[None, None, :].expand(1, errors.shape[1], -1))[0]
        candidates.append((float(_decided(config, chosen).sum()), pick))
    qg.memo[key] = grid[min(candidates, key=lambda c: c[0])[1]].float()
    return qg.memo[key]


class _ExpertsProblem:
    """A grouped matmul's calibration samples split by the expert they were routed to: per expert
    with samples, its rows, its fp32 weight (N, K) and its fp32 output."""

    def __init__(self, c: Consumer, w: torch.Tensor, stats):
        self.consumer, self.stats = c, stats
        experts = w.shape[0]
        self.parts = []
        self.sampled = torch.zeros(experts, dtype=torch.bool)
        for e in range(experts):
            rows = stats.sample_experts == e
            if not bool(rows.any()):
                continue
            x = stats.samples[rows].float()
            w_e = w[e].t().float()  # the weight argument is (E, K, N)
            ref = x @ w_e.T
            self.parts.append((e, x, w_e, ref, ref.pow(2).sum(dim=1).clamp(min=1e-30)))
            self.sampled[e] = True
        self.experts = experts
        self.rows = max(1, sum(part[1].shape[0] for part in self.parts))


def _expert_errors(config, p: _ExpertsProblem, s: torch.Tensor) -> torch.Tensor:
    """(modes, E): per expert, the per-token relative output errors (``_smoothed_error``'s) summed
    over its sampled rows, quantized after smoothing by ``s`` ((K,), or (E, K) per expert) as the
    quantize pass runs it (``quantize._quantize_experts``: each expert's weight at the config's
    granularity, AdaDim per output channel; static activations at the expert's own calibrated
    range). With static activations and ``dynamic_fallback``, 4 modes: the static run's error,
    per-token dynamic's, and the activation-only errors of each (against the quantized weight's
    output) that decide between them for the whole layer (``_decided``); otherwise 1."""
    c, stats = p.consumer, p.stats
    act, weight = config.activation, config.weight
    fallback = act is not None and not act.dynamic and config.dynamic_fallback is not None
    out = torch.zeros(4 if fallback else 1, p.experts, dtype=torch.float64)
    sc = s[..., c.walk.index] if c.walk is not None else s
    g = None
    if weight is not None:
        g = qmath.adadim_candidates(weight.granularity)[1] if isinstance(weight.granularity, AdaDim) else weight.granularity
    for e, x, w_e, ref, energy in p.parts:
        s_e = sc[e] if sc.dim() == 2 else sc
        x, w = x / s_e, w_e * s_e
        if weight is not None:
            w = qmath.fake_quant_weight(w, weight, g)

        def err(y, ref=ref, energy=energy):
            return float(((y - ref).pow(2).sum(dim=1) / energy).sum())

        if act is None:
            out[0, e] = err(x @ w.T)
            continue
        if act.dynamic:
            out[0, e] = err(qmath.fake_quant_act(x, act) @ w.T)
            continue
        y_static = qmath.fake_quant_act(x, act, *qmath.static_act_qparams(stats.min[e] / s_e, stats.max[e] / s_e, act)) @ w.T
        out[0, e] = err(y_static)
        if fallback:
            y_dynamic = qmath.fake_quant_act(x, replace(act, granularity=PerToken(), dynamic=True)) @ w.T
            out[1, e] = err(y_dynamic)
            act_ref = x @ w.T
            n = x.shape[0]
            out[2, e] = qmath.token_error(y_static, act_ref) * n
            out[3, e] = qmath.token_error(y_dynamic, act_ref) * n
    return out


def _decided(config, errors: torch.Tensor) -> torch.Tensor:
    """(E,): the per-expert errors of the mode the quantize pass runs: static unless its activation
    error over all experts' samples is over ``dynamic_fallback`` times per-token's
    (``quantize._experts_static_or_dynamic``)."""
    if errors.shape[0] == 1:
        return errors[0]
    return errors[0] if float(errors[2].sum()) <= config.dynamic_fallback * float(errors[3].sum()) else errors[1]


class _SmoothingProblem:
    """One consumer's calibration samples, fp32 weight (N, K) and fp32 output, which
    smoothing does not change (``(x / s) @ (W * s).T == x @ W.T``)."""

    def __init__(self, c: Consumer, w: torch.Tensor, stats):
        self.consumer, self.stats = c, stats
        self.w = (w.t() if c.site.weight_t else w).float()
        self.ref = stats.samples @ self.w.T
        self.row_energy = self.ref.pow(2).sum(dim=1).clamp(min=1e-30)  # one per sampled token


def _smoothed_error(config, p: _SmoothingProblem, s: torch.Tensor) -> float:
    """Relative output error of one consumer quantized after smoothing by ``s``, averaged
    over tokens: ``mean_i |y_i - ref_i|^2 / |ref_i|^2``. Every token counts the same, as in
    perplexity; pooled over tokens (``sum |y - ref|^2 / sum |ref|^2``), the few tokens with
    massive activations (SmolLM2's first position: 500x the median row norm at down_proj)
    hold ~100% of the energy and decided alpha alone.

    With ``dynamic_fallback``, static activations are scored as the quantize pass will run
    them at this alpha: per-token dynamic where the static scale loses by more than the factor."""
    c, stats = p.consumer, p.stats
    sc = s[c.walk.index] if c.walk is not None else s
    act, weight = config.activation, config.weight
    x = stats.samples / sc
    w = p.w * sc
    if weight is not None:
        g = qmath.adadim_candidates(weight.granularity)[1] if isinstance(weight.granularity, AdaDim) else weight.granularity
        w = qmath.fake_quant_weight(w, weight, g)
    if act is None:
        y = x @ w.T
    elif act.dynamic:
        y = qmath.fake_quant_act(x, act) @ w.T
    elif config.dynamic_fallback is not None:  # the quantize pass's own decision at this alpha
        y = qmath.static_or_per_token(x, w, act, stats.min / sc, stats.max / sc, config.dynamic_fallback).y
    else:
        y = qmath.fake_quant_act(x, act, *qmath.static_act_qparams(stats.min / sc, stats.max / sc, act)) @ w.T
    return float(((y - p.ref).pow(2).sum(dim=1) / p.row_energy).mean())


def _wpos(site: LinearSite) -> int:
    return site.weight_arg[1]  # of site.weight_arg[0]: the matmul under a bias add, not site.node


def _dtype(node: fx.Node) -> torch.dtype:
    val = node.meta.get("example_value", node.meta.get("val"))
    return val.dtype if isinstance(val, torch.Tensor) else torch.float32


def _order(qg: QGraph):
    pos = {n: i for i, n in enumerate(qg.graph.nodes)}
    return lambda n: pos[n]
