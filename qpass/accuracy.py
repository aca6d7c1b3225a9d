"""Accuracy harness: perplexity of a model compiled with each of several configs.

    calib = qpass.calibrate(model, realdata.calibration_batches(tok, 16, 512))
    windows = realdata.eval_windows(tok, 1024, 20 * 1024)
    results = evaluate(model, calib, windows, ["w8a8_dynamic", ("no smoothing", cfg)])
    print(format_table(results))
    # the lowered kernels of this CPU, on the calibration's text and on another one:
    texts = {"wiki": windows, "news": realdata.news_eval_windows(tok, 512, 4 * 512)}
    results = evaluate(model, calib, texts, ["w8a8_static"], lower=True, inductor=False)

Every config is compiled from scratch (``torch._dynamo.reset()``, FX graph cache
off). By default (``lower=False``) the numbers measure the quantization scheme through
the reference quant/dequant ops; ``lower=True`` measures the kernels this CPU runs.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Union

import torch
from torch import nn

from qpass import qmath
from qpass.backend import backend as make_backend
from qpass.calibration import Calibration
from qpass.config import QuantConfig
from qpass.presets import preset
from qpass.realdata import perplexity
from qpass.report import Report

logger = logging.getLogger(__name__)

__all__ = ["Result", "PresetSpec", "evaluate", "format_table", "to_json", "FP32"]

#: A preset name from ``qpass.PRESETS``, or a ``(label, QuantConfig)`` pair.
PresetSpec = Union[str, tuple[str, QuantConfig]]

FP32 = "fp32"


@dataclass(frozen=True)
class Result:
    """One evaluated configuration.

    ``rel_change`` is ``perplexity / fp32 - 1`` (``None`` without an fp32 run);
    ``seconds`` covers compilation and every window, of which ``compile_seconds``
    estimates the compilation (first call minus the median later call).
    ``patterns`` counts folded smoothing patterns per kind; ``alphas`` maps each
    smoothed linear to its alpha (chosen per group when ``alpha="auto"``).
    ``fallbacks`` and ``outlier_channels`` count what the report says ran differently from the
    config's main path: per-token layers of a static config, fp32 input channels of an outlier split.
    ``kernels`` counts the linears per kernel column of the report (``lower=True``), e.g.
    ``{"onednn (7-bit weights)": 150, "onednn (7-bit act)": 60}``.
    """

    name: str
    perplexity: float
    rel_change: float | None
    seconds: float
    compile_seconds: float
    config: str = ""
    patterns: dict[str, int] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    auto_alpha: bool = False
    linears: int = 0
    quantized: int = 0
    fallbacks: int = 0  # linears of a static config that run per-token dynamic (``dynamic_fallback``)
    outlier_channels: int = 0  # input channels kept fp32 by an outlier split, over every linear
    kernels: dict[str, int] = field(default_factory=dict)  # lowered linears per report kernel label
    error: str | None = None
    # Every text's perplexity and change vs fp32 on that text, when ``evaluate`` was given several
    # (``{"wiki": (20.4, 0.007), "news": (31.2, 0.009)}``); the first is ``perplexity`` / ``rel_change``.
    texts: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    # Per linear, what the report's note says (fallback decisions, the kernel grid's calibration errors).
    notes: dict[str, str] = field(default_factory=dict)

    def alpha_summary(self) -> str:
        """``"auto: 0.3x12 0.8x48"`` or ``"0.5"``: the alphas and how many linears took each."""
        if not self.alphas:
            return ""
        counts = Counter(round(a, 3) for a in self.alphas.values())
        if not self.auto_alpha and len(counts) == 1:
            return f"{next(iter(counts)):g}"
        body = " ".join(f"{a:g}x{n}" for a, n in sorted(counts.items()))
        return f"auto: {body}" if self.auto_alpha else body


def _resolve(spec: PresetSpec) -> tuple[str, QuantConfig]:
    if isinstance(spec, str):
        return spec, preset(spec)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], QuantConfig):
        return spec
    raise TypeError(f"evaluate: a preset is a name or a (name, QuantConfig) pair, got {spec!r}")


def _describe(config: QuantConfig) -> str:
    """``W int8 per-output-channel; A int8 per-tensor static; smooth alpha=auto``."""

    def spec(s, act: bool) -> str:
        if s is None:
            return "fp32"
        mode = (" dynamic" if s.dynamic else " static") if act else ""
        return f"{s.dtype} {qmath.describe(s.granularity)}{mode}{qmath.asym_label(s)}"

    sm = config.smoothing
    smoothing = "none" if sm is None else f"alpha={sm.alpha}"
    parts = [f"W {spec(config.weight, False)}", f"A {spec(config.activation, True)}", f"smooth {smoothing}"]
    if config.outliers is not None:
        o = config.outliers
        if o.threshold is not None:
            parts.append(f"outliers >{o.threshold:g}")
        elif o.ratio is not None:
            parts.append(f"outliers >{o.ratio:g}x median")
        else:
            parts.append(f"outliers top{o.top_k}")
    if config.dynamic_fallback is not None:
        parts.append(f"per-token where static loses >{config.dynamic_fallback:g}x")
    if config.skip != ("lm_head",):
        parts.append(f"skip {','.join(config.skip)}")
    return "; ".join(parts)


class _Timed:
    """Wraps a callable and records the wall time of every call."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.times: list[float] = []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.times.append(time.perf_counter() - start)
        return out

    def compile_seconds(self) -> float:
        if len(self.times) < 2:
            return float("nan")
        return max(0.0, self.times[0] - statistics.median(self.times[1:]))


