"""Calibration: per-input-channel statistics of every linear's input, keyed by module path.

``calibrate(model, batches)`` runs the eager model once per batch with forward
pre-hooks on its linears and records, per input channel, the absmax, min and max
over all tokens, plus a small strided sample of input rows that the searches
(auto-alpha, AdaDim) use to measure layer-output error. Positions a batch's
``attention_mask`` marks as padding are left out.

``Calibration.save`` writes a safetensors file (format version 2) whose header holds the
token counts and a sha256 checksum, and the smoothing factors ``Smoothing("learned")`` learned
from these statistics (``Calibration.learned``; tensors ``learned/<key>``, their keys in the
header's ``learned`` entry, covered by the checksum); ``Calibration.load`` refuses any file that is corrupt,
truncated, foreign or of another format version with one ``CalibrationFileError`` naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["ChannelStats", "Calibration", "CalibrationFileError", "calibrate", "is_linear_module", "is_experts_module"]

_FORMAT = "qpass.calibration"
_FORMAT_VERSION = 2
_TENSORS = ("absmax", "min", "max", "samples", "expert_tokens", "sample_experts")  # stored as "<module path>/<field>"
_LEARNED = "learned"  # tensor name prefix of learned smoothing factors (no module path is "learned")
_RECALIBRATE = "recalibrate and save again: qpass.calibrate(model, batches).save(path)"


class CalibrationFileError(ValueError):
    """A calibration file that cannot be loaded: corrupt, truncated, foreign or of another format version."""


@dataclass
class ChannelStats:
    """Statistics of one linear's input, one entry per input channel (length K)."""

    absmax: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    tokens: int
    samples: torch.Tensor | None = None  # (rows, K) strided sample of input rows
    nonfinite: int = 0  # input values that were NaN or inf (excluded from the stats)
    # Fused expert weights (``...experts.gate_up_proj``): absmax / min / max are (E, K), one row per
    # expert over the tokens routed to it; ``expert_tokens`` (E,) counts them and ``sample_experts``
    # (rows,) names the expert of each sampled row. None for a linear.
    expert_tokens: torch.Tensor | None = None
    sample_experts: torch.Tensor | None = None

    @property
    def per_expert(self) -> bool:
        return self.expert_tokens is not None

    @property
    def channel_absmax(self) -> torch.Tensor:
        """(K,): the absmax per input channel over every token (and every expert)."""
        return self.absmax.amax(0) if self.per_expert else self.absmax

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in (
            "absmax", "min", "max", "tokens", "samples", "nonfinite", "expert_tokens", "sample_experts")}


