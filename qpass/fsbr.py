"""Smoothing factors learned by block reconstruction (FSBR), as pure tensor code (no FX).

A *block* is a set of linears tied together by smoothing folds, with one factor vector per fold
(``groups``) and the recorded input rows of its linears. The smoothing pass builds one block per
connected set of folds (``qpass.passes.smooth``): in a Llama decoder layer the attention block
(``input_layernorm -> q/k/v`` and ``v -> o``: v_proj is a consumer of the first fold and the
absorber of the second) and the MLP block (``post_attention_layernorm -> gate/up`` and the gated
activation ``up -> down``).

The loss is the quantized block's output error against its fp32 output, per token relative
(``qmath.token_error``), summed over the block's outputs::

    MLP:        down(act(gate_q(x)) * up_q(x))            (the whole sub-block, errors propagate)
    attention:  q_q(x), k_q(x), v_q(x), o_q(attn)         (attention mixes tokens; the rows kept
                                                           by calibration are strided samples of
                                                           them, so o reads its recorded input)

where ``name_q`` is the linear with its smoothing applied (input columns ``/ s``, weight columns
``* s``, absorber rows ``/ s`` and the output multiplied back, so the error is measured in the
model's own units) and fake-quantized under the config's specs, rounding through a
straight-through estimator. The parameters are ``log s``, one vector per fold, started at the
closed-form auto-alpha factors and moved by Adam, optionally pulled back towards the start by a
penalty; the factors with the lowest loss on held-out rows (the last quarter of the samples: whole
calibration sequences, ``split_rows``) are kept, so the result is never worse than the start there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qpass import ops, qmath
from qpass.config import AdaDim, PerGroup, PerInputChannel, PerOutputChannel, PerTensor, PerToken, QuantSpec

__all__ = ["BlockLinear", "GatedProduct", "Block", "learn", "block_loss", "split_rows"]


@dataclass
class BlockLinear:
    """One linear of a block: ``y = x @ w.T`` with ``w`` (N, K) fp32 as the model holds it.

    ``col``: (fold, index) -- input column ``j`` takes ``s[fold][index[j]]``. ``row``: (fold, rows) --
    output row ``rows[p]`` takes ``1 / s[fold][p]`` (the absorber of a linear-linear or gated fold).
    ``x`` is its recorded input rows, None when a ``GatedProduct`` computes it. ``lo`` / ``hi``: the
    calibrated per-channel input range, for static activation scales. ``act``: the activation spec
    as the layer runs (static or per-token, decided once at the start)."""

    name: str
    w: Tensor
    x: Tensor | None
    col: tuple[int, Tensor] | None = None
    row: tuple[int, Tensor] | None = None
    lo: Tensor | None = None
    hi: Tensor | None = None
    act: QuantSpec | None = None


@dataclass
class GatedProduct:
    """``down`` reads ``act(gate) * up``, computed from the two linears' (quantized) outputs."""

    gate: str
    up: str
    down: str
    act: Callable[[Tensor], Tensor]


@dataclass
class Block:
    linears: dict[str, BlockLinear]
    gated: list[GatedProduct]
    init: list[Tensor]  # one (channels,) factor vector per fold
    weight: QuantSpec | None
    granularity: object = None  # the weight granularity (AdaDim scored as per-output-channel, as auto-alpha does)
    refs: dict[str, Tensor] = field(default_factory=dict)  # fp32 outputs / computed inputs

    def __post_init__(self) -> None:
        g = self.granularity or (self.weight.granularity if self.weight is not None else None)
        self.granularity = PerOutputChannel() if isinstance(g, AdaDim) else g
        with torch.no_grad():
            for lin in self.linears.values():
                if lin.x is not None:
                    self.refs[lin.name] = lin.x @ lin.w.T
            for gp in self.gated:
                h = gp.act(self.refs[gp.gate]) * self.refs[gp.up]
                self.refs["input:" + gp.down] = h
                self.refs[gp.down] = h @ self.linears[gp.down].w.T

    @property
    def outputs(self) -> list[str]:
        """The block's outputs: every linear but the gate and up of a gated product."""
        inner = {n for gp in self.gated for n in (gp.gate, gp.up)}
        return [n for n in self.linears if n not in inner]

    def input_of(self, name: str) -> Tensor:
        lin = self.linears[name]
        return lin.x if lin.x is not None else self.refs["input:" + name]


