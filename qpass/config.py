"""Configuration: what to quantize, how finely, and how to smooth.

Every config is a frozen dataclass that validates itself in ``__post_init__`` and
does nothing else; behaviour lives in the passes, keyed by config type.

Shapes, for a linear ``y = x @ W.T`` with ``x: (tokens, K)`` and ``W: (N, K)``::

    PerTensor()         one scale                      W: (1, 1)   x: (1, 1)
    PerToken()          one scale per row of x                     x: (tokens, 1)
    PerOutputChannel()  one scale per row of W         W: (N, 1)
    PerInputChannel()   one scale per column of W      W: (1, K)
    PerGroup(128)       one scale per 128 columns      W: (N, K // 128)   (per-output-channel groups)
    PerInputChannelGroup(128)  one per 128 rows        W: (N // 128, K)   (per-input-channel groups)
    AdaDim()            PerInputChannel or PerOutputChannel, chosen per layer
    AdaDim(128)         PerInputChannelGroup(128) or PerGroup(128), chosen per layer
"""

from __future__ import annotations

import dataclasses
import math
import fnmatch
from dataclasses import dataclass, field
from typing import Literal, Union

import torch

__all__ = [
    "PerTensor",
    "PerToken",
    "PerOutputChannel",
    "PerInputChannel",
    "PerGroup",
    "PerInputChannelGroup",
    "AdaDim",
    "Granularity",
    "QuantSpec",
    "Smoothing",
    "OutlierSplit",
    "IntegerOnly",
    "QuantConfig",
    "DTYPES",
]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # bools and NaN refused


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerToken:
    """One scale per token (row) of an activation; always dynamic."""


@dataclass(frozen=True)
class PerOutputChannel:
    """One scale per output channel (row) of a weight."""


@dataclass(frozen=True)
class PerInputChannel:
    """One scale per input channel (column) of a weight."""


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``group_size`` consecutive input channels of each weight row."""

    group_size: int

    def __post_init__(self) -> None:
        if not _is_int(self.group_size) or self.group_size <= 0:
            raise ValueError(f"PerGroup.group_size must be a positive int, got {self.group_size!r}")


@dataclass(frozen=True)
class PerInputChannelGroup:
    """One scale per ``group_size`` consecutive output channels of each weight column: the
    transpose of ``PerGroup``. A weight ``(N, K)`` has ``(N // group_size, K)`` scales, so a
    column behind an outlier activation channel (or holding outlier weights) gets scales of its own."""

    group_size: int

    def __post_init__(self) -> None:
        if not _is_int(self.group_size) or self.group_size <= 0:
            raise ValueError(f"PerInputChannelGroup.group_size must be a positive int, got {self.group_size!r}")


@dataclass(frozen=True)
class AdaDim:
    """Per layer, whichever of two granularities reconstructs the layer's output on the
    calibration samples with the smaller error: PerInputChannel or PerOutputChannel, or with
    ``group_size=g``, PerInputChannelGroup(g) or PerGroup(g) (per-input-channel against
    per-output-channel groups, for low-bit weights)."""

    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size <= 0):
            raise ValueError(f"AdaDim.group_size must be a positive int or None, got {self.group_size!r}")


Granularity = Union[PerTensor, PerToken, PerOutputChannel, PerInputChannel, PerGroup, PerInputChannelGroup, AdaDim]

# dtype name -> (storage dtype, qmin, qmax); float8 ranges are the format's finite max.
DTYPES: dict[str, tuple[torch.dtype, float, float]] = {
    "int8": (torch.int8, -128, 127),
    "uint8": (torch.uint8, 0, 255),
    "int4": (torch.int8, -8, 7),  # stored one value per int8
    "int3": (torch.int8, -4, 3),  # stored one value per int8
    "fp8_e4m3": (torch.float8_e4m3fn, -448.0, 448.0),
}

WEIGHT_GRANULARITIES = (PerTensor, PerOutputChannel, PerInputChannel, PerGroup, PerInputChannelGroup, AdaDim)
#: Weight dtypes below 8 bits: weight-only (no integer kernel takes them with quantized activations).
LOW_BIT = ("int4", "int3")
ACTIVATION_GRANULARITIES = (PerTensor, PerToken)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``QuantSpec("int8", PerToken())`` quantizes each token of an activation with its
    own symmetric scale computed at run time; ``QuantSpec("int8", PerTensor(),
    dynamic=False)`` uses one scale taken from calibration. For weights,
    ``QuantSpec("int4", PerGroup(32), symmetric=False)`` gives each group of 32 a
    scale and a zero point, mapping its [min, max] onto the 16 levels (weight-only);
    ``"int3"`` does the same on 8 levels [-4, 3].
    ``zero_point`` says what kind of zero point an asymmetric weight gets: ``"float"`` puts the
    block's minimum and maximum exactly on the grid (GGUF Q4_1's ``d * q + m``); ``"int"`` is an
    integer on the grid itself, for a range widened to hold 0 (what the compressed-tensors format
    stores, so ``qpass.save`` can write it).
    """

    dtype: Literal["int8", "uint8", "int4", "int3", "fp8_e4m3"]
    granularity: Granularity
    symmetric: bool = True
    dynamic: bool = True
    zero_point: Literal["float", "int"] = "float"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"QuantSpec.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("symmetric", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"QuantSpec.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.granularity, (*WEIGHT_GRANULARITIES, *ACTIVATION_GRANULARITIES)):
            raise TypeError(f"QuantSpec.granularity must be a granularity, got {self.granularity!r}")
        if self.zero_point not in ("float", "int"):
            raise ValueError(f"QuantSpec.zero_point must be 'float' or 'int', got {self.zero_point!r}")
        if self.dtype == "fp8_e4m3" and not self.symmetric:
            raise ValueError("QuantSpec: fp8_e4m3 has no zero point; use symmetric=True")
        if isinstance(self.granularity, PerToken) and not self.dynamic:
            raise ValueError("QuantSpec: PerToken scales are computed at run time; use dynamic=True")

    @property
    def storage_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def qrange(self) -> tuple[float, float]:
        return DTYPES[self.dtype][1], DTYPES[self.dtype][2]


