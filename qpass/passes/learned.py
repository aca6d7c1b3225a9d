"""``Smoothing("learned")``: the smoothing pass's side of FSBR (the math is ``qpass.fsbr``).

The smoothing pass finds the folds (an absorber and the linears that read it) as for closed-form
factors; this module turns them into blocks, learns their factors, and hands them back to be
folded exactly as closed-form ones are::

    folds:  input_layernorm -> q,k,v    v -> o    post_attention_layernorm -> gate,up    up -> down
    blocks: {norm -> q,k,v ; v -> o}              {norm -> gate,up ; up -> down}

How blocks are delimited: two folds belong to one block when the absorber of one is a linear that
reads the other (v_proj reads the input norm and absorbs o_proj's factors; up_proj reads the
post-attention norm and absorbs down_proj's). This is what the graph and the calibration can
reproduce offline: calibration keeps strided samples of every linear's input rows, the same token
positions for every linear of a model (every linear sees the same number of rows per batch), so a
chain of token-wise ops (norm -> gate/up -> act * up -> down) can be replayed on the samples with
quantization errors propagating, while attention mixes tokens that were not kept: o_proj reads its
recorded input. The two blocks of a decoder layer share no factor and the loss is a sum over
blocks, so learning them jointly per layer would give the same factors.

The factors depend on the samples, the weights and the config's quantization, so they are stored in
the calibration (``Calibration.learned``) under the config's fingerprint and the linears of each fold:
a second compile (prefill then decode graphs, a recompile, a later process that loads the saved
calibration) folds them without learning again, and without the auto-alpha search (the start is
computed only for a block that learns; the report's alpha column is then empty). Factors learned
elsewhere under the same key are folded the same way (``qpass.fsbr_layers``: from whole decoder-layer
outputs).

Not learned (closed-form auto-alpha factors, and the report row says why): folds into fused experts,
folds read by a router, the multiply fallback, and folds whose linears have no calibration samples.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

import torch
from torch import fx

from qpass import fsbr
from qpass.calibration import Calibration
from qpass.config import QuantConfig
from qpass.graph import LinearSite, QGraph
from qpass.patterns import Absorber, walk_back

logger = logging.getLogger(__name__)

__all__ = ["learned_scales", "fingerprint"]

# Fewer training rows per block than this: one warning. A few dozen rows describe a block's
# activations poorly (SmolLM2 with 64 samples: 48 training rows and 16 held-out rows per block).
# More rows are no guarantee: on SmolLM2 384 rows still raised perplexity (README, "Accuracy").
_FEW_ROWS = 256

# act(gate) * up recomputed from the samples must match down's recorded input this closely
# (relative, per token): otherwise down reads its recorded input and the note says so.
_REPLAY_TOLERANCE = 1e-4


@dataclass
class _Fold:
    producer: fx.Node
    consumers: list  # smooth.Consumer
    absorber: Absorber
    channels: int
    key: str
    init: torch.Tensor | None = None  # the auto-alpha start, computed only for a block that learns


def fingerprint(config: QuantConfig) -> str:
    """What learned factors depend on besides the calibration and the weights: the quantization
    they were learned under and the learning's own settings."""
    sm = config.smoothing
    text = repr((config.weight, config.activation, config.dynamic_fallback, sm.alpha_grid, sm.learn_steps, sm.learn_lr, sm.learn_penalty))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def learned_scales(qg: QGraph, edits, folds, config: QuantConfig, calibration: Calibration) -> dict:
    """``{producer: (factors, note)}`` for every fold that can be learned; the others are absent."""
    from qpass.passes.smooth import _alpha, _group_scales

    sm = config.smoothing
    fp = fingerprint(config)
    items: list[_Fold] = []
    for producer, consumers, absorber in folds:
        if (why := _not_learnable(consumers, absorber, calibration)) is not None:
            logger.info("%s: smoothing factors not learned (%s); auto alpha", consumers[0].site.path, why)
            continue
        channels = consumers[0].walk.probes[producer].shape[-1]
        items.append(_Fold(producer, consumers, absorber, channels, f"{fp}/{'+'.join(c.site.path for c in consumers)}"))

    out: dict[fx.Node, tuple[torch.Tensor, str]] = {}
    few: list[tuple[str, int]] = []
    for members in _blocks(items):
        stored = [calibration.learned.get(it.key) for it in members]
        if all(s is not None and tuple(s.shape) == (it.channels,) for s, it in zip(stored, members)):
            for it, s in zip(members, stored):
                out[it.producer] = (s.float(), "learned (FSBR), read from the calibration")
            continue
        for it in members:  # the auto-alpha start: searched only for blocks that learn
            weights = [edits.weight(c.site) for c in it.consumers]
            alpha = _alpha(qg, config, calibration, it.consumers, weights, it.channels)
            it.init = _group_scales(qg, it.consumers, weights, it.channels, alpha)
        start = time.perf_counter()
        # the backend runs under the caller's no_grad / inference_mode; learning needs autograd on
        # tensors made outside inference mode (``_build_block`` copies them)
        with torch.inference_mode(False), torch.enable_grad():
            block, how = _build_block(qg, edits, members, calibration, config)
            result = fsbr.learn(block, sm.learn_steps, sm.learn_lr, penalty=sm.learn_penalty,
                                decide=lambda log_s: fsbr.decide_activations(block, config.activation,
                                                                             config.dynamic_fallback, log_s))
        seconds = time.perf_counter() - start
        note = (f"learned (FSBR): block error {result.loss_start:.3g} -> {result.loss_end:.3g} on held-out samples "
                f"(step {result.steps} of {sm.learn_steps}; {result.rows[0]} training rows, {result.rows[1]} held out){how}")
        logger.info("%s: %s, %.1f s", " + ".join(l for l in block.linears), note, seconds)
        if result.rows[0] < _FEW_ROWS and sm.learn_steps:  # zero steps: the start, nothing fitted
            few.append((next(iter(block.linears)), result.rows[0]))
        for it, s in zip(members, result.factors):
            s = s.detach().float()
            calibration.learned[it.key] = s
            out[it.producer] = (s, note)
    if few:
        logger.warning(
            "qpass: learned smoothing trained %d blocks on fewer than %d calibration rows each (fewest: %d, %s): "
            "the factors may fit the calibration text only; calibrate with more samples "
            "(qpass.calibrate(..., samples=512))", len(few), _FEW_ROWS, min(n for _, n in few),
            min(few, key=lambda f: f[1])[0])
    return out


