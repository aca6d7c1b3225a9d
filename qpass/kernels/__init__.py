"""Low-level W8A8 kernels (torch.library custom ops in namespace ``qpass``) and references.

Importing this package registers ``qpass::onednn_qlinear``, ``qpass::fbgemm_dynamic_linear`` and
``qpass::fbgemm_qlinear`` and
``qpass::onednn_grouped_qlinear`` and ``qpass::grouped_int_mm`` (fused mixture-of-experts weights). ``weight_only`` describes
ATen's weight-only int8 / int4 CPU kernels and packs for them.
"""

from .capability import (
    KERNEL_NAMES,
    PROBED_KERNELS,
    available_kernels,
    int8_dot_exact,
    int_mm_exact,
    kernel_available,
    saturation_probe_operands,
)
from .cuda import fp8_scaled_mm, int8_scaled_mm
from .experts import grouped_int_mm, onednn_grouped_qlinear
from .fbgemm import (
    FbgemmPacked,
    fbgemm_dynamic_linear,
    fbgemm_packed,
    fbgemm_packs,
    fbgemm_qlinear,
    pack_fbgemm_dynamic,
    release_fbgemm,
    retain_fbgemm,
    fbgemm_registry_bytes,
)
from .onednn import (
    OnednnInt8Weight,
    onednn_dynamic_linear,
    onednn_qlinear,
    onednn_static_linear,
    pack_onednn_int8,
)
from .quant import (
    U7_QMAX,
    U7_ZERO_POINT,
    dequantize_act_u7,
    quantize_act_u7_per_tensor,
    quantize_act_u7_per_token,
    quantize_weight_int8_per_channel,
)
from .weight_only import INT4_GROUP_SIZES, WEIGHT_ONLY_DTYPES, int4_refusal, int8_refusal, pack_int4
from .reference import (
    fbgemm_act_qparams,
    reference_fbgemm_dynamic_linear,
    reference_int_linear,
)

__all__ = [
    "KERNEL_NAMES",
    "PROBED_KERNELS",
    "FbgemmPacked",
    "OnednnInt8Weight",
    "U7_QMAX",
    "U7_ZERO_POINT",
    "available_kernels",
    "dequantize_act_u7",
    "fbgemm_act_qparams",
    "fbgemm_dynamic_linear",
    "fbgemm_packed",
    "fbgemm_packs",
    "fbgemm_qlinear",
    "fp8_scaled_mm",
    "grouped_int_mm",
    "int8_dot_exact",
    "int_mm_exact",
    "int8_scaled_mm",
    "kernel_available",
    "onednn_dynamic_linear",
    "onednn_grouped_qlinear",
    "onednn_qlinear",
    "onednn_static_linear",
    "pack_fbgemm_dynamic",
    "pack_onednn_int8",
    "quantize_act_u7_per_tensor",
    "quantize_act_u7_per_token",
    "quantize_weight_int8_per_channel",
    "reference_fbgemm_dynamic_linear",
    "reference_int_linear",
    "release_fbgemm",
    "retain_fbgemm",
    "fbgemm_registry_bytes",
    "saturation_probe_operands",
    "INT4_GROUP_SIZES",
    "WEIGHT_ONLY_DTYPES",
    "int4_refusal",
    "int8_refusal",
    "pack_int4",
]
