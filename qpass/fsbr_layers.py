"""Smoothing factors learned by decoder-layer reconstruction: FSBR on the whole layer's output.

``qpass.fsbr`` learns a block's factors from the sampled input rows calibration keeps, so attention
cannot be replayed there (o_proj reads its recorded input) and every block reads fp32 inputs. This
module learns the same factors (the smoothing pass's folds, one vector per fold) from the output of
each whole decoder layer, run by the model's own module on full calibration sequences::

    for layer i (in order):   y_fp = layer(x_fp)                   fp32 layer on fp32 inputs
                              y_q  = layer_q(x_q; s)               smoothed, fake-quantized linears
                              loss = mean_t |y_q,t - y_fp,t|^2 / |y_fp,t|^2
                                     (target="own": layer(x_q) in place of y_fp)
                              Adam on log s (start: auto alpha), keep the best held-out step
                              x_fp, x_q <- y_fp, layer_q(x_q; s_kept)

``y`` is the residual stream after the layer, so attention (softmax(qk)v with v's error), both
residual adds and the next layer's view of the error are in the loss: the error is per token
relative to the residual it lands on (the next RMSNorm divides every token by its own norm). ``x_q``
is the quantized earlier layers' output, so each layer learns to work with the errors it is handed.
``layer_q`` is a copy of the layer whose linears compute ``qpass.fsbr``'s smoothed, fake-quantized
output (input columns ``/ s``, weight columns ``* s``, absorber rows ``/ s`` and multiplied back, the
config's weight and activation specs, straight-through rounding); norms are left alone (a norm
absorber's ``1 / s`` is the consumer's ``x / s``). The user's model is not changed.

``target="logits"`` learns every layer's factors together instead: all the layers' replays in one
copy of the model, Adam on all ``log s`` at once on the mean per-token KL divergence of the quantized
model's next-token distribution from fp32's (the model's own loss, end to end), the best held-out step
kept.

The factors land in ``Calibration.learned`` under the config's fingerprint and each fold's linears,
where ``Smoothing("learned")`` reads them (``qpass.passes.learned``): compile the same config with the
same calibration and they fold exactly as closed-form factors do. The start factors are the
auto-alpha ones the smoothing pass computes, read from the calibration after a compile with
``Smoothing("learned", steps=0)`` (which keeps them); ``learn_layers`` runs that compile when they are
missing.

Layers covered: Llama-family decoder layers (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``
as separate linears, grouped-query attention). A layer with another structure, a fold this module
does not know, or whose replay with random factors does not reproduce the layer in fp32 keeps its
auto-alpha factors, and one warning names it and says why.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch
from torch import Tensor, nn

from qpass import fsbr
from qpass.calibration import Calibration
from qpass.config import QuantConfig, Smoothing

logger = logging.getLogger(__name__)

__all__ = ["learn_layers", "LayerResult", "start_config"]

# The layer with random factors folded into its linears must match the layer this closely (relative,
# per token, mean); otherwise the folds are not the ones this module assumes.
_EXACT = 1e-5

# The folds of a Llama-family decoder layer: the consumers (relative paths), the absorbing linear
# whose rows take ``1 / s`` (None: a norm, left alone), and how a consumer column maps to a factor.
_FOLDS = {
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): (None, "identity"),
    ("self_attn.o_proj",): ("self_attn.v_proj", "gqa"),
    ("mlp.gate_proj", "mlp.up_proj"): (None, "identity"),
    ("mlp.down_proj",): ("mlp.up_proj", "identity"),
}


@dataclass(frozen=True)
class LayerResult:
    layer: str
    loss_start: float  # held-out layer-output error at the start factors
    loss_end: float  # ... at the kept factors
    steps: int  # the kept step (0: the start)
    note: str  # how it was learned, or why not
    seconds: float


def start_config(config: QuantConfig) -> QuantConfig:
    """The config whose fingerprint keys the start (auto-alpha) factors: zero learning steps."""
    return config.replace(smoothing=Smoothing("learned", fallback=config.smoothing.fallback,
                                              alpha_grid=config.smoothing.alpha_grid, steps=0))


def learn_layers(model: nn.Module, config: QuantConfig, calibration: Calibration, sequences: list[Tensor], *,
                 held_out: int = 1, layers: int | None = None,
                 target: Literal["fp32", "own", "logits"] = "fp32") -> list[LayerResult]:
    """Learn every decoder layer's smoothing factors for ``config`` from the model's outputs on
    ``sequences`` (token id tensors (1, T), the last ``held_out`` of them choose the kept step), and
    store them in ``calibration.learned``. ``config.smoothing`` must be ``Smoothing("learned")``: its
    ``steps``, ``lr`` and ``penalty`` are this learning's. ``layers``: learn the first N decoder
    layers only, the others keep their start factors (a screening run). ``target``: what the quantized
    layer's output on the quantized model's inputs is compared with: ``"fp32"`` the fp32 model's
    (``layer(x_fp)``: the error handed down by earlier layers is in the loss, and the factors may
    compensate it), ``"own"`` the fp32 layer on the same inputs (``layer(x_q)``: this layer's own
    quantization error only, without the inherited error that no factor of this layer can remove),
    ``"logits"`` the fp32 model's next-token distributions: every layer's factors learned together,
    through the whole quantized model, on the mean KL divergence from fp32's predictions (the model's
    own loss, end to end; one result row for all layers, and ``layers`` does not apply)."""
    from qpass.passes.learned import fingerprint

    sm = config.smoothing
    if sm.alpha != "learned":
        raise ValueError(f"learn_layers: config.smoothing must be Smoothing('learned'), got alpha={sm.alpha!r}")
    if target not in ("fp32", "own", "logits"):
        raise ValueError(f"learn_layers: target must be 'fp32', 'own' or 'logits', got {target!r}")
    if target == "logits" and layers is not None:
        raise ValueError("learn_layers: layers applies to the layer-output targets, not to 'logits'")
    if not 0 < held_out < len(sequences):
        raise ValueError(f"learn_layers: held_out must be in [1, {len(sequences) - 1}] for {len(sequences)} sequences, "
                         f"got {held_out}")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"learn_layers: the model must be float32 (its fp32 layer outputs are the targets), got "
                         f"{', '.join(sorted(str(d) for d in dtypes))}")
    start_fp = fingerprint(start_config(config))
    if not any(k.startswith(start_fp + "/") for k in calibration.learned):
        _compile_start(model, start_config(config), calibration, sequences[0])
    starts = {k[len(start_fp) + 1:]: v for k, v in calibration.learned.items() if k.startswith(start_fp + "/")}
    if not starts:
        raise ValueError("learn_layers: the smoothing pass found no fold to learn in this model")
    list_path, decoder = _decoder_layers(model, starts)
    target_fp = fingerprint(config)

    n_train = len(sequences) - held_out
    if target == "logits":
        return _learn_logits(model, config, calibration, sequences, n_train, starts, list_path, decoder, target_fp)
    x_fp, kwargs = _layer_inputs(model, decoder[0], sequences)
    x_q = [x.clone() for x in x_fp]
    results = []
    for i, layer in enumerate(decoder):
        path = f"{list_path}.{i}"
        t0 = time.perf_counter()
        with torch.no_grad():
            y_fp = [_out(layer(x, **kw)) for x, kw in zip(x_fp, kwargs)]
        folds, replay, why = _checked_replay(layer, path, starts, config, calibration, x_fp[-1], kwargs[-1])
        if replay is None:
            logger.warning("qpass: %s: smoothing factors not learned from the layer output (%s); auto alpha", path, why)
            for key, s in folds.items():
                calibration.learned[f"{target_fp}/{key}"] = s.clone()
            with torch.no_grad():
                x_q = [_out(layer(x, **kw)) for x, kw in zip(x_q, kwargs)]
            results.append(LayerResult(path, math.nan, math.nan, 0, f"not learned: {why}", time.perf_counter() - t0))
            x_fp = y_fp
            continue
        steps = 0 if layers is not None and i >= layers else sm.learn_steps
        if target == "own":
            with torch.no_grad():
                refs = [_out(layer(x, **kw)) for x, kw in zip(x_q, kwargs)]
        else:
            refs = y_fp
        start, best, step = replay.learn(x_q, refs, kwargs, n_train, steps, sm.learn_lr, sm.learn_penalty)
        for key, s in replay.factors().items():
            calibration.learned[f"{target_fp}/{key}"] = s
        with torch.no_grad():
            x_q = [replay(x, kw) for x, kw in zip(x_q, kwargs)]
        x_fp = y_fp
        seconds = time.perf_counter() - t0
        note = (f"layer output error {start:.3g} -> {best:.3g} on {held_out} held-out sequences "
                f"(step {step} of {steps}; {n_train} training sequences)")
        logger.info("%s: %s, %.1f s", path, note, seconds)
        results.append(LayerResult(path, start, best, step, note, seconds))
    _keep_start_outside(starts, calibration, target_fp)
    return results


def _learn_logits(model, config, calibration, sequences, n_train, starts, list_path, decoder, target_fp):
    """Every layer's replay in one copy of the model; Adam on all factors together, on the mean per-token
    KL divergence of the quantized model's next-token distribution from fp32's; the step with the lowest
    held-out divergence is kept."""
    sm = config.smoothing
    t0 = time.perf_counter()
    x_fp, kwargs = _layer_inputs(model, decoder[0], sequences[-1:])
    quantized = copy.deepcopy(model).float().requires_grad_(False)
    layers_q = quantized.get_submodule(list_path)
    replays: list[_Replay] = []
    results = []
    for i, layer in enumerate(decoder):
        path = f"{list_path}.{i}"
        folds, replay, why = _checked_replay(layer, path, starts, config, calibration, x_fp[0], kwargs[0])
        with torch.no_grad():
            x_fp = [_out(layer(x_fp[0], **kwargs[0]))]
        if replay is None:
            logger.warning("qpass: %s: smoothing factors not learned from the logits (%s); auto alpha", path, why)
            for key, s in folds.items():
                calibration.learned[f"{target_fp}/{key}"] = s.clone()
            results.append(LayerResult(path, math.nan, math.nan, 0, f"not learned: {why}", 0.0))
            continue
        layers_q[i] = replay.layer
        replays.append(replay)
    if not replays:
        _keep_start_outside(starts, calibration, target_fp)
        return results

    with torch.no_grad():
        refs = [torch.log_softmax(model(ids, use_cache=False).logits.float(), -1) for ids in sequences]

    def divergence(b: int) -> Tensor:
        logp = torch.log_softmax(quantized(sequences[b], use_cache=False).logits.float(), -1)
        return torch.nn.functional.kl_div(logp, refs[b], log_target=True, reduction="none").sum(-1).mean()

    def held() -> float:
        changed = sum(r.decide() for r in replays)
        if changed:
            logger.info("logits: %d linears change between static and per-token activations at these factors", changed)
        with torch.no_grad():
            return sum(float(divergence(b)) for b in range(n_train, len(sequences))) / (len(sequences) - n_train)

    sizes = [len(r.log_s) for r in replays]

    def install(params: list[Tensor]) -> None:
        for r, n, i in zip(replays, sizes, itertools.accumulate([0, *sizes])):
            r.log_s = params[i:i + n]

    def on_step(step: int, now: float) -> None:
        logger.info("logits: step %d, held-out KL %.5f (start %.5f)", step, now, start)

    start_s = [t.clone() for r in replays for t in r.log_s]
    start = held()
    best, best_step = _adam(start_s, install, lambda: (divergence(b) / n_train for b in range(n_train)),
                            held, start, sm.learn_steps, sm.learn_lr, sm.learn_penalty, on_step)
    for r in replays:
        r.moved = bool(best_step)
        for key, f in r.factors().items():
            calibration.learned[f"{target_fp}/{key}"] = f
    _keep_start_outside(starts, calibration, target_fp)
    note = (f"next-token KL divergence from fp32 {start:.4g} -> {best:.4g} on {len(sequences) - n_train} held-out "
            f"sequences (step {best_step} of {sm.learn_steps}; {n_train} training sequences; {len(replays)} layers)")
    logger.info("%s: %s", list_path, note)
    return [*results, LayerResult(list_path, start, best, best_step, note, time.perf_counter() - t0)]


def _checked_replay(layer, path, starts, config, calibration, x, kwargs) -> tuple[dict, "_Replay | None", str]:
    """The layer's start factors (its folds), its replay, and why there is none: ``_Replay.build``'s
    reason, or a replay whose folds with random factors do not reproduce the layer on ``x``."""
    folds = {k: v for k, v in starts.items() if k.split("+")[0].startswith(path + ".")}
    replay, why = _Replay.build(layer, path, folds, config, calibration)
    if replay is not None and (err := replay.exactness(x, kwargs, layer)) > _EXACT:
        replay, why = None, f"its folds with random factors do not reproduce the layer (error {err:.1e})"
    return folds, replay, why


def _keep_start_outside(starts: dict, calibration: Calibration, target_fp: str) -> None:
    """Folds outside the decoder layers (none learned) keep their auto-alpha factors, with one warning."""
    outside = [k for k in starts if f"{target_fp}/{k}" not in calibration.learned]
    if outside:
        logger.warning("qpass: %d smoothing folds outside the decoder layers keep their auto-alpha factors: %s",
                       len(outside), ", ".join(outside))
        for key in outside:
            calibration.learned[f"{target_fp}/{key}"] = starts[key].clone()


def _adam(start_s: list[Tensor], install: Callable[[list[Tensor]], None], train: Callable[[], Iterable[Tensor]],
          held: Callable[[], float], start: float, steps: int, lr: float, penalty: float,
          on_step: Callable[[int, float], None] | None = None) -> tuple[float, int]:
    """Adam on ``log s`` from ``start_s`` (``install`` hands the trained tensors to the model): each step
    backpropagates every loss ``train()`` yields (stopping at the first that is not finite) and
    ``penalty`` times the mean squared distance from the start; ``held()`` scores it. The factors of the
    lowest held-out score are installed; returns that score (``start`` if no step beat it) and its step
    (0: the start)."""
    best, best_step, best_s = start, 0, start_s
    params = [t.clone().requires_grad_(True) for t in start_s]
    install(params)
    opt = torch.optim.Adam(params, lr=lr)
    channels = sum(t.numel() for t in start_s)
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        finite = True
        for loss in train():
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
        if not finite:
            break
        if penalty:
            (penalty * sum((t - t0).pow(2).sum() for t, t0 in zip(params, start_s)) / channels).backward()
        opt.step()
        now = held()
        if on_step is not None:
            on_step(step, now)
        if now < best:
            best, best_step, best_s = now, step, [t.detach().clone() for t in params]
    install(best_s)
    return best, best_step


def _compile_start(model, config, calibration, ids) -> None:
    """Compile once with zero learning steps: the smoothing pass stores its auto-alpha factors."""
    import qpass

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=qpass.backend(config.replace(lower=False), calibration=calibration,
                                                       inductor=False),
                          dynamic=False)(ids[:, :16], use_cache=False)
    finally:
        torch._dynamo.reset()


def _decoder_layers(model: nn.Module, starts: dict) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` whose children hold the folds' linears (``model.layers``)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod):
            n = sum(any(k.startswith(f"{name}.{i}.") for i in range(len(mod))) for k in starts)
            if n and (best is None or n > best[0]):
                best = (n, name, mod)
    if best is None:
        raise ValueError("learn_layers: no list of decoder layers holds the smoothed linears")
    return best[1], best[2]


class _Stop(Exception):
    pass


def _layer_inputs(model: nn.Module, first: nn.Module, sequences: list[Tensor]):
    """The first decoder layer's hidden states and keyword arguments for every sequence."""
    xs, kws = [], []

    def hook(module, args, kwargs):
        kw = dict(kwargs)
        if len(args) > 1:
            raise ValueError("learn_layers: the decoder layer takes more than one positional argument")
        x = args[0] if args else kw.pop("hidden_states")
        kw["use_cache"] = False
        kw.pop("past_key_values", None)
        xs.append(x.detach().float().clone())
        kws.append({k: _detach(v) for k, v in kw.items()})
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in sequences:
                try:
                    model(ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return xs, kws


def _detach(v):
    if isinstance(v, Tensor):
        return v.detach().float() if v.is_floating_point() else v.detach()
    if isinstance(v, tuple):
        return tuple(_detach(t) for t in v)
    return v


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _gqa_index(channels: int, head_dim: int, groups: int) -> Tensor:
    """o_proj input channel -> v_proj output row: query head ``h`` reads key-value head ``h // groups``."""
    j = torch.arange(channels)
    return (j // head_dim // groups) * head_dim + j % head_dim


def _token_error(y: Tensor, ref: Tensor) -> Tensor:
    return ((y - ref).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp(min=1e-30)).mean()


class _Linear(nn.Module):
    """A linear replaced by its smoothed, fake-quantized output (``fsbr``'s), plus its bias."""

    def __init__(self, replay: "_Replay", lin: fsbr.BlockLinear, bias: Tensor | None):
        super().__init__()
        self.replay, self.lin, self.bias_ = [replay], lin, bias

    def forward(self, x: Tensor) -> Tensor:
        r = self.replay[0]
        y = fsbr._quantized_output(r.block, self.lin, x, r.log_s)
        return y if self.bias_ is None else y + self.bias_


class _Replay:
    def __init__(self, layer: nn.Module, block: fsbr.Block, keys: list[str], linears: dict[str, str], path: str,
                 config: QuantConfig):
        self.layer, self.block, self.keys, self.path, self.config = layer, block, keys, path, config
        self.log_s = [s.double().log().float() for s in block.init]
        self.moved = False
        for rel, full in linears.items():
            parent, _, attr = rel.rpartition(".")
            mod = layer.get_submodule(parent) if parent else layer
            old = getattr(mod, attr)
            bias = None if old.bias is None else old.bias.detach().float().clone()
            setattr(mod, attr, _Linear(self, block.linears[full], bias))

    @classmethod
    def build(cls, layer: nn.Module, path: str, folds: dict[str, Tensor], config: QuantConfig,
              calibration: Calibration) -> tuple["_Replay | None", str]:
        """The layer's quantized replay, or None and why not."""
        if not folds:
            return None, "no smoothing fold in it"
        linears: dict[str, fsbr.BlockLinear] = {}
        names: dict[str, str] = {}
        for rel in dict.fromkeys(r for consumers in _FOLDS for r in consumers):
            try:
                mod = layer.get_submodule(rel)
            except AttributeError:
                return None, f"it has no {rel} (not a Llama-family decoder layer with separate q/k/v/o and gate/up/down)"
            if type(mod) is not nn.Linear:
                return None, f"{path}.{rel} is a {type(mod).__name__}, not an nn.Linear"
            st = calibration.get(f"{path}.{rel}")
            if st is None or st.samples is None:
                return None, f"{path}.{rel} has no calibration samples"
            names[rel] = f"{path}.{rel}"
            linears[names[rel]] = fsbr.BlockLinear(names[rel], mod.weight.detach().float().clone(),
                                                   st.samples.float().clone(), lo=st.min.float().clone(),
                                                   hi=st.max.float().clone())
        init, keys = [], []
        for key, s in folds.items():
            rel = tuple(p[len(path) + 1:] for p in key.split("+"))
            if rel not in _FOLDS:
                return None, f"a fold into {', '.join(key.split('+'))} this module does not know"
            absorber, mapping = _FOLDS[rel]
            fold = len(init)
            k_in = linears[names[rel[0]]].w.shape[1]
            if mapping == "gqa":
                attn = layer.get_submodule("self_attn")
                hd, groups = getattr(attn, "head_dim", None), getattr(attn, "num_key_value_groups", None)
                if not isinstance(hd, int) or not isinstance(groups, int):
                    return None, "its attention has no head_dim / num_key_value_groups"
                index = _gqa_index(k_in, hd, groups)
            else:
                index = torch.arange(k_in)
            if int(index.max()) + 1 != s.numel():
                return None, f"the fold into {key} has {s.numel()} factors for {k_in} input channels"
            for r in rel:
                linears[names[r]].col = (fold, index)
            if absorber is not None:
                linears[names[absorber]].row = (fold, torch.arange(s.numel()))
            init.append(s.float().clone())
            keys.append(key)
        block = fsbr.Block(linears, [], init, config.weight)
        replica = copy.deepcopy(layer).float().requires_grad_(False)
        replay = cls(replica, block, keys, names, path, config)
        replay.decide()
        return replay, ""

    def __call__(self, x: Tensor, kwargs: dict) -> Tensor:
        return _out(self.layer(x, **kwargs))

    def decide(self) -> int:
        """Static or per-token activations for each linear at the current factors, as the quantize
        pass will choose them (``fsbr.decide_activations``); how many changed."""
        return fsbr.decide_activations(self.block, self.config.activation, self.config.dynamic_fallback, self.log_s)

    def factors(self) -> dict[str, Tensor]:
        """The kept factors: the start itself (not ``exp(log(start))``) when no step beat it."""
        if not self.moved:
            return {k: s.clone() for k, s in zip(self.keys, self.block.init)}
        return {k: t.detach().exp() for k, t in zip(self.keys, self.log_s)}

    def exactness(self, x: Tensor, kwargs: dict, original: nn.Module) -> float:
        """The fold map checked against the layer: random factors folded into an fp32 copy the way the
        smoothing pass folds them into linears (absorbing rows ``/ s``, consumer columns ``* s[index]``)
        must leave its output unchanged; a wrong absorber or grouped-query index does not. (A norm
        absorber's ``1 / s`` is the consumer's ``x / s`` in the replay: nothing to check there.)"""
        gen = torch.Generator().manual_seed(0)
        folded = copy.deepcopy(original).float()
        mods = {lin.name: folded.get_submodule(lin.name[len(self.path) + 1:]) for lin in self.block.linears.values()}
        with torch.no_grad():
            for fold, s in enumerate(self.block.init):
                absorbing = [lin for lin in self.block.linears.values() if lin.row is not None and lin.row[0] == fold]
                if not absorbing:
                    continue
                r = torch.exp(0.5 * torch.randn(s.shape, generator=gen))
                for lin in absorbing:
                    m = mods[lin.name]
                    m.weight[lin.row[1]] /= r[:, None]
                    if m.bias is not None:
                        m.bias[lin.row[1]] /= r
                for lin in self.block.linears.values():
                    if lin.col is not None and lin.col[0] == fold:
                        mods[lin.name].weight.mul_(r[lin.col[1]])
            return float(_token_error(_out(folded(x, **kwargs)), _out(original(x, **kwargs))))

    def learn(self, xs, refs, kwargs, n_train: int, steps: int, lr: float, penalty: float) -> tuple[float, float, int]:
        """Adam on ``log s``; the factors with the lowest held-out error are kept (``self.log_s``).
        Returns (start, kept) held-out errors and the kept step."""
        train, held = list(range(n_train)), list(range(n_train, len(xs)))
        start_s = [t.clone() for t in self.log_s]

        def error(idx) -> float:
            with torch.no_grad():
                return sum(float(_token_error(self(xs[b], kwargs[b]), refs[b])) for b in idx) / len(idx)

        def held_error() -> float:
            self.decide()
            return error(held)

        start = held_error()
        norm = error(train)
        if steps == 0 or not (math.isfinite(start) and math.isfinite(norm) and norm > 0):
            return start, start, 0

        def install(params: list[Tensor]) -> None:
            self.log_s = params

        def losses():
            return (_token_error(self(xs[b], kwargs[b]), refs[b]) / (norm * len(train)) for b in train)

        best, best_step = _adam(start_s, install, losses, held_error, start, steps, lr, penalty)
        self.moved = bool(best_step)
        return start, best, best_step