def _not_learnable(consumers, absorber: Absorber, calibration: Calibration) -> str | None:
    if absorber.experts is not None:
        return "a fold into fused experts"
    for c in consumers:
        if c.router or not isinstance(c.site, LinearSite):
            return f"{c.site.path} is a router or fused experts"
        st = calibration.get(c.site.path)
        if st is None or st.samples is None:
            return f"{c.site.path} has no calibration samples"
    if absorber.site is not None:
        st = calibration.get(absorber.site.path)
        if st is None or st.samples is None:
            return f"its absorber {absorber.site.path} has no calibration samples"
    return None


def _blocks(items: list[_Fold]) -> list[list[_Fold]]:
    """Folds joined where one's absorbing linear reads another (union-find), in graph order."""
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    reader_of = {c.site.path: i for i, it in enumerate(items) for c in it.consumers}
    for j, it in enumerate(items):
        if it.absorber.site is not None and (i := reader_of.get(it.absorber.site.path)) is not None:
            parent[find(j)] = find(i)
    blocks: dict[int, list[_Fold]] = {}
    for i, it in enumerate(items):
        blocks.setdefault(find(i), []).append(it)
    return list(blocks.values())


def _matrix(site: LinearSite, w: torch.Tensor) -> torch.Tensor:
    return (w.t() if site.weight_t else w).float()


def _build_block(qg: QGraph, edits, members: list[_Fold], calibration: Calibration,
                 config: QuantConfig) -> tuple[fsbr.Block, str]:
    linears: dict[str, fsbr.BlockLinear] = {}

    def add(site: LinearSite) -> fsbr.BlockLinear:
        if site.path not in linears:
            st = calibration[site.path]
            linears[site.path] = fsbr.BlockLinear(
                site.path, _matrix(site, edits.weight(site)).clone(), st.samples.float().clone(),
                lo=st.min.float().clone(), hi=st.max.float().clone(),
            )
        return linears[site.path]

    for fold, it in enumerate(members):
        for c in it.consumers:
            add(c.site).col = (fold, c.walk.index)
        if it.absorber.site is not None:
            add(it.absorber.site).row = (fold, it.absorber.rows)
    gated, how = [], ""
    for it in members:
        if it.absorber.kind != "gated-act" or len(it.consumers) != 1:
            continue
        down = it.consumers[0].site
        found = _gate_act(qg, it.producer, it.absorber)
        if isinstance(found, str):
            how += f"; {down.path} reads its recorded input ({found})"
            continue
        gate, act = found
        gate_lin, up_lin, down_lin = add(gate), linears[it.absorber.site.path], linears[down.path]
        with torch.no_grad():
            h = act(gate_lin.x @ gate_lin.w.T) * (up_lin.x @ up_lin.w.T)
            err = float(((h - down_lin.x).pow(2).sum(-1) / down_lin.x.pow(2).sum(-1).clamp(min=1e-30)).mean())
        if not err <= _REPLAY_TOLERANCE:
            how += f"; {down.path} reads its recorded input (act(gate) * up replayed off by {err:.1e})"
            continue
        down_lin.x = None
        gated.append(fsbr.GatedProduct(gate.path, it.absorber.site.path, down.path, act))
    return fsbr.Block(linears, gated, [it.init for it in members], config.weight), how


def _gate_act(qg: QGraph, mul: fx.Node, absorber: Absorber):
    """The gate linear and ``act`` of ``act(gate) * up``, as a function on (rows, channels) tensors;
    or why not: the up rows must be the product's channels one to one, and the gate side a chain
    of ops with one tensor input each (``silu``, ``gelu``, casts and views)."""
    up = absorber.site
    if not torch.equal(absorber.rows, torch.arange(absorber.rows.numel())):
        return "the up rows are not the product's channels in order"
    others = [a for a in mul.args if isinstance(a, fx.Node)]
    side = [a for a in others if getattr(qg.site(walk_back(a, qg)[0]), "path", None) != up.path]
    if len(side) != 1:
        return "no single gate operand"
    chain: list[fx.Node] = []
    node = side[0]
    for _ in range(32):
        producer, _path = walk_back(node, qg)
        site = qg.site(producer)
        if site is not None:
            if site.path == up.path:
                return "gate and up are one fused linear"
            return site, _replayer(qg, list(reversed(chain)))
        if producer.op not in ("call_function", "call_method"):
            return f"the gate side starts at {producer.op} {producer.name}"
        inputs = [a for a in producer.all_input_nodes if qg.value(a) is None]
        if len(inputs) != 1:
            return f"{producer.name} has {len(inputs)} tensor inputs"
        chain.append(producer)
        node = inputs[0]
    return "the gate side is too long"


def _replayer(qg: QGraph, chain: list[fx.Node]):
    def act(x: torch.Tensor) -> torch.Tensor:
        for node in chain:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: qg.value(a) if qg.value(a) is not None else x)
            x = getattr(torch.Tensor, node.target)(*args, **kwargs) if node.op == "call_method" else node.target(*args, **kwargs)
        return x

    return act