def _ste_round(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def _fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor | None, spec: QuantSpec) -> Tensor:
    """``ops.quantize`` then ``ops.dequantize``, the same numbers forward, with rounding passed
    straight through and the scale kept in the graph (its gradient carries the range's)."""
    qmin, qmax = spec.qrange
    y = x / scale
    if spec.storage_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        y = y.clamp(qmin, qmax)
        return (y + (y.to(spec.storage_dtype).float() - y).detach()) * scale
    y = _ste_round(y)
    if zero_point is not None:
        return ((y + zero_point).clamp(qmin, qmax) - zero_point) * scale
    return y.clamp(qmin, qmax) * scale


def fake_quant_weight(w: Tensor, spec: QuantSpec, granularity) -> Tensor:
    """``qmath.fake_quant_weight`` with a straight-through estimator (forward values equal)."""
    qmin, qmax = spec.qrange
    if isinstance(granularity, PerGroup):
        blocks, dims = w.reshape(w.shape[0], -1, granularity.group_size), (2,)
    else:
        blocks, dims = w, {PerTensor: (0, 1), PerOutputChannel: (1,), PerInputChannel: (0,)}[type(granularity)]
    if spec.symmetric:
        scale = (blocks.abs().amax(dim=dims, keepdim=True) / qmax).clamp(min=1e-12)
        out = _fake_quant(blocks, scale, None, spec)
    else:
        lo, hi = blocks.amin(dim=dims, keepdim=True), blocks.amax(dim=dims, keepdim=True)
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-12)
        out = (_ste_round((blocks - lo) / scale).clamp(0, qmax - qmin)) * scale + lo
    return out.reshape(w.shape)


