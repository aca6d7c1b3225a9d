"""Named configurations. Each is a ``QuantConfig``; change one with ``.replace(...)``."""

from __future__ import annotations

from qpass.config import AdaDim, IntegerOnly, OutlierSplit, PerGroup, PerOutputChannel, PerTensor, PerToken, QuantConfig, QuantSpec, Smoothing

__all__ = ["PRESETS", "preset"]

_INT8_W = QuantSpec("int8", PerOutputChannel())
_FP8_W = QuantSpec("fp8_e4m3", PerOutputChannel())

PRESETS: dict[str, QuantConfig] = {
    # INT8 per-token dynamic activations with a zero point per token, per-channel weights, SmoothQuant with alpha
    # searched per pattern (O1-like). The zero point spends the 256 levels on [min, max] of each token, whose
    # outlier channels are mostly one-signed (SmolLM2, 20 x 1024 tokens: +0.71% perplexity against +1.01%).
    "w8a8_dynamic": QuantConfig(_INT8_W, QuantSpec("int8", PerToken(), symmetric=False), Smoothing("auto")),
    # INT8 per-tensor static activations (scale from calibration after smoothing), per-channel weights (O3-like, fastest);
    # a linear whose calibration outputs lose over 1.5x more through the static scale than per-token runs per-token
    # (SmolLM2: 145 of 210 linears, within 0.6% of fp32 perplexity on two texts; at 8x, 80 linears and +3.0% / +1.2%).
    "w8a8_static": QuantConfig(
        _INT8_W, QuantSpec("int8", PerTensor(), dynamic=False), Smoothing("auto"), dynamic_fallback=1.5
    ),
    # INT8 per-tensor dynamic activations, per-channel weights (O2-like).
    "w8a8_tensor_dynamic": QuantConfig(_INT8_W, QuantSpec("int8", PerTensor()), Smoothing("auto")),
    # FP8 e4m3 per-token (per-row) dynamic activations, per-row weights.
    "fp8_dynamic": QuantConfig(_FP8_W, QuantSpec("fp8_e4m3", PerToken()), Smoothing(0.5)),
    # FP8 e4m3 per-tensor static activations, per-tensor weights.
    "fp8_static": QuantConfig(
        QuantSpec("fp8_e4m3", PerTensor()), QuantSpec("fp8_e4m3", PerTensor(), dynamic=False), Smoothing("auto")
    ),
    # INT8 per-channel weights, fp32 activations (weight-only).
    "w8a16": QuantConfig(_INT8_W, None, None),
    # INT4 weights in groups of 32 input channels with a scale and an integer zero point each (asymmetric, the
    # compressed-tensors scheme, so it saves), fp32 activations. zero_point="float" fits GGUF Q4_1 blocks exactly.
    "w4a16": QuantConfig(QuantSpec("int4", PerGroup(32), symmetric=False, zero_point="int"), None, None),
    # Grouped AdaDim (weight-only, 4 and 3 bits, asymmetric with float zero points): per layer, groups of 128 consecutive
    # input channels of a row (PerGroup) or of 128 consecutive output channels of a column (PerInputChannelGroup),
    # whichever reconstructs the layer's output on the calibration samples better; needs calibration samples
    # (without them: PerGroup). 128 must divide both dimensions of every quantized linear (not SmolLM2's 576:
    # use ``.replace(weight=QuantSpec("int3", AdaDim(64), symmetric=False))`` there).
    "w4a16_adadim": QuantConfig(QuantSpec("int4", AdaDim(128), symmetric=False), None, None),
    "w3a16_adadim": QuantConfig(QuantSpec("int3", AdaDim(128), symmetric=False), None, None),
    # LLM.int8(): outlier input channels (calibrated absmax > 2x the layer's median channel) stay fp32,
    # the rest INT8 per-token. On SmolLM2 that keeps 5.5% of the input channels fp32 (3x: about half as
    # many, +0.68% perplexity against +0.29%). The absolute threshold 6 suits OPT-scale hidden states; on
    # SmolLM2 it kept 7.2% of channels fp32, most of some late down_proj, and missed the outliers below 6.
    # I-LLM integer-only: int8 per-channel weights, int8 per-token asymmetric activations, and every op between the
    # embedding and lm_head on integers (DI-MatMul, DI-ClippedSoftmax, DI-Norm, DI-SiLU); auto-alpha smoothing where
    # it folds exactly ("skip": a float multiply in front of a linear would be a float op in the integer region).
    "illm_w8a8": QuantConfig(
        _INT8_W, QuantSpec("int8", PerToken(), symmetric=False), Smoothing("auto", fallback="skip"),
        integer_only=IntegerOnly(),
    ),
    "llm_int8": QuantConfig(_INT8_W, QuantSpec("int8", PerToken()), None, outliers=OutlierSplit(threshold=None, ratio=2.0)),
}


def preset(name: str, **changes) -> QuantConfig:
    """``preset("w8a8_static", skip=("lm_head", "*.down_proj"))``."""
    if name not in PRESETS:
        raise KeyError(f"unknown qpass preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]
