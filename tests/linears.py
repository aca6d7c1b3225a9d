"""One linear layer, its operands and its exact integer reference, for the kernel tests
(tests/test_lower.py, tests/test_int_mm.py, tests/test_cuda.py, tests/test_weight_only_lower.py).

``proj_case`` builds the usual case: a seeded ``Proj``, an input with outlier channels and a zero
token, a calibration batch, and (``worst_case``) every operand at the end of its grid, where each
u8 x s8 product and each pair sum is as large as it gets. ``int_reference`` writes the int64 dot
products the kernel must reproduce from the definitions, independently of qpass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

import qpass
from qpass.calibration import Calibration
from qpass.passes import lower as lowering

KERNEL_PRESETS = ("w8a8_dynamic", "w8a8_static", "w8a8_tensor_dynamic")
#: The int8 kernel configs: the presets plus dynamic activations with zero points (subtracted after
#: the integer product), per token and per tensor. ``w8a8_static`` keeps its static scale on every linear
#: (no per-token fallback), so its static kernels are what the tests check.
KERNEL_CONFIGS = {
    **{name: qpass.preset(name) for name in KERNEL_PRESETS},
    "w8a8_static": qpass.preset("w8a8_static", dynamic_fallback=None),
    "asym per-token": qpass.preset("w8a8_dynamic", activation=qpass.QuantSpec("int8", qpass.PerToken(), symmetric=False)),
    "asym per-tensor": qpass.preset(
        "w8a8_tensor_dynamic", activation=qpass.QuantSpec("int8", qpass.PerTensor(), symmetric=False)),
}


class Proj(nn.Module):
    def __init__(self, k: int, n: int, bias: bool):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=bias)

    def forward(self, x):
        return self.proj(x)


def run_backend(model, config, calib, x, *, inductor=True):
    """``(y, backend)``: ``model(x)`` compiled from scratch through qpass's backend."""
    torch._dynamo.reset()
    backend = qpass.backend(config, calibration=calib, inductor=inductor)
    with torch.no_grad():
        y = torch.compile(model, backend=backend, dynamic=False)(x)
    return y, backend


def inputs(m: int, k: int, seed: int, worst_case: bool) -> torch.Tensor:
    """``(1, m, k)`` activations with outlier channels, a zero row, and (``worst_case``) every
    activation at the top of its grid (uint8 255, or 127 on the 7-bit grid): with the weights of
    :func:`worst_case_weight` every u8 x s8 product is as large as it gets, and so is each pair sum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, m, k, generator=g)
    x[..., :3] *= 30.0
    if worst_case:
        x[0, :, :] = 5.0
    if m > 2:
        x[0, 1] = 0.0  # an all-zero token: its scale is clamped, its output is the bias
    return x


def worst_case_weight(n: int, k: int) -> torch.Tensor:
    """Every weight at +-absmax (int8 +-127, or +-63 on the 7-bit grid), one sign per output row."""
    return torch.where(torch.arange(n)[:, None] % 2 == 0, 1.0, -1.0).expand(n, k) * 0.3


class ProjCase(NamedTuple):
    model: Proj
    x: torch.Tensor  # (1, m, k)
    calib_x: torch.Tensor  # (1, 64, k), the calibration batch
    calib: Calibration  # of ``model`` on ``calib_x``


def proj_case(m: int, k: int, n: int, *, bias: bool = True, worst_case: bool = False) -> ProjCase:
    """A ``Proj(k, n)`` seeded by ``(m, k)``, an input of ``m`` tokens and its calibration on 64 tokens;
    ``worst_case``: weights from :func:`worst_case_weight` and inputs at the top of the grid."""
    torch.manual_seed(m * 1000 + k)
    model = Proj(k, n, bias).eval()
    if worst_case:
        with torch.no_grad():
            model.proj.weight.copy_(worst_case_weight(n, k))
    x = inputs(m, k, seed=m + k, worst_case=worst_case)
    calib_x = inputs(64, k, seed=99, worst_case=worst_case)
    return ProjCase(model, x, calib_x, qpass.calibrate(model, [calib_x]))


def int_reference(model: Proj, x: torch.Tensor, config: qpass.QuantConfig, calib,
                  grid: lowering.Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """``(acc, unit)``: the exact int64 dot products on ``grid`` and the float value of one integer
    unit per element (activation scale x weight scale), written out from the definitions."""
    w = model.proj.weight.detach().float()
    s8 = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    # In float32, as ``qpass.quantize`` defines it (and as a checkpoint's weights are quantized): a
    # float32 quotient can round onto a tie its float64 value misses (-0.21818244 / 0.0028520580 is
    # -76.5 in float32, rounded half to even to -76; -76.5000016 in float64, -77).
    w8 = torch.clamp(torch.round(w / s8[:, None]), -127, 127).double()
    s8 = s8.double()
    qw, qa = grid.w_qmax, grid.act_qmax
    w_k = torch.clamp(torch.round(w8 * qw / 127), -qw, qw)  # requantized from the int8 weights
    s_k = s8 * 127 / qw
    xf = x.reshape(-1, x.shape[-1]).float()
    act = config.activation
    if not act.symmetric:  # integers in [0, 2 * qa + 1] with a zero point per token (or tensor)
        per_token = isinstance(act.granularity, qpass.PerToken)
        lo = (xf.amin(dim=1, keepdim=True) if per_token else xf.amin().reshape(1, 1)).clamp(max=0)
        hi = (xf.amax(dim=1, keepdim=True) if per_token else xf.amax().reshape(1, 1)).clamp(min=0)
        qmax = 2 * qa + 1
        sx = ((hi - lo) / qmax).clamp(min=1e-12)
        zp = torch.clamp(-torch.round(lo / sx), 0, qmax)
        x_q = torch.clamp(torch.round(xf / sx) + zp, 0, qmax) - zp
        return x_q.long() @ w_k.long().T, sx.double() * s_k[None, :]
    if not act.dynamic:  # the reference's static scale, rescaled to the grid
        st = calib["proj"]
        ref = (torch.maximum(-st.min.min(), st.max.max()).clamp(min=0) / 127).clamp(min=1e-12).reshape(1, 1)
        sx = (ref.double() * (127.0 / qa)).float()
    elif isinstance(act.granularity, qpass.PerToken):
        sx = (xf.abs().amax(dim=1, keepdim=True) / qa).clamp(min=1e-12)
    else:
        sx = (xf.abs().amax() / qa).clamp(min=1e-12).reshape(1, 1)
    x_q = torch.clamp(torch.round(xf / sx), -qa - 1, qa)
    acc = x_q.long() @ w_k.long().T
    return acc, sx.double() * s_k[None, :]
