"""Checks at the backend's door: what qpass refuses, and what it runs differently and says so.

Each check runs before any pass touches the graph, so a refusal costs no compile work, and
each fallback is decided in one place and reported once per cause (the list in the report).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qpass.calibration import Calibration, ChannelStats
from qpass.config import QuantConfig, skip_matches
from qpass.graph import QGraph
from qpass.report import Report

logger = logging.getLogger(__name__)

__all__ = ["check_grad_mode", "vet_calibration", "warn_unmatched_skips", "report_unhandled_experts", "warn_eager_experts"]


def check_grad_mode(example_inputs: list) -> None:
    """qpass compiles inference graphs: its rewritten weights are constants, so gradients would
    silently miss every parameter they replace. Refuse a graph that autograd would differentiate."""
    if not torch.is_grad_enabled():
        return
    if any(isinstance(v, torch.Tensor) and v.requires_grad for v in example_inputs):
        raise RuntimeError(
            "qpass compiles models for inference only (its quantized weights are constants, so gradients "
            "would be wrong); run the compiled model under torch.no_grad() or torch.inference_mode()"
        )


@dataclass(frozen=True)
class _Unusable:
    path: str
    cause: str  # one of _CAUSES
    detail: str


_CAUSES = {
    "missing": "no calibration statistics (the layer did not run during calibration)",
    "shape": "statistics for another input width",
    "nonfinite": "non-finite statistics (NaN/inf inputs during calibration)",
    "empty": "statistics of all-zero or no inputs",
}


def _problem(stats: ChannelStats | None, k: int, experts: int | None = None) -> tuple[str, str] | None:
    """``experts``: the number of experts of fused expert weights (per-expert statistics, (E, K))."""
    if stats is None:
        return "missing", _CAUSES["missing"]
    if stats.absmax.shape[-1] != k:
        return "shape", f"calibrated for {stats.absmax.shape[-1]} input channels, the layer has {k}"
    if (experts is not None) != stats.per_expert:
        return "shape", ("per-expert statistics for a linear" if experts is None
                         else "statistics of one linear for fused expert weights (recalibrate with this qpass)")
    if experts is not None and stats.absmax.shape[0] != experts:
        return "shape", f"calibrated for {stats.absmax.shape[0]} experts, the layer has {experts}"
    tensors = [stats.absmax, stats.min, stats.max] + ([stats.samples] if stats.samples is not None else [])
    if stats.nonfinite or not all(bool(torch.isfinite(t).all()) for t in tensors):
        return "nonfinite", f"{stats.nonfinite} non-finite input values during calibration"
    if stats.tokens == 0 or float(stats.absmax.max()) == 0.0:
        return "empty", _CAUSES["empty"]
    return None


def vet_calibration(qg: QGraph, config: QuantConfig, calibration: Calibration | None, report: Report) -> Calibration | None:
    """The part of ``calibration`` the passes may trust for this graph.

    A layer whose statistics are missing, of another width, non-finite or empty is left out: it is
    not smoothed, and static activations, outlier splits and searches fall back to what needs no
    statistics (per-token dynamic scales); its report row says why, and one warning lists them all.
    A calibration that fits no linear of the graph, or has another width for most of them (another
    model's), is an error naming the first misfit, raised before any pass runs.
    """
    if calibration is None:
        return None
    # a router is never quantized and smoothing takes its scales from the other readers of its input
    linears = [s for s in qg.linears() if not qg.is_router(s)]
    sites = [s for s in (*linears, *qg.experts()) if not config.skips(s.path) and not _needs_no_stats(config, s.path)]
    problems: list[_Unusable] = []
    for site in sites:
        w = qg.value(site.weight_node)
        experts = w.shape[0] if w.dim() == 3 else None
        found = _problem(calibration.get(site.path), w.shape[site.in_dim], experts)
        if found is not None:
            problems.append(_Unusable(site.path, *found))
    misfits = [p for p in problems if p.cause == "shape"]
    if sites and (len(problems) == len(sites) or 2 * len(misfits) > len(sites)):
        _refuse(calibration, problems)  # another model's calibration: no layer-by-layer fallback
    for p in problems:
        row = report.row(p.path)
        row.calibration = p.detail
    if problems:
        by_cause: dict[str, list[str]] = {}
        for p in problems:
            by_cause.setdefault(p.cause, []).append(p.path if p.cause != "shape" else f"{p.path} ({p.detail})")
        needs_stats = [what for what, used in (
            ("not smoothed", config.smoothing is not None),
            ("per-token dynamic instead of static scales", config.activation is not None and not config.activation.dynamic),
            ("no outlier split", config.outliers is not None),
        ) if used]
        logger.warning(
            "qpass: %d of %d linears have unusable calibration statistics (%s): %s",
            len(problems), len(sites), ", ".join(needs_stats) or "unused by this config",
            "; ".join(f"{_CAUSES[c]}: {', '.join(paths)}" for c, paths in by_cause.items()),
        )
    bad = {p.path for p in problems}
    vetted = Calibration({path: st for path, st in calibration.items() if path not in bad})
    vetted.learned = calibration.learned  # shared: factors learned on the vetted copy are kept with the original
    return vetted


def _needs_no_stats(config: QuantConfig, path: str) -> bool:
    """A layer whose statistics nothing would use: weight-only, or no smoothing, per-token dynamic, no outlier split."""
    return config.quantizes_weight_only(path) or (config.smoothing is None and config.outliers is None and config.runs_dynamic(path))


def _refuse(calibration: Calibration, problems: list[_Unusable]) -> None:
    first = next((p for p in problems if p.cause != "missing"), problems[0])
    if first.cause == "missing":
        relative = [k for k in calibration if k.endswith("." + first.path)]
        if relative:
            raise ValueError(
                f"qpass: this graph names its layers relative to a submodule ({first.path!r}; the calibration "
                f"has {relative[0]!r}): Dynamo broke the graph inside a module. Tell the backend the model's "
                "module paths with backend.bind(model), or compile with qpass.compile(model, ...)"
            )
        example = next(iter(calibration), None)
        raise ValueError(
            f"qpass: the calibration does not fit this model: it has no statistics for any of its linears "
            f"(first: {first.path}; the calibration holds {len(calibration)} layers, e.g. {example})"
        )
    raise ValueError(f"qpass: the calibration does not fit this model: {first.path}: {first.detail}")


def warn_unmatched_skips(config: QuantConfig, paths: list[str], known: list[str], warned: set[str]) -> None:
    """One warning listing the ``skip`` patterns that match no linear of a compiled graph
    (a misspelt ``"lm_heaad"`` would otherwise quietly quantize ``lm_head``). ``known`` are the
    model's other module paths the backend knows (calibration, ``bind``): after a graph break,
    ``lm_head`` is in another graph than the first layers."""
    if config.skip == QuantConfig.__dataclass_fields__["skip"].default or not paths:
        return
    unmatched = [
        s for s in config.skip
        if s not in warned and not any(skip_matches(s, p) for p in (*paths, *known))
    ]
    if unmatched:
        warned.update(unmatched)
        logger.warning(
            "qpass: skip pattern(s) %s match no linear of the compiled graph (%d linears, e.g. %s); check the spelling",
            ", ".join(repr(s) for s in unmatched), len(paths), paths[0],
        )


def report_unhandled_experts(qg: QGraph, report: Report, warned: set[str]) -> None:
    """A parameter of three or more dimensions (fused expert weights, a convolution) that a graph reads other than
    through a grouped matmul qpass knows (``batched_mm`` gathers ``W[expert_ids]`` for a bmm; a
    custom kernel) stays in full precision: a report row and one warning per backend saying which op
    reads it."""
    handled = {s.param for s in qg.experts()}
    missed = []
    for node, (path, value) in qg.params.items():
        if value.dim() < 3 or not value.is_floating_point() or node in handled or not node.users:
            continue
        readers = ", ".join(sorted({_op_name(u) for u in node.users}))
        row = report.row(path)
        row.weight = row.activation = "fp32"
        row.reason = f"read by {readers}, not a grouped matmul qpass quantizes: kept in full precision"
        if path not in warned:
            warned.add(path)
            missed.append(f"{path} ({readers})")
    if missed:
        logger.warning(
            "qpass: %d weight tensors of three or more dimensions (fused experts, convolutions) stay in full precision: "
            "their graph reads them through ops that are not a grouped matmul (for MoE experts, set "
            "config._experts_implementation = 'grouped_mm'): %s", len(missed), "; ".join(missed),
        )


def _op_name(node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def warn_eager_experts(model: torch.nn.Module, report: Report) -> None:
    """Experts that run transformers' eager per-expert loop (``config._experts_implementation ==
    'eager'``): its data-dependent loop breaks Dynamo's graph and runs outside every qpass graph, so
    their weights stay in full precision. One warning naming the parameters; a report row for each."""
    paths = []
    for name, module in model.named_modules():
        impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
        if impl != "eager" or not hasattr(type(module), "_apply_gate"):
            continue  # only modules built by transformers' use_experts_implementation have _apply_gate
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 3:
                path = f"{name}.{pname}" if name else pname
                row = report.row(path)
                row.weight = row.activation = "fp32 (ran eagerly)"
                row.reason = ("experts run the eager per-expert loop (config._experts_implementation='eager'), "
                              "outside any compiled graph: kept in full precision; use 'grouped_mm'")
                paths.append(path)
    if paths:
        logger.warning(
            "qpass: %d expert weight tensors of %s stay in full precision: config._experts_implementation is 'eager', "
            "whose per-expert loop runs outside every compiled graph (set it to 'grouped_mm'): %s",
            len(paths), type(model).__name__, ", ".join(paths),
        )