class Calibration(Mapping[str, ChannelStats]):
    """Read-only mapping from module path (``model.layers.0.mlp.down_proj``) to stats, held on
    CPU whatever device the model was calibrated on (the passes do their offline math there)."""

    def __init__(self, stats: dict[str, ChannelStats]):
        self._stats = {p: _on_cpu(st) for p, st in stats.items()}
        # parameter -> module path in the model calibrated in this process (weakly held; not saved):
        # lets the backend name layers by their full path in graphs Dynamo traced inside a submodule.
        self.param_paths: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.model_class = ""  # class name of that model, for the report and warnings (not saved)
        # Smoothing factors learned from these statistics (``Smoothing("learned")``), keyed by the config
        # they were learned for and the linears of their fold (``qpass.passes.smooth``); saved and loaded.
        self.learned: dict[str, torch.Tensor] = {}

    def __getitem__(self, path: str) -> ChannelStats:
        return self._stats[path]

    def __iter__(self):
        return iter(self._stats)

    def __len__(self) -> int:
        return len(self._stats)

    def __repr__(self) -> str:
        return f"Calibration({len(self)} linears)"

    def save(self, path: str | Path) -> None:
        """Write a safetensors file: tensors ``<module path>/absmax|min|max|samples``, and in the
        header the format name, version, per-path ``tokens`` and ``nonfinite`` counts and a sha256
        checksum. Written to a temporary file in the same folder, then renamed over ``path``, so
        ``path`` never holds a partial file."""
        path = Path(path)
        tensors, layers = {}, {}
        for p, st in self._stats.items():
            layers[p] = {"tokens": int(st.tokens), "nonfinite": int(st.nonfinite)}
            for field in _TENSORS:
                if (t := getattr(st, field)) is not None:
                    tensors[f"{p}/{field}"] = t.detach().contiguous().clone()  # clone: no shared storage
        table = json.dumps(layers)  # in module order, which load keeps
        meta = {"format": _FORMAT, "version": str(_FORMAT_VERSION), "layers": table}
        if self.learned:
            keys = list(self.learned)
            meta["learned"] = json.dumps(keys)
            for i, key in enumerate(keys):
                tensors[f"{_LEARNED}/{i}"] = self.learned[key].detach().float().contiguous().clone()
            table = f"{table}\n{meta['learned']}"
        meta["sha256"] = _checksum(table, tensors)
        data = safetensors.torch.save(tensors, metadata=meta)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Read a file written by ``save``. Raises ``FileNotFoundError`` for a missing path and
        ``CalibrationFileError`` (a ``ValueError``) naming the file for anything else wrong with it."""
        path = Path(path)
        layers, tensors, learned = _read(path, path.read_bytes())
        calibration = cls({
            p: ChannelStats(
                absmax=tensors[f"{p}/absmax"], min=tensors[f"{p}/min"], max=tensors[f"{p}/max"],
                tokens=info["tokens"], samples=tensors.get(f"{p}/samples"), nonfinite=info["nonfinite"],
                expert_tokens=tensors.get(f"{p}/expert_tokens"), sample_experts=tensors.get(f"{p}/sample_experts"),
            )
            for p, info in layers.items()
        })
        calibration.learned = {key: tensors[f"{_LEARNED}/{i}"] for i, key in enumerate(learned)}
        return calibration


def _checksum(table: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the format, the layer table and every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(f"{_FORMAT} {_FORMAT_VERSION}\n{table}\n".encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _read(path: Path, data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """Check ``data`` (the bytes of ``path``) step by step, from its first byte to its checksum;
    return the layer table and the tensors."""

    def error(what: str) -> CalibrationFileError:
        return CalibrationFileError(f"{path}: {what}")

    if not data:
        raise error("empty file (0 bytes), not a qpass calibration file")
    safetensors_like = data[8:9] == b"{"  # 8-byte header length, then the JSON header
    if not safetensors_like and len(data) > 8 and data.startswith((b"PK\x03\x04", b"\x80")):  # zip, pickle
        raise error(
            f"a torch.save file (qpass calibration format 1, or another torch file); this qpass reads "
            f"calibration format {_FORMAT_VERSION} (safetensors) only: {_RECALIBRATE}"
        )
    if len(data) <= 8:
        raise error(f"truncated: {len(data)} bytes, too short for a safetensors header")
    if not safetensors_like:
        raise error(f"not a qpass calibration file (not safetensors; it starts with {data[:16]!r})")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise error(f"truncated or corrupt: its header length says {n} bytes, but only {len(data) - 8} follow")
    try:
        header = json.loads(data[8 : 8 + n].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"corrupt header, not valid JSON ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        found = f"format {meta.get('format')!r}" if isinstance(meta, dict) else "no metadata"
        raise error(f"not a qpass calibration file (a safetensors file with {found}, not format {_FORMAT!r})")
    version = meta.get("version")
    if version != str(_FORMAT_VERSION):
        newer = isinstance(version, str) and version.isdigit() and int(version) > _FORMAT_VERSION
        raise error(
            f"calibration format version {version}, newer than this qpass reads ({_FORMAT_VERSION}): "
            f"upgrade qpass, or {_RECALIBRATE}"
            if newer
            else f"calibration format version {version!r}; this qpass reads version {_FORMAT_VERSION}: {_RECALIBRATE}"
        )
    try:
        end = 8 + n + max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        end = len(data)  # a malformed entry: safetensors names it below
    if isinstance(end, int) and end > len(data):
        raise error(f"truncated: {len(data)} bytes, its header describes {end}")
    try:
        tensors = safetensors.torch.load(data)
    except safetensors.SafetensorError as e:
        raise error(f"corrupt: {e}") from None
    table, checksum, learned = meta.get("layers"), meta.get("sha256"), meta.get("learned")
    signed = table if learned is None or not isinstance(table, str) else f"{table}\n{learned}"
    if not isinstance(table, str) or _checksum(signed, tensors) != checksum:
        raise error("checksum mismatch: the file is corrupt (its contents differ from what was saved)")
    keys = json.loads(learned) if isinstance(learned, str) else []
    if any(f"{_LEARNED}/{i}" not in tensors for i in range(len(keys))):
        raise error("corrupt: its learned smoothing factors are listed but not all stored")
    return json.loads(table), tensors, keys


def _on_cpu(stats: ChannelStats) -> ChannelStats:
    moved = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in stats.to_dict().items()}
    return ChannelStats(**moved)


def is_linear_module(module: nn.Module) -> bool:
    """nn.Linear and GPT-2 style Conv1D (weight stored as (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _weight_matrix(module: nn.Module) -> torch.Tensor | None:
    """The 2-D floating ``weight`` of a leaf module that is not a torch.nn built-in: a linear written
    by hand (``x @ self.weight.T``), which the backend recognises by its graph. Its inputs are
    recorded when their width fits the weight."""
    w = module._parameters.get("weight")
    if w is None or w.dim() != 2 or not w.is_floating_point() or next(module.children(), None) is not None:
        return None
    if type(module).__module__.startswith("torch.nn"):
        return None  # nn.Embedding and friends
    return w


class _Recorder:
    def __init__(self, path: str, rows_per_batch: int, widths: tuple[int, ...] | None = None):
        self.path = path
        self.widths = widths  # a hand-written linear's possible input widths; None: always record
        self.rows_per_batch = rows_per_batch
        self.absmax = self.min = self.max = None
        self.tokens = 0
        self.nonfinite = 0
        self.samples: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # the current batch's attention mask, (batch, seq) bool
        self.unmasked = False  # saw an input without the mask's leading shape

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.widths is not None and not (
            args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() and args[0].shape[-1] in self.widths
        ):
            return
        x = args[0].detach()
        if self.mask is not None:
            if x.shape[:-1] == self.mask.shape:
                x = x[self.mask.to(x.device)]  # real tokens only
            else:
                self.unmasked = True
        x = x.reshape(-1, x.shape[-1]).float()
        if not x.shape[0]:
            return
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


def is_experts_module(module: nn.Module) -> bool:
    """Fused experts as transformers builds them (``use_experts_implementation``): 3-D ``gate_up_proj``
    (E, 2I, H) and ``down_proj`` (E, H, I) parameters, ``forward(hidden, top_k_index, top_k_weights)``."""
    gu, down = module._parameters.get("gate_up_proj"), module._parameters.get("down_proj")
    return (hasattr(type(module), "_apply_gate") and gu is not None and down is not None
            and gu.dim() == 3 and down.dim() == 3)


class _ExpertsRecorder:
    """Per-expert statistics of a fused experts module's two grouped matmuls, from the tokens routed
    to each expert: ``gate_up_proj``'s input (the routed hidden states) and ``down_proj``'s input
    (``act(gate) * up`` of that expert, recomputed here from the module's weights)."""

    def __init__(self, path: str, module: nn.Module, rows_per_batch: int):
        self.path, self.rows_per_batch = path, rows_per_batch
        self.experts = module.gate_up_proj.shape[0]
        self.mask: torch.Tensor | None = None
        self.unmasked = False
        self.parts = {name: _PerExpert(self.experts) for name in ("gate_up_proj", "down_proj")}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        x, index = values.get("hidden_states"), values.get("top_k_index")
        if not isinstance(x, torch.Tensor) or not isinstance(index, torch.Tensor):
            return
        x, index = x.detach().reshape(-1, x.shape[-1]), index.detach().reshape(x.shape[0] if x.dim() == 2 else -1, index.shape[-1])
        if self.mask is not None:
            if self.mask.numel() == x.shape[0]:
                keep = self.mask.reshape(-1).to(x.device)
                x, index = x[keep], index[keep]
            else:
                self.unmasked = True
        transposed = getattr(module, "is_transposed", False)
        for e in range(self.experts):
            rows = (index == e).any(-1)
            if not bool(rows.any()):
                continue
            xe = x[rows]
            w_gu, w_down = module.gate_up_proj[e], module.down_proj[e]
            h = xe @ w_gu if transposed else xe @ w_gu.T
            h = module._apply_gate(h)
            self.parts["gate_up_proj"].add(e, xe, self.rows_per_batch)
            self.parts["down_proj"].add(e, h, self.rows_per_batch)

    def stats(self) -> dict[str, ChannelStats]:
        return {f"{self.path}.{name}": part.stats() for name, part in self.parts.items() if part.tokens.sum() > 0}


class _PerExpert:
    def __init__(self, experts: int):
        self.experts = experts
        self.absmax = self.min = self.max = None
        self.tokens = torch.zeros(experts, dtype=torch.long)
        self.nonfinite = 0
        self.samples: list[torch.Tensor] = []
        self.sample_experts: list[torch.Tensor] = []

    def add(self, e: int, x: torch.Tensor, rows_per_batch: int) -> None:
        x = x.float()
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            self.nonfinite += int((~finite).sum())
            x = torch.where(finite, x, torch.zeros((), dtype=x.dtype))
        if self.absmax is None:
            k = x.shape[-1]
            self.min = torch.zeros(self.experts, k, device=x.device)
            self.max = torch.zeros(self.experts, k, device=x.device)
        lo, hi = x.amin(0), x.amax(0)
        if self.tokens[e] == 0:
            self.min[e], self.max[e] = lo, hi
        else:
            self.min[e], self.max[e] = torch.minimum(self.min[e], lo), torch.maximum(self.max[e], hi)
        self.absmax = torch.maximum(self.max.abs(), self.min.abs())
        self.tokens[e] += x.shape[0]
        if rows_per_batch:
            per_expert = max(1, rows_per_batch // self.experts)
            stride = max(1, x.shape[0] // per_expert)
            picked = x[::stride][:per_expert].clone()
            self.samples.append(picked)
            self.sample_experts.append(torch.full((picked.shape[0],), e, dtype=torch.long))

    def stats(self) -> ChannelStats:
        return ChannelStats(
            absmax=self.absmax, min=self.min, max=self.max, tokens=int(self.tokens.sum()),
            samples=torch.cat(self.samples) if self.samples else None, nonfinite=self.nonfinite,
            expert_tokens=self.tokens.clone(),
            sample_experts=torch.cat(self.sample_experts) if self.sample_experts else None,
        )


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    else:
        model(*batch)


def _check_arguments(model, batches, samples) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise TypeError(
            f"calibrate: batches must be a list of model inputs, got a single {type(batches).__name__}; "
            "pass [batch] to calibrate on one batch"
        )
    if not isinstance(batches, Iterable) or isinstance(batches, (str, bytes)):
        raise TypeError(f"calibrate: batches must be a list of model inputs, got {type(batches).__name__}")
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise TypeError(f"calibrate: samples must be an int >= 0, got {type(samples).__name__}")
    if samples < 0:
        raise ValueError(f"calibrate: samples must be an int >= 0, got {samples}")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    samples: int = 256,
    progress: bool | None = None,
) -> Calibration:
    """Record input statistics of every linear of ``model`` over ``batches``.

    ``batches`` is a list (any iterable) of model inputs: tensors (``model(t)``), dicts
    (``model(**d)``) or tuples (``model(*t)``); a bare tensor is refused, wrap it as ``[t]``.
    Where a dict batch has an ``attention_mask`` of shape (batch, seq), positions where it is 0
    (padding) are left out of every linear input of shape (batch, seq, K); a linear whose input
    has another leading shape keeps all rows and is named in one warning. ``samples`` input rows
    per linear are kept for the error-driven searches (auto-alpha, AdaDim); 0 keeps none. The
    model runs in eval mode and is restored to its previous mode; its weights are not touched.
    """
    _check_arguments(model, batches, samples)
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate: the batch list is empty; pass at least one model input")
    for i, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, Mapping, tuple, list)):
            raise TypeError(
                f"calibrate: batch {i} must be a tensor, a dict of kwargs or a tuple of args, got {type(batch).__name__}"
            )
    rows_per_batch = math.ceil(samples / len(batches)) if samples else 0
    recorders: dict[str, _Recorder] = {}
    experts: dict[str, _ExpertsRecorder] = {}
    handles = []
    maybe: set[str] = set()
    for path, module in model.named_modules():
        if is_experts_module(module):
            experts[path] = _ExpertsRecorder(path, module, rows_per_batch)
            handles.append(module.register_forward_pre_hook(experts[path], with_kwargs=True))
            continue
        widths = None
        if not is_linear_module(module):
            w = _weight_matrix(module)
            if w is None:
                continue
            widths = tuple(sorted(set(w.shape)))
            maybe.add(path)
        recorders[path] = _Recorder(path, rows_per_batch, widths)
        handles.append(module.register_forward_pre_hook(recorders[path]))
    if not recorders:
        raise ValueError(f"calibrate: {type(model).__name__} has no linear layers (nn.Linear, Conv1D, or a module with a 2-D weight)")
    was_training = model.training
    model.eval()
    odd_masks: set[str] = set()
    try:
        show = progress if progress is not None else len(batches) > 4
        for batch in tqdm(batches, desc="qpass calibrate", disable=not show, unit="batch"):
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
                odd_masks.add(str(tuple(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask).__name__)
                mask = None
            for r in (*recorders.values(), *experts.values()):
                r.mask = None if mask is None else mask != 0
            _run(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if odd_masks:
        logger.warning(
            "calibrate: attention_mask %s is not (batch, seq); padded positions were not excluded",
            ", ".join(sorted(odd_masks)),
        )
    unmasked = [p for p, r in (*recorders.items(), *experts.items()) if r.unmasked]
    if unmasked:
        logger.warning(
            "calibrate: %d linears see inputs without the attention mask's (batch, seq) shape; their statistics "
            "include padded positions: %s", len(unmasked), ", ".join(unmasked),
        )
    unseen = [p for p, r in recorders.items() if r.absmax is None and p not in maybe]
    for p in unseen:
        logger.warning("%s: never called during calibration; it will not be smoothed", p)
    stats = {p: r.stats() for p, r in recorders.items() if r.absmax is not None}
    for r in experts.values():
        stats.update(r.stats())
    logger.info("calibrated %d linears on %d batches", len(stats), len(batches))
    calibration = Calibration(stats)
    for name, p in model.named_parameters():
        calibration.param_paths[p] = name
    calibration.model_class = type(model).__name__
    return calibration
