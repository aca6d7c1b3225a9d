"""Named configurations. Each is a ``QuantConfig``; change one with ``.replace(...)``."""

from __future__ import annotations

from qpass.config import OutlierSplit, PerGroup, PerOutputChannel, PerTensor, PerToken, QuantConfig, QuantSpec, Smoothing

__all__ = ["PRESETS", "preset"]

_INT8_W = QuantSpec("int8", PerOutputChannel())
_FP8_W = QuantSpec("fp8_e4m3", PerOutputChannel())

PRESETS: dict[str, QuantConfig] = {
    # INT8 per-token dynamic activations, per-channel weights, SmoothQuant with alpha searched per pattern (O1-like).
    "w8a8_dynamic": QuantConfig(_INT8_W, QuantSpec("int8", PerToken()), Smoothing("auto")),
    # INT8 per-tensor static activations (scale from calibration after smoothing), per-channel weights (O3-like, fastest);
    # a linear whose calibration outputs lose over 8x more through the static scale than per-token runs per-token.
    "w8a8_static": QuantConfig(
        _INT8_W, QuantSpec("int8", PerTensor(), dynamic=False), Smoothing("auto"), dynamic_fallback=8.0
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
    # INT4 weights in groups of 32 input channels with a scale and zero point each (asymmetric), fp32 activations.
    "w4a16": QuantConfig(QuantSpec("int4", PerGroup(32), symmetric=False), None, None),
    # LLM.int8(): outlier input channels (calibrated absmax > 3x the layer's median channel) stay fp32,
    # the rest INT8 per-token. (The absolute threshold 6 suits OPT-scale hidden states; on SmolLM2 it kept
    # 7.2% of channels fp32, most of some late down_proj, and missed the recurring outliers below 6.)
    "llm_int8": QuantConfig(_INT8_W, QuantSpec("int8", PerToken()), None, outliers=OutlierSplit(threshold=None, ratio=3.0)),
}


def preset(name: str, **changes) -> QuantConfig:
    """``preset("w8a8_static", skip=("lm_head", "*.down_proj"))``."""
    if name not in PRESETS:
        raise KeyError(f"unknown qpass preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]
