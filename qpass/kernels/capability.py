"""Which low-level W8A8 kernels this process can run.

Names understood by :func:`kernel_available`:

``"onednn"``
    ``onednn::qlinear_prepack`` / ``onednn::qlinear_pointwise`` (x86 CPU, oneDNN built in).
``"fbgemm"``
    ``quantized::linear_dynamic`` backed by FBGEMM (x86 CPU), while ``torch.backends.quantized.engine``
    is ``"fbgemm"`` or ``"x86"`` (the only engines that pack FBGEMM weights, see :func:`fbgemm_packs`).
``"int_mm"``
    ``torch._int_mm`` on CPU (always present; slow reference).
``"fp8_cpu"``
    ``torch._scaled_mm`` with float8_e4m3fn on CPU (slow reference).
``"cuda_int8"``
    ``torch._int_mm`` on a CUDA device.
``"cuda_fp8"``
    ``torch._scaled_mm`` with float8 on a CUDA device of compute capability 8.9 or newer.
"""

from __future__ import annotations

import functools
import logging

import torch

from .fbgemm import fbgemm_packs

logger = logging.getLogger(__name__)

KERNEL_NAMES: tuple[str, ...] = ("onednn", "fbgemm", "int_mm", "fp8_cpu", "cuda_int8", "cuda_fp8")


def _has_op(namespace: str, name: str) -> bool:
    try:
        return hasattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from ``/proc/cpuinfo`` (empty set where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_int8_dot() -> bool:
    """True when the CPU has a non-saturating u8 x s8 dot product (AVX512-VNNI, AVX-VNNI or AMX).

    Without it (plain AVX2 / AVX-512F), oneDNN and FBGEMM multiply with ``vpmaddubsw``, which
    saturates the sum of two adjacent u8*s8 products to int16: full-range (8-bit) uint8
    activations then give wrong results, 7-bit activations (values <= 127) are exact.
    """
    flags = cpu_flags()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def kernel_available(name: str) -> bool:
    """Whether the kernel family ``name`` (one of :data:`KERNEL_NAMES`) can run here."""
    if name == "onednn":
        return (
            torch.backends.mkldnn.is_available()
            and _has_op("onednn", "qlinear_prepack")
            and _has_op("onednn", "qlinear_pointwise")
        )
    if name == "fbgemm":
        return "fbgemm" in torch.backends.quantized.supported_engines and _has_op(
            "quantized", "linear_dynamic"
        ) and fbgemm_packs()
    if name == "int_mm":
        return hasattr(torch, "_int_mm")
    if name == "fp8_cpu":
        return hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn")
    if name == "cuda_int8":
        return torch.cuda.is_available() and hasattr(torch, "_int_mm")
    if name == "cuda_fp8":
        if not (torch.cuda.is_available() and hasattr(torch, "_scaled_mm")):
            return False
        if torch.version.hip is not None:
            return False
        return torch.cuda.get_device_capability() >= (8, 9)
    raise ValueError(f"unknown kernel name {name!r}; expected one of {KERNEL_NAMES}")


def available_kernels() -> dict[str, bool]:
    """``{name: kernel_available(name)}`` for every known kernel family."""
    return {name: kernel_available(name) for name in KERNEL_NAMES}