def fake_quant_act(x: Tensor, spec: QuantSpec, lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
    """``qmath.fake_quant_act`` with a straight-through estimator: dynamic from ``x``'s range (per
    token or per tensor), or static from the calibrated range ``lo`` / ``hi`` (per channel)."""
    qmin, qmax = spec.qrange
    if spec.dynamic:
        if isinstance(spec.granularity, PerToken):
            lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        else:
            lo, hi = x.amin().reshape(1), x.amax().reshape(1)
    else:
        lo, hi = lo.min().reshape(1), hi.max().reshape(1)
    scale, zero_point = ops.qparams_from_range(lo, hi, spec.symmetric, qmin, qmax)
    return _fake_quant(x, scale, None if spec.symmetric else zero_point, spec)


def _factors(log_s: list[Tensor], ref: tuple[int, Tensor] | None, n: int) -> Tensor | None:
    if ref is None:
        return None
    fold, index = ref
    return torch.exp(log_s[fold])[index]


def _quantized_output(block: Block, lin: BlockLinear, x: Tensor, log_s: list[Tensor]) -> Tensor:
    """``lin``'s output on ``x`` smoothed by ``exp(log_s)`` and fake-quantized, in unsmoothed units."""
    w = lin.w
    c = _factors(log_s, lin.col, w.shape[1])
    lo, hi = lin.lo, lin.hi
    if c is not None:
        x, w = x / c, w * c
        lo, hi = (None, None) if lo is None else (lo / c, hi / c)
    r = None
    if lin.row is not None:
        fold, rows = lin.row
        r = torch.ones(w.shape[0], dtype=w.dtype).index_put((rows,), torch.exp(log_s[fold]))
        w = w / r[:, None]
    if lin.act is not None:
        x = fake_quant_act(x, lin.act, lo, hi)
    if block.weight is not None:
        w = fake_quant_weight(w, block.weight, block.granularity)
    y = x @ w.T
    return y if r is None else y * r


def _token_error(y: Tensor, ref: Tensor) -> Tensor:
    energy = ref.pow(2).sum(dim=-1).clamp(min=1e-30)
    return ((y - ref).pow(2).sum(dim=-1) / energy).mean()


def block_loss(block: Block, log_s: list[Tensor], rows: slice | Tensor = slice(None)) -> Tensor:
    """The quantized block's output error on the sampled ``rows`` (sum over its outputs of
    ``qmath.token_error``)."""
    out: dict[str, Tensor] = {}
    for name, lin in block.linears.items():
        if lin.x is not None:
            out[name] = _quantized_output(block, lin, lin.x[rows], log_s)
    for gp in block.gated:
        h = gp.act(out[gp.gate]) * out[gp.up]
        out[gp.down] = _quantized_output(block, block.linears[gp.down], h, log_s)
    return sum(_token_error(out[n], block.refs[n][rows]) for n in block.outputs)


def decide_activations(block: Block, spec: QuantSpec | None, fallback: float | None,
                       log_s: list[Tensor] | None = None) -> int:
    """Each linear's activation spec as the quantize pass will run it at the factors ``exp(log_s)``
    (default: the start): the configured one, or with ``fallback`` per-token where the static scale
    loses by more than that factor (``qmath.static_or_per_token``, the quantize pass's own rule),
    and then per-token for every linear of a fold where one of them is (they read the same input:
    q / k / v, gate / up; ``qmath.shared_input_spec``, as the quantize pass applies it). Learning calls it again as
    the factors move, so that the factors kept are scored, and deployed, under one set of choices.
    Returns how many linears changed their spec."""
    log_s = [s.log() for s in block.init] if log_s is None else [t.detach() for t in log_s]
    before = {name: lin.act for name, lin in block.linears.items()}
    for lin in block.linears.values():
        lin.act = spec
        if spec is None or spec.dynamic or fallback is None:
            continue
        c = _factors(log_s, lin.col, lin.w.shape[1])
        x, w = block.input_of(lin.name), lin.w
        lo, hi = lin.lo, lin.hi
        if c is not None:
            x, w, lo, hi = x / c, w * c, lo / c, hi / c
        with torch.no_grad():
            wq = w if block.weight is None else qmath.fake_quant_weight(w, block.weight, block.granularity)
            lin.act = qmath.static_or_per_token(x, wq, spec, lo, hi, fallback).spec
    folds: dict[int, list[BlockLinear]] = {}
    for lin in block.linears.values():
        if lin.col is not None:
            folds.setdefault(lin.col[0], []).append(lin)
    for members in folds.values():
        dynamic = qmath.shared_input_spec(lin.act for lin in members)
        if dynamic is not None:
            for lin in members:
                lin.act = dynamic
    return sum(before[name] != lin.act for name, lin in block.linears.items())


@dataclass(frozen=True)
class Learned:
    factors: list[Tensor]
    loss_start: float  # held-out loss at the starting factors
    loss_end: float  # held-out loss at the kept factors
    steps: int  # the step whose factors were kept (0: the start)
    rows: tuple[int, int] = (0, 0)  # (training, held-out) rows


def split_rows(n: int, held_fraction: float = 0.25) -> tuple[slice, slice]:
    """(train, held-out) rows of a block's ``n`` samples: the held-out rows are the last
    ``held_fraction`` of them. Calibration keeps its samples batch by batch, so these are whole
    calibration sequences the factors never learned from (not other positions of the same
    sequences, whose text the factors would already fit). Under 8 rows: both are all rows."""
    held = int(n * held_fraction)
    if n < 8 or held < 1:
        return slice(None), slice(None)
    return slice(0, n - held), slice(n - held, n)


def learn(block: Block, steps: int, lr: float, *, penalty: float = 0.0, held_fraction: float = 0.25,
          decide: Callable[[list[Tensor]], object] | None = None) -> Learned:
    """Adam on ``log s`` for ``steps`` steps; keeps the factors with the lowest held-out loss
    (``split_rows``), which may be the start. ``decide(log_s)`` (``decide_activations``) runs before
    every held-out score, so each step is scored, and the next one trained, under the activation
    choices its factors get when compiled.

    The training objective is the block error on the training rows relative to its value at the
    start, plus ``penalty`` times the mean squared distance of ``log s`` from the start (the
    auto-alpha factors): ``penalty=0.1`` charges moving every factor by ``e`` as much as a 10% rise
    of the error. The held-out loss that chooses the step is the plain block error."""
    n = len(next(iter(block.refs.values())))
    train, held = split_rows(n, held_fraction)
    counts = (len(range(n)[train]), len(range(n)[held]))
    start_s = [s.double().log().float() for s in block.init]
    log_s = [t.clone().requires_grad_(True) for t in start_s]
    opt = torch.optim.Adam(log_s, lr=lr)
    channels = sum(t.numel() for t in start_s)

    def held_loss() -> float:
        if decide is not None:
            decide(log_s)
        with torch.no_grad():
            return float(block_loss(block, log_s, held))

    best = start = held_loss()
    best_s, best_step = [t.detach().clone() for t in log_s], 0
    if not math.isfinite(start):
        return Learned(list(block.init), start, start, 0, counts)
    with torch.no_grad():
        norm = float(block_loss(block, log_s, train))
    if not (math.isfinite(norm) and norm > 0):
        return Learned(list(block.init), start, start, 0, counts)
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = block_loss(block, log_s, train) / norm
        if penalty:
            loss = loss + penalty * sum((t - t0).pow(2).sum() for t, t0 in zip(log_s, start_s)) / channels
        if not torch.isfinite(loss):
            break
        loss.backward()
        opt.step()
        now = held_loss()
        if now < best:
            best, best_step = now, step
            best_s = [t.detach().clone() for t in log_s]
    if not best_step:
        return Learned(list(block.init), start, start, 0, counts)  # the start itself, not exp(log(start))
    return Learned([t.exp() for t in best_s], start, best, best_step, counts)