@dataclass(frozen=True)
class Smoothing:
    """SmoothQuant: ``s_j = a_j**alpha / w_j**(1 - alpha)`` per input channel.

    ``alpha="auto"`` searches ``alpha_grid`` per pattern for the smallest error of the
    quantized layer outputs on calibration samples (with ``QuantConfig.dynamic_fallback``,
    each layer scored static or per-token as it will run at that alpha). Where no preceding op can absorb
    ``1/s``, ``fallback="multiply"`` inserts ``x * (1/s)`` before the linears and
    ``"skip"`` leaves them unsmoothed.

    ``alpha="learned"`` (FSBR, ``qpass.fsbr``): starts from the auto-alpha factors and learns one factor
    per channel of every fold by block reconstruction on the calibration samples: ``steps`` Adam steps
    (default 100) on ``log s`` with learning rate ``lr`` (default 0.01) per block, with ``penalty``
    (default 1.0) times the mean squared distance of ``log s`` from the auto-alpha start added to the
    relative block error. The last quarter of the samples (whole calibration sequences) is held out
    and the step with the lowest error there is kept (the start, if no step beats it). Calibrate with
    enough samples (``calibrate(..., samples=512)``; under 256 training rows a block warns). On
    SmolLM2 the learned factors did not beat auto alpha's perplexity (README). The folds are the
    same; the learned factors are kept in the calibration (``Calibration.save`` writes them), so a
    second compile with the same config does not learn again (nor search alpha). ``Smoothing("learned", steps=50)``.
    ``qpass.fsbr_layers.learn_layers(model, config, calibration, sequences)`` learns the same factors
    from whole decoder-layer outputs instead (attention replayed, full sequences) and stores them there;
    with ``target="logits"`` it learns all layers' factors together on the quantized model's next-token
    KL divergence from fp32, which on SmolLM2 beat auto alpha on both held-out texts for
    ``w8a8_tensor_dynamic``, and for ``w8a8_static`` on the calibration's kind of text only (README).
    """

    alpha: float | Literal["auto", "learned"] = 0.5
    fallback: Literal["multiply", "skip"] = "multiply"
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
    steps: int | None = None  # alpha="learned" only; None: 100
    lr: float | None = None  # alpha="learned" only; None: 0.01
    penalty: float | None = None  # alpha="learned" only; None: 1.0

    def __post_init__(self) -> None:
        if self.alpha not in ("auto", "learned") and not (_is_number(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"Smoothing.alpha must be in [0, 1], 'auto' or 'learned', got {self.alpha!r}")
        if (self.steps is not None or self.lr is not None or self.penalty is not None) and self.alpha != "learned":
            raise ValueError(f"Smoothing: steps, lr and penalty apply to alpha='learned' only, got alpha={self.alpha!r}")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 0):
            raise ValueError(f"Smoothing.steps must be an int >= 0, got {self.steps!r}")
        if self.lr is not None and not (_is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Smoothing.lr must be a finite number > 0, got {self.lr!r}")
        if self.penalty is not None and not (_is_number(self.penalty) and math.isfinite(self.penalty) and self.penalty >= 0):
            raise ValueError(f"Smoothing.penalty must be a finite number >= 0, got {self.penalty!r}")
        if self.fallback not in ("multiply", "skip"):
            raise ValueError(f"Smoothing.fallback must be 'multiply' or 'skip', got {self.fallback!r}")
        if not isinstance(self.alpha_grid, tuple) or not self.alpha_grid or not all(
            _is_number(a) and 0.0 <= a <= 1.0 for a in self.alpha_grid
        ):
            raise ValueError(f"Smoothing.alpha_grid must be non-empty values in [0, 1], got {self.alpha_grid!r}")

    @property
    def learn_steps(self) -> int:
        return 100 if self.steps is None else self.steps

    @property
    def learn_lr(self) -> float:
        return 0.01 if self.lr is None else float(self.lr)

    @property
    def learn_penalty(self) -> float:
        return 1.0 if self.penalty is None else float(self.penalty)


@dataclass(frozen=True)
class OutlierSplit:
    """LLM.int8()-style decomposition: some input channels stay in high precision, the
    rest are quantized, and the two partial products are summed. Give exactly one rule:

    - ``threshold``: channels whose calibrated absmax exceeds ``threshold`` (LLM.int8()'s 6.0);
    - ``ratio``: channels whose calibrated absmax exceeds ``ratio`` times the layer's median
      channel absmax (the same test, scale-free: ``OutlierSplit(ratio=3.0)``);
    - ``top_k``: the ``top_k`` channels with the largest calibrated absmax.

    ``common_size`` (threshold and ratio rules): every linear of one role, the layers whose module
    paths differ only in a block number (``model.layers.*.mlp.down_proj``), keeps as many channels
    as the one of them the rule gives most, each adding its next-largest channels to its own. More
    channels stay in floating point, never fewer, and the decoder blocks have the same shapes, so
    they compile to one graph (``qpass/blocks.py``); each layer's own count is in its report row.
    ``common_size=False`` keeps exactly the channels the rule picks in each layer. Fused experts
    (grouped matmuls) keep their own widths.
    """

    threshold: float | None = 6.0
    top_k: int | None = None
    ratio: float | None = None
    common_size: bool = True

    def __post_init__(self) -> None:
        given = [name for name in ("threshold", "top_k", "ratio") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"OutlierSplit: give exactly one of threshold, top_k and ratio (got {', '.join(given) or 'none'}; "
                "pass threshold=None with top_k or ratio)"
            )
        if self.threshold is not None and not (_is_number(self.threshold) and self.threshold > 0):
            raise ValueError(f"OutlierSplit.threshold must be > 0, got {self.threshold!r}")
        if self.ratio is not None and not (_is_number(self.ratio) and self.ratio > 1):
            raise ValueError(f"OutlierSplit.ratio must be > 1 (a multiple of the median channel absmax), got {self.ratio!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k <= 0):
            raise ValueError(f"OutlierSplit.top_k must be a positive int, got {self.top_k!r}")
        if not isinstance(self.common_size, bool):
            raise TypeError(f"OutlierSplit.common_size must be a bool, got {self.common_size!r}")


@dataclass(frozen=True)
class IntegerOnly:
    """I-LLM integer-only inference: between the embedding and ``lm_head`` every op runs on integers
    (qpass.intops). Each switch set to False runs that component in float between a dequantize and a
    quantize instead (an ablation; the integer-region check then reports those float ops):
    ``softmax`` DI-ClippedSoftmax (clip ``clip`` below the row max), ``norm`` DI-Norm,
    ``act`` DI-SiLU / DI-GELU."""

    softmax: bool = True
    norm: bool = True
    act: bool = True
    clip: float = 15.0

    def __post_init__(self) -> None:
        for name in ("softmax", "norm", "act"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"IntegerOnly.{name} must be a bool, got {getattr(self, name)!r}")
        if not (_is_number(self.clip) and 0 < self.clip <= 64):
            raise ValueError(f"IntegerOnly.clip must be in (0, 64], got {self.clip!r}")


@dataclass(frozen=True)
class QuantConfig:
    """What qpass does to every linear of the captured graph.

    ``weight=None`` and ``activation=None`` with ``smoothing=Smoothing()`` only folds
    SmoothQuant scales (the model computes the same function). ``skip`` holds module
    paths or glob patterns (``"lm_head"``, ``"*.mlp.down_proj"``) left untouched.
    ``lower=True`` replaces quantized linears by low-precision kernels where one fits.
    ``dynamic_fallback`` (static activations only): a linear whose calibration samples lose
    more than this many times as much output accuracy through the static per-tensor scale
    as through per-token dynamic scales runs per-token dynamic instead; each such layer is
    logged and named in the report (the massive activations some LLMs put on one token make
    any single static scale useless for a few layers, e.g. SmolLM2's down_proj in layers 11 and 28).
    ``dynamic_layers`` names layers that run per-token dynamic activations under a static config
    (what a saved checkpoint records for its per-token fallbacks; ``qpass.load`` sets it).
    ``weight_only`` names layers (paths or globs, e.g. ``("lm_head",)``) whose weights are quantized
    as ``weight`` says while their activations stay in floating point and they are not smoothed; it
    wins over ``skip`` for the layers it names. The presets skip ``lm_head``, SmolLM2's 113 MB of fp32
    read per generated token; ``weight_only=("lm_head",)`` stores it as int8 and, at one token, runs
    it as a reduction over the stored integers.
    ``split_weights`` (lowering on CPUs whose int8 kernels saturate int16 pair sums, i.e. without
    VNNI): ``0.0`` (the default) runs every int8 linear with its weights split into two 7-bit halves
    (one GEMM of twice the depth: exactly the reference's 8-bit integers, at about twice the GEMM
    time), so the lowered model computes the reference path's numbers on every CPU. ``None`` trades
    that for speed: each linear runs on 7-bit weights or 7-bit activations, whichever reproduces its
    calibration outputs better (SmolLM2: about 0.5 points of perplexity for ``w8a8_dynamic``, 1.5 for
    ``w8a8_static``). ``d > 0`` splits only the linears whose best 7-bit grid's output error on their
    calibration samples (relative squared error, ``qmath.token_error``) exceeds the 8-bit integers'
    by more than ``d`` (``0.0005``: 0.05%). Named per layer in the report; no effect on CPUs with VNNI.
    To keep only the low-precision weights resident, call ``QPassBackend.release_weights(model)``
    after compiling (a backend never sees the module itself, and a recompile needs the fp32 weights).
    """

    weight: QuantSpec | None = field(default_factory=lambda: QuantSpec("int8", PerOutputChannel()))
    activation: QuantSpec | None = field(default_factory=lambda: QuantSpec("int8", PerToken()))
    smoothing: Smoothing | None = field(default_factory=Smoothing)
    outliers: OutlierSplit | None = None
    skip: tuple[str, ...] = ("lm_head",)
    lower: bool = True
    dynamic_fallback: float | None = None
    dynamic_layers: tuple[str, ...] = ()  # static activations: these layers (paths or globs) run per-token dynamic
    integer_only: IntegerOnly | None = None  # I-LLM: no float op between embedding and lm_head (qpass.passes.integer)
    split_weights: float | None = 0.0
    weight_only: tuple[str, ...] = ()  # these layers (paths or globs): weights as ``weight`` says, activations float

    def __post_init__(self) -> None:
        if not isinstance(self.dynamic_layers, tuple) or not all(isinstance(s, str) for s in self.dynamic_layers):
            raise TypeError(f"QuantConfig.dynamic_layers must be a tuple of module paths, got {self.dynamic_layers!r}")
        if self.dynamic_layers and (self.activation is None or self.activation.dynamic):
            raise ValueError("QuantConfig.dynamic_layers applies to static activations only (activation.dynamic=False)")
        for name in ("skip", "weight_only"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))  # stays hashable
        if not isinstance(self.weight_only, tuple) or not all(isinstance(s, str) for s in self.weight_only):
            raise TypeError(f"QuantConfig.weight_only must be a tuple of module paths, got {self.weight_only!r}")
        if self.weight_only and self.weight is None:
            raise ValueError("QuantConfig.weight_only: the config quantizes no weights")
        if self.weight_only and self.integer_only is not None:
            raise ValueError("QuantConfig.weight_only: the integer-only region has no float activations; use skip")
        if not isinstance(self.skip, tuple) or not all(isinstance(s, str) for s in self.skip):
            raise TypeError(f"QuantConfig.skip must be a tuple of module paths, got {self.skip!r}")
        for name, kind in (("weight", QuantSpec), ("activation", QuantSpec), ("smoothing", Smoothing), ("outliers", OutlierSplit)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"QuantConfig.{name} must be a qpass.{kind.__name__} or None, got {value!r}")
        if not isinstance(self.lower, bool):
            raise TypeError(f"QuantConfig.lower must be a bool, got {self.lower!r}")
        w, a = self.weight, self.activation
        if w is not None:
            if not isinstance(w.granularity, WEIGHT_GRANULARITIES):
                raise ValueError(f"QuantConfig.weight: {type(w.granularity).__name__} is not a weight granularity")
            if not w.symmetric and a is not None:
                raise ValueError(
                    "QuantConfig.weight: asymmetric weights (symmetric=False) are weight-only (activation=None); "
                    "the W8A8 kernels take symmetric weights"
                )
            if w.dtype == "uint8":
                raise ValueError("QuantConfig.weight: uint8 weights are not supported; use int8")
        if a is not None:
            if not isinstance(a.granularity, ACTIVATION_GRANULARITIES):
                raise ValueError(
                    f"QuantConfig.activation: {type(a.granularity).__name__} is not an activation granularity "
                    "(use PerTensor or PerToken)"
                )
            if a.dtype in LOW_BIT:
                raise ValueError(f"QuantConfig.activation: {a.dtype} activations are not supported")
            if w is None:
                raise ValueError("QuantConfig: activation quantization needs weight quantization too")
            if (a.dtype == "fp8_e4m3") != (w.dtype == "fp8_e4m3"):
                raise ValueError("QuantConfig: fp8_e4m3 activations need fp8_e4m3 weights and vice versa")
            if a.dtype.startswith("int") and w.dtype in LOW_BIT:
                raise ValueError(f"QuantConfig: {w.dtype} weights are weight-only (activation=None)")
        if self.integer_only is not None:
            if not isinstance(self.integer_only, IntegerOnly):
                raise TypeError(f"QuantConfig.integer_only must be a qpass.IntegerOnly or None, got {self.integer_only!r}")
            if w is None or w.dtype != "int8" or not isinstance(w.granularity, PerOutputChannel) or not w.symmetric:
                raise ValueError("QuantConfig.integer_only needs int8 symmetric PerOutputChannel weights")
            if a is None or a.dtype != "int8" or not isinstance(a.granularity, PerToken):
                raise ValueError("QuantConfig.integer_only needs int8 PerToken activations (DI-MatMul quantizes per token)")
            if self.outliers is not None:
                raise ValueError("QuantConfig.integer_only: an outlier split keeps channels in float; use outliers=None")
        if self.outliers is not None and a is None:
            raise ValueError("QuantConfig.outliers needs activation quantization")
        if self.dynamic_fallback is not None:
            if a is None or a.dynamic:
                raise ValueError("QuantConfig.dynamic_fallback applies to static activations only (activation.dynamic=False)")
            if not (_is_number(self.dynamic_fallback) and self.dynamic_fallback >= 1):
                raise ValueError(f"QuantConfig.dynamic_fallback must be >= 1 (an error ratio), got {self.dynamic_fallback!r}")

        if self.split_weights is not None and not (_is_number(self.split_weights) and self.split_weights >= 0):
            raise ValueError(f"QuantConfig.split_weights must be >= 0 (an error difference) or None, got {self.split_weights!r}")

    def runs_dynamic(self, path: str) -> bool:
        """True if the layer at ``path`` is listed in ``dynamic_layers`` (per-token dynamic activations)."""
        return any(skip_matches(s, path) for s in self.dynamic_layers)

    def skips(self, path: str) -> bool:
        """True if the module at ``path`` is excluded by ``skip`` (and not named by ``weight_only``)."""
        return any(skip_matches(s, path) for s in self.skip) and not self.quantizes_weight_only(path)

    def quantizes_weight_only(self, path: str) -> bool:
        """True if the linear at ``path`` is named by ``weight_only``: its weight quantized as
        ``weight`` says, its input left in floating point, no smoothing."""
        return any(skip_matches(s, path) for s in self.weight_only)

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)


def skip_matches(pattern: str, path: str) -> bool:
    """``"lm_head"`` matches ``lm_head`` and ``model.lm_head``; globs match whole paths."""
    return path == pattern or path.endswith("." + pattern) or fnmatch.fnmatchcase(path, pattern)
