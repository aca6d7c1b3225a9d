"""Named configurations. Each is a ``QuantConfig``; change one with ``.replace(...)``."""

from __future__ import annotations

from qpass.config import OutlierSplit, PerGroup, PerOutputChannel, PerTensor, PerToken, QuantConfig, QuantSpec, Smoothing

__all__ = ["PRESETS", "preset"]

_INT8_W = QuantSpec("int8", PerOutputChannel())
_FP8_W = QuantSpec("fp8_e4m3", PerOutputChannel())

PRESETS: dict[str, QuantConfig] = {
    # INT8 per-token dynamic activations, per-channel weights, SmoothQuant alpha 0.5 (O1-like).
    "w8a8_dynamic": QuantConfig(_INT8_W, QuantSpec("int8", PerToken()), Smoothing(0.5)),
    # INT8 per-tensor static activations (scale from calibration after smoothing), per-channel weights (O3-like, fastest).
    "w8a8_static": QuantConfig(_INT8_W, QuantSpec("int8", PerTensor(), dynamic=False), Smoothing("auto")),
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
    # LLM.int8(): input channels with calibrated absmax > 6 stay fp32, the rest INT8 per-token.
    "llm_int8": QuantConfig(_INT8_W, QuantSpec("int8", PerToken()), None, outliers=OutlierSplit(6.0)),
}


def preset(name: str, **changes) -> QuantConfig:
    """``preset("w8a8_static", skip=("lm_head", "*.down_proj"))``."""
    if name not in PRESETS:
        raise KeyError(f"unknown qpass preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**changes) if changes else PRESETS[name]
