"""Which low-level W8A8 kernels this process can run, and whether their u8 x s8 products are exact
(:func:`int8_dot_exact`, measured by running them once).

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
from torch import Tensor

from .fbgemm import fbgemm_packs, fbgemm_qlinear, pack_fbgemm_dynamic, release_fbgemm
from .onednn import onednn_qlinear, pack_onednn_int8

logger = logging.getLogger(__name__)

KERNEL_NAMES: tuple[str, ...] = ("onednn", "fbgemm", "int_mm", "fp8_cpu", "cuda_int8", "cuda_fp8")


def _has_op(namespace: str, name: str) -> bool:
    try:
        return hasattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False


#: The CPU kernels whose u8 x s8 products :func:`int8_dot_exact` probes.
PROBED_KERNELS: tuple[str, ...] = ("onednn", "fbgemm")


def saturation_probe_operands(k: int = 64) -> tuple[Tensor, Tensor]:
    """``(x_u8 (3, k), w_int8 (4, k))``: every u8 x s8 product at the grids' ends with one sign per
    row, so each sum of two adjacent products (``2 * 255 * 127``, ``2 * 255 * -128``) is twice what
    int16 holds; a kernel that sums pairs in saturating int16 (``vpmaddubsw``: x86 without VNNI /
    AMX, or an ISA limited by ``ONEDNN_MAX_CPU_ISA`` / ``FBGEMM_ENABLE_INSTRUCTIONS``) gets them
    wrong. Rows that cannot saturate (alternating signs or zeros) show the rest is right."""
    x = torch.full((3, k), 255, dtype=torch.uint8)
    x[1, 1::2] = 0
    x[2, ::2] = 1
    w = torch.empty(4, k, dtype=torch.int8)
    w[0], w[1] = 127, -128
    w[2] = torch.where(torch.arange(k) % 2 == 0, 127, -128)
    w[3] = torch.arange(k) % 255 - 127
    return x, w


def _probe_onednn(x: Tensor, w: Tensor) -> Tensor:
    packed = pack_onednn_int8(w, 1.0)
    return onednn_qlinear(x, 1.0, 0, packed.packed, packed.scales, None)


def _probe_fbgemm(x: Tensor, w: Tensor) -> Tensor:
    handle = pack_fbgemm_dynamic(w, 1.0)
    try:
        return fbgemm_qlinear(x.to(torch.float32), 0, handle)
    finally:
        release_fbgemm(handle)


@functools.lru_cache(maxsize=None)
def int8_dot_exact(kernel: str) -> bool:
    """Whether ``kernel`` (``"onednn"``: ``qpass::onednn_qlinear``; ``"fbgemm"``:
    ``qpass::fbgemm_qlinear``) multiplies full-range uint8 activations by full-range int8 weights
    exactly, found once per process by running it on :func:`saturation_probe_operands` and comparing
    with the int64 product (float32 holds every result exactly). CPU flags are not enough: oneDNN and
    FBGEMM each pick their instruction set at run time and can be told to use less."""
    probes = {"onednn": _probe_onednn, "fbgemm": _probe_fbgemm}
    if kernel not in probes:
        raise ValueError(f"no saturation probe for {kernel!r}; expected one of {PROBED_KERNELS}")
    x, w = saturation_probe_operands()
    exact = x.long() @ w.long().T
    got = probes[kernel](x, w)
    err = int((got.double() - exact.double()).abs().max())
    logger.debug("saturation probe of %s: max error %d (products up to %d)", kernel, err, int(exact.abs().max()))
    return err == 0


@functools.lru_cache(maxsize=None)
def int_mm_exact() -> bool:
    """Whether ``torch._int_mm`` on CPU multiplies full-range int8 operands exactly (it runs
    oneDNN, which without VNNI, or limited by ``ONEDNN_MAX_CPU_ISA``, can sum pairs in saturating
    int16). Found once per process on worst-case operands against the int64 product."""
    x, w = saturation_probe_operands()
    xs = (x.to(torch.int16) - 128).to(torch.int8).repeat(11, 1)  # 33 rows: _int_mm wants M > 16
    ws = torch.cat([w, -w.clamp(min=-127)]).repeat(2, 1)  # 16 columns, both signs
    exact = xs.long() @ ws.long().T
    got = torch._int_mm(xs, ws.T)
    err = int((got.long() - exact).abs().max())
    logger.debug("saturation probe of torch._int_mm: max error %d", err)
    return err == 0


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