def _summary(report: Report, config: QuantConfig) -> dict[str, Any]:
    alphas = {path: float(r.alpha) for path, r in report.rows.items() if r.alpha is not None}
    quantized = sum(1 for r in report.rows.values() if r.weight and not r.weight.startswith("fp32"))
    return {
        "fallbacks": sum(r.per_token_fallback for r in report.rows.values()),
        "outlier_channels": sum(r.outlier_channels for r in report.rows.values()),
        "patterns": dict(sorted(report.counts().items())),
        "alphas": alphas,
        "auto_alpha": config.smoothing is not None and config.smoothing.alpha == "auto",
        "kernels": dict(sorted(Counter(r.kernel for r in report.rows.values() if r.kernel).items())),
        "linears": len(report.rows),
        "quantized": quantized,
        "notes": {path: r.reason for path, r in report.rows.items() if r.reason},
    }


def _run(fn: Callable, texts: Mapping[str, Sequence[torch.Tensor]]) -> tuple[dict[str, float], float, float]:
    """Perplexity of ``fn`` on each text's windows, the total seconds and the compile estimate."""
    timed = _Timed(fn)
    start = time.perf_counter()
    with torch.no_grad():
        ppl = {text: perplexity(timed, windows) for text, windows in texts.items()}
    return ppl, time.perf_counter() - start, timed.compile_seconds()


