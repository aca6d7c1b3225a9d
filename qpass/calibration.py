"""Calibration: per-input-channel statistics of every linear's input, keyed by module path.

``calibrate(model, batches)`` runs the eager model once per batch with forward
pre-hooks on its linears and records, per input channel, the absmax, min and max
over all tokens, plus a small strided sample of input rows that the searches
(auto-alpha, AdaDim) use to measure layer-output error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["ChannelStats", "Calibration", "calibrate", "is_linear_module"]

_FORMAT_VERSION = 1


@dataclass
class ChannelStats:
    """Statistics of one linear's input, one entry per input channel (length K)."""

    absmax: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    tokens: int
    samples: torch.Tensor | None = None  # (rows, K) strided sample of input rows
    nonfinite: int = 0  # input values that were NaN or inf (excluded from the stats)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("absmax", "min", "max", "tokens", "samples", "nonfinite")}


class Calibration(Mapping[str, ChannelStats]):
    """Read-only mapping from module path (``model.layers.0.mlp.down_proj``) to stats, held on
    CPU whatever device the model was calibrated on (the passes do their offline math there)."""

    def __init__(self, stats: dict[str, ChannelStats]):
        self._stats = {p: _on_cpu(st) for p, st in stats.items()}

    def __getitem__(self, path: str) -> ChannelStats:
        return self._stats[path]

    def __iter__(self):
        return iter(self._stats)

    def __len__(self) -> int:
        return len(self._stats)

    def __repr__(self) -> str:
        return f"Calibration({len(self)} linears)"

    def save(self, path: str | Path) -> None:
        payload = {"version": _FORMAT_VERSION, "stats": {k: v.to_dict() for k, v in self._stats.items()}}
        torch.save(payload, path)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        payload = torch.load(path, weights_only=True)
        if payload.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: calibration format {payload.get('version')!r}, expected {_FORMAT_VERSION}")
        return cls({k: ChannelStats(**v) for k, v in payload["stats"].items()})


def _on_cpu(stats: ChannelStats) -> ChannelStats:
    moved = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in stats.to_dict().items()}
    return ChannelStats(**moved)


def is_linear_module(module: nn.Module) -> bool:
    """nn.Linear and GPT-2 style Conv1D (weight stored as (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


class _Recorder:
    def __init__(self, path: str, rows_per_batch: int):
        self.path = path
        self.rows_per_batch = rows_per_batch
        self.absmax = self.min = self.max = None
        self.tokens = 0
        self.nonfinite = 0
        self.samples: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            self.nonfinite += int((~finite).sum())
            x = torch.where(finite, x, torch.zeros((), dtype=x.dtype))
        lo, hi = x.amin(0), x.amax(0)
        if self.absmax is None:
            self.min, self.max = lo, hi
        else:
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)
        self.absmax = torch.maximum(self.max.abs(), self.min.abs())
        self.tokens += x.shape[0]
        if self.rows_per_batch:
            stride = max(1, x.shape[0] // self.rows_per_batch)
            self.samples.append(x[::stride][: self.rows_per_batch].clone())

    def stats(self) -> ChannelStats:
        if self.nonfinite:
            logger.warning("%s: %d non-finite input values seen during calibration (ignored)", self.path, self.nonfinite)
        return ChannelStats(
            absmax=self.absmax,
            min=self.min,
            max=self.max,
            tokens=self.tokens,
            samples=torch.cat(self.samples) if self.samples else None,
            nonfinite=self.nonfinite,
        )


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        raise TypeError(f"calibrate: a batch must be a tensor, a dict of kwargs or a tuple of args, got {type(batch)}")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    samples: int = 256,
    progress: bool | None = None,
) -> Calibration:
    """Record input statistics of every linear of ``model`` over ``batches``.

    ``batches`` holds model inputs: tensors (``model(t)``), dicts (``model(**d)``)
    or tuples (``model(*t)``). ``samples`` input rows per linear are kept for the
    error-driven searches (auto-alpha, AdaDim); 0 keeps none. The model runs in
    eval mode and is restored to its previous mode; its weights are not touched.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate: the batch list is empty; pass at least one model input")
    rows_per_batch = math.ceil(samples / len(batches)) if samples else 0
    recorders: dict[str, _Recorder] = {}
    handles = []
    for path, module in model.named_modules():
        if is_linear_module(module):
            recorders[path] = _Recorder(path, rows_per_batch)
            handles.append(module.register_forward_pre_hook(recorders[path]))
    if not recorders:
        raise ValueError(f"calibrate: {type(model).__name__} has no nn.Linear or Conv1D layers")
    was_training = model.training
    model.eval()
    try:
        show = progress if progress is not None else len(batches) > 4
        for batch in tqdm(batches, desc="qpass calibrate", disable=not show, unit="batch"):
            _run(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    unseen = [p for p, r in recorders.items() if r.absmax is None]
    for p in unseen:
        logger.warning("%s: never called during calibration; it will not be smoothed", p)
    stats = {p: r.stats() for p, r in recorders.items() if r.absmax is not None}
    logger.info("calibrated %d linears on %d batches", len(stats), len(batches))
    return Calibration(stats)