def evaluate(
    model: nn.Module,
    calibration: Calibration | None,
    windows: Sequence[torch.Tensor] | Mapping[str, Sequence[torch.Tensor]],
    presets: Sequence[PresetSpec],
    *,
    fp32: bool = True,
    compile_fp32: bool = False,
    on_error: Literal["raise", "record"] = "raise",
    lower: bool = False,
    inductor: bool = True,
) -> list[Result]:
    """Perplexity on ``windows`` of fp32 (if ``fp32``) and of ``model`` compiled with each preset.

    ``presets`` holds preset names or ``(label, QuantConfig)`` pairs. Each runs as
    ``torch.compile(model, backend=qpass.backend(config.replace(lower=lower),
    calibration=calibration), dynamic=False)`` after ``torch._dynamo.reset()``,
    called as ``compiled(ids, use_cache=False)`` under ``no_grad``. The fp32
    reference runs eagerly, or through Inductor with ``compile_fp32=True``.
    ``on_error="record"`` turns a failing preset into a row with ``error`` set
    and NaN perplexity instead of raising. ``lower=True`` measures the lowered kernels
    (their integer grid) instead of the reference fake-quant path. ``inductor=False`` runs
    each rewritten graph eagerly (``qpass.backend(..., inductor=False)``): the same ops, so the
    same numbers up to float summation order, without Inductor's compile time (minutes for a
    30-layer model on 2 cores).

    ``windows`` may map text names to windows (``{"wiki": [...], "news": [...]}``): each config is
    compiled once and evaluated on every text; ``Result.texts`` holds each text's perplexity and
    change vs fp32 on the same text, and the first text fills ``perplexity`` / ``rel_change``.
    """
    resolved = [_resolve(p) for p in presets]
    texts = dict(windows) if isinstance(windows, Mapping) else {"": windows}
    if not texts:
        raise ValueError("evaluate: no text to evaluate on")
    first = next(iter(texts))
    results: list[Result] = []
    base: dict[str, float] = {}

    def per_text(ppl: dict[str, float]) -> dict[str, tuple[float, float | None]]:
        if not isinstance(windows, Mapping):
            return {}
        return {t: (p, None if t not in base else p / base[t] - 1.0) for t, p in ppl.items()}

    if fp32:
        torch._dynamo.reset()
        fn = torch.compile(model, dynamic=False) if compile_fp32 else model
        with torch._inductor.config.patch(fx_graph_cache=False):
            ppl, seconds, compile_s = _run(lambda ids: fn(ids, use_cache=False), texts)
        base = ppl
        results.append(Result(FP32, ppl[first], 0.0, seconds, compile_s if compile_fp32 else math.nan,
                              "inductor" if compile_fp32 else "eager", texts=per_text(ppl)))
        logger.info("%s: perplexity %s (%.1f s)", FP32, ", ".join(f"{t or 'text'} {p:.4f}" for t, p in ppl.items()), seconds)
        torch._dynamo.reset()

    for name, config in resolved:
        config = config.replace(lower=lower)
        be = make_backend(config, calibration=calibration, inductor=inductor)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, backend=be, dynamic=False)
            # A cache hit must never stand in for a graph our passes rewrote differently.
            with torch._inductor.config.patch(fx_graph_cache=False):
                ppl, seconds, compile_s = _run(lambda ids: compiled(ids, use_cache=False), texts)
        except Exception as e:  # noqa: BLE001 - recorded or re-raised below
            if on_error == "raise":
                raise
            logger.exception("%s failed", name)
            results.append(Result(name, math.nan, None, math.nan, math.nan, _describe(config),
                                  error=f"{type(e).__name__}: {e}"))
            continue
        finally:
            torch._dynamo.reset()
        rel = None if first not in base else ppl[first] / base[first] - 1.0
        results.append(Result(name, ppl[first], rel, seconds, compile_s, _describe(config), texts=per_text(ppl),
                              **_summary(be.report, config)))
        logger.info("%s: perplexity %s (%.1f s)", name, ", ".join(
            f"{t or 'text'} {p:.4f}" + ("" if t not in base else f" ({100 * (p / base[t] - 1):+.2f}% vs fp32)")
            for t, p in ppl.items()), seconds)
        logger.debug("%s report:\n%s", name, be.report)
    return results


def format_table(results: Sequence[Result]) -> str:
    """A markdown table: one row per result."""
    head = ("config", "perplexity", "vs fp32", "seconds", "compile s", "folded patterns", "alpha", "description")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        if r.error is not None:
            cells = (r.name, "failed", "", "", "", "", "", r.error.replace("|", "/")[:120])
        else:
            rel = "" if r.rel_change is None else ("" if r.name == FP32 else f"{100 * r.rel_change:+.2f}%")
            patterns = ", ".join(f"{k} {v}" for k, v in r.patterns.items())
            comp = "" if math.isnan(r.compile_seconds) else f"{r.compile_seconds:.0f}"
            notes = [r.config]
            if r.fallbacks:
                notes.append(f"{r.fallbacks} of {r.quantized} linears per-token")
            if r.outlier_channels:
                notes.append(f"{r.outlier_channels} fp32 input channels")
            if r.kernels:
                notes.append("kernels " + ", ".join(f"{k} x{n}" for k, n in r.kernels.items()))
            cells = (r.name, f"{r.perplexity:.3f}", rel, f"{r.seconds:.0f}", comp, patterns, r.alpha_summary(),
                     "; ".join(notes))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(results: Sequence[Result]) -> dict:
    """Plain JSON-able dict: ``{"fp32": ppl or None, "results": [...]}``; NaN becomes None."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    base = next((r.perplexity for r in results if r.name == FP32), None)
    rows = []
    for r in results:
        row = clean(asdict(r))
        row["texts"] = {t: {"perplexity": clean(p), "rel_change": clean(rel)} for t, (p, rel) in r.texts.items()}
        row["alpha_summary"] = r.alpha_summary()
        rows.append(row)
    return {"fp32": clean(base), "results": rows}
