"""Lower quantized linears to low-precision kernels (oneDNN / FBGEMM on x86, ``_int_mm`` / ``_scaled_mm`` on CUDA).

Before (``quantize``: dynamic per-token INT8 activations, per-output-channel weights)::

    s = qpass.choose_qparams(x, True, True, -128, 127)[0]
    x_dq = qpass.dequantize(qpass.quantize(x, s, None, -128, 127, i8), s, None, 0, f32)
    y = linear(x_dq, qpass.dequantize(const(W_q), const(W_s), None, 0, f32), b)

After (an x86 kernel whose probe found u8 x s8 products saturating, as without VNNI, so one operand
has 7 bits; this layer's calibration samples were reproduced better with 8-bit activations and
weights requantized to 7 bits)::

    s = qpass.choose_qparams(x, True, True, -128, 127)[0]
    y = qpass.onednn_qlinear(qpass.quantize(x, s, const(128), 0, 255, u8), 1.0, 128, const(packed W7), const(W7_s), None) * s + b

Weight-only linears with bf16 activations run ATen's weight-only CPU kernels
(``y = _weight_int8pack_mm(x, const(W_q), const(W_s bf16)) + b``, or ``_weight_int4pack_mm_for_cpu``);
an outlier split (LLM.int8()) lowers its inlier linear and keeps the outlier columns' float linear.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from qpass import kernels, ops, qmath
from qpass.calibration import Calibration
from qpass.config import QuantConfig
from qpass.graph import QGraph, meta_value, storage_mark
from qpass.passes.decode import reduction_linear
from qpass.report import Report

logger = logging.getLogger(__name__)

__all__ = ["lower", "shared_input_groups", "FUSE_SHARED_INPUT", "Target", "Grid", "QLinear", "QExperts", "match",
           "match_experts", "choose", "cpu_grids", "kernel_grids", "grid_error", "narrow_weight", "split_weight", "DECODE_M"]

#: Token counts up to this are "decode": the FBGEMM kernel beats oneDNN there (see bench/speed.py).
DECODE_M = 16


@dataclass(frozen=True)
class Target:
    """What the linear's device can run: found from the device (``Target.detect``) or given in tests."""

    device: str  # "cpu" or "cuda"
    onednn: bool = False
    fbgemm: bool = False
    # Whether the CPU kernels' u8 x s8 products are exact on full-range operands (no int16
    # saturation): None asks each kernel's probe (``kernels.int8_dot_exact``); True / False forces it.
    int8_dot: bool | None = None
    # Whether ``torch._int_mm`` runs here exactly on full-range int8 (its probe, ``kernels.int_mm_exact``):
    # the CPU int8 kernel of choice then (``_emit_cpu_int_mm``)
    int_mm: bool = False
    capability: tuple[int, int] | None = None  # CUDA compute capability

    @staticmethod
    def detect(device: torch.device) -> "Target":
        if device.type == "cuda":
            return Target("cuda", capability=torch.cuda.get_device_capability(device))
        if device.type == "cpu":
            fbgemm = kernels.kernel_available("fbgemm")
            if not fbgemm and "fbgemm" in torch.backends.quantized.supported_engines:
                _log_fbgemm_refused(torch.backends.quantized.engine)
            int_mm = kernels.kernel_available("int_mm") and _probed_int_mm()
            return Target("cpu", onednn=kernels.kernel_available("onednn"), fbgemm=fbgemm, int_mm=int_mm)
        return Target(device.type)


@functools.lru_cache(maxsize=None)
def _log_fbgemm_refused(engine: str) -> None:
    logger.info("qpass lower: torch.backends.quantized.engine is %r and only 'fbgemm' / 'x86' pack FBGEMM weights; "
                "qpass does not change it, so decode-sized linears use oneDNN", engine)


@dataclass(frozen=True)
class Grid:
    """The integer grid a CPU kernel multiplies: activations in ``[-act_qmax - 1, act_qmax]``, stored
    as uint8 with zero point ``act_qmax + 1``; weights in ``[-w_qmax, w_qmax]``."""

    act_qmax: int
    w_qmax: int
    note: str  # shown in the report's kernel column
    # The 8-bit weights run as two 7-bit halves side by side along K (``split_weight``) against the
    # activations twice: one GEMM of twice the depth, exact where u8 x s8 pair sums saturate int16.
    halves: bool = False

    @property
    def act_zp(self) -> int:
        return self.act_qmax + 1

    @property
    def act_range(self) -> tuple[float, float]:
        return float(-self.act_qmax - 1), float(self.act_qmax)


#: The reference's grid: exact only where u8 x s8 products do not saturate int16 (VNNI / AMX).
GRID_8BIT = Grid(127, 127, "")
# Without VNNI, AVX2's ``vpmaddubsw`` sums pairs of u8 x s8 products in saturating int16, so one
# operand gives up a bit; both choices are exact (2 * 255 * 63 and 2 * 127 * 127 are < 2**15).
#: 7-bit weights, 8-bit activations (the activations carry the outliers).
GRID_W7 = Grid(127, 63, "7-bit weights")
#: 7-bit activations, 8-bit weights (better where smoothing moved the outliers into the weights).
GRID_A7 = Grid(63, 127, "7-bit act")
#: 8-bit activations and weights on a saturating kernel: each int8 weight w = hi + lo with both halves
#: in [-64, 64] (2 * 255 * 64 < 2**15), the activations repeated along K, so the one GEMM's int32
#: accumulator holds exactly the 8-bit reference's integers, at about twice the GEMM time.
GRID_SPLIT = Grid(127, 127, "8-bit split weights", halves=True)
SPLIT_ALL = "8-bit products saturate int16 on this CPU: weights split into two 7-bit halves (the 8-bit integers exactly)"


def cpu_grids(target: Target, kernel: str) -> tuple[Grid, ...]:
    """The exact grids of ``kernel`` (``"onednn"`` or ``"fbgemm"``) on ``target``, the default first."""
    if kernel == "cpu_int_mm":  # chosen only where it is exact
        return (GRID_8BIT,)
    exact = target.int8_dot if target.int8_dot is not None else _probed_int8_dot(kernel)
    return (GRID_8BIT,) if exact else (GRID_W7, GRID_A7)


def kernel_grids(target: Target, kernel: str, split_weights: float | None) -> tuple[Grid, ...]:
    """The grids a linear on ``kernel`` can run on with ``QuantConfig.split_weights``, the default
    first: the 8-bit grid where 8-bit products are exact; where they saturate, the split weights
    (``0.0``), the 7-bit grids (``None``), or either by calibration error (``d > 0``)."""
    grids = cpu_grids(target, kernel)
    if len(grids) == 1:
        return grids
    if split_weights == 0.0:
        return (GRID_SPLIT,)
    return grids if split_weights is None else grids + (GRID_SPLIT,)


@functools.lru_cache(maxsize=None)
def _probed_int_mm() -> bool:
    exact = kernels.int_mm_exact()
    logger.info("qpass lower: torch._int_mm %s", "is exact on full-range int8: int8 linears run on it" if exact else
                "saturates int16 pair sums (no VNNI / AMX): int8 linears run on oneDNN / FBGEMM's 7-bit grids")
    return exact


@functools.lru_cache(maxsize=None)
def _probed_int8_dot(kernel: str) -> bool:
    exact = kernels.int8_dot_exact(kernel)
    logger.info(
        "qpass lower: %s: a worst-case probe of the kernel (u8 255 x s8 127 / -128) %s", kernel,
        "is exact: int8 layers use the 8-bit grids" if exact else
        "saturates int16 pair sums (no VNNI / AMX, or a limited ISA): so that no product can saturate, "
        "int8 layers run with their weights split into two 7-bit halves (split_weights=0.0, the default: the 8-bit "
        "integers at about twice the GEMM time) or on 7-bit weights or activations (split_weights=None or > 0)")
    return exact


def grid_error(x: Tensor, w_q: Tensor, w_scale: Tensor, grid: Grid, *, per_token: bool,
               static_scale: float | None, symmetric: bool = True) -> float:
    """Relative squared error on ``grid`` of the linear's output on samples ``x`` (S, K), averaged
    over tokens (``qmath.token_error``), against the unquantized input times the reference's
    int8 weights ``w_q * w_scale`` (N, K). ``symmetric=False``: dynamic activations with a zero
    point, on ``[0, 2 * act_qmax + 1]``."""
    w = w_q.float() * w_scale.reshape(-1, 1)
    target = x @ w.T
    if not symmetric:  # the kernels' own asymmetric quantization (``_Emit._asymmetric_act``)
        qmax = float(2 * grid.act_qmax + 1)
        sx, zp = ops.choose_qparams(x, per_token, False, 0.0, qmax)
        xq = ops.dequantize(ops.quantize(x, sx, zp, 0.0, qmax, torch.float32), sx, zp, 0, torch.float32)
    else:
        if static_scale is not None:
            sx = torch.tensor(static_scale * 127.0 / grid.act_qmax)
        else:
            absmax = x.abs().amax(dim=-1, keepdim=True) if per_token else x.abs().amax()
            sx = (absmax / grid.act_qmax).clamp(min=1e-12)
        lo, hi = grid.act_range
        xq = torch.clamp(torch.round(x / sx), lo, hi) * sx
    wq, ws = narrow_weight(w_q, w_scale.reshape(-1, 1), grid.w_qmax)
    y = xq @ (wq.float() * ws).T
    return qmath.token_error(y, target)


def narrow_weight(w_q: Tensor, w_scale: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """Requantize symmetric int8 weights ``w_q * w_scale`` (scale per row or per tensor) onto
    ``[-qmax, qmax]``: ``(w_q', scale')`` with ``scale' = scale * 127 / qmax``."""
    if qmax == 127:
        return w_q, w_scale
    ratio = 127.0 / qmax
    w = torch.clamp(torch.round(w_q.float() / ratio), -qmax, qmax).to(torch.int8)
    return w, (w_scale.double() * ratio).float()


def split_weight(w_q: Tensor) -> Tensor:
    """``(N, K)`` int8 -> ``(N, 2K)`` int8 ``[hi | lo]`` with ``hi + lo == w_q``, ``hi = floor(w / 2)``
    in [-64, 63] and ``lo = ceil(w / 2)`` in [-64, 64]: ``cat([x, x], -1) @ split.T == x @ w_q.T``."""
    w = w_q.to(torch.int16)
    hi = torch.div(w, 2, rounding_mode="floor")
    return torch.cat([hi, w - hi], dim=1).to(torch.int8)


@dataclass
class ActQuant:
    """The reference activation quantization in front of a linear."""

    x: fx.Node  # the float input
    x_q: fx.Node  # qpass.quantize(x, scale, zp, qmin, qmax, dtype)
    x_dq: fx.Node  # qpass.dequantize(x_q, ...), shared by every linear reading x
    scale: fx.Node  # getitem(choose_qparams(...), 0) or a constant
    zero_point: fx.Node | None  # getitem(choose_qparams(...), 1) or a constant; None when symmetric
    dynamic: bool
    per_token: bool
    symmetric: bool
    dtype: torch.dtype  # storage dtype: int8 or float8_e4m3fn


@dataclass
class QLinear:
    """One quantized linear as the quantize pass left it (see its docstring)."""

    path: str
    out: fx.Node  # linear(x_dq, w_dq, b); an add for an outlier split
    act: ActQuant | None
    w_q: fx.Node  # const(W_q), (N, K)
    w_scale: fx.Node  # const(W_s): (N, 1) per output channel, (1, 1) per tensor
    group_size: int
    bias: fx.Node | None
    weight_dtype: str  # the config's weight dtype ("int8", "int4", "fp8_e4m3")
    m: int | None  # tokens (product of the leading dims); None when symbolic
    device: torch.device
    out_dtype: torch.dtype
    w_zero_point: fx.Node | None = None  # const (N, K / G) float zero points (asymmetric weights)
    linear: fx.Node | None = None  # the quantized linear: ``out`` itself, or its inlier part in an outlier split

    @property
    def split(self) -> bool:
        """An outlier split: ``out`` adds the inlier linear and the outlier columns' float linear."""
        return self.linear is not self.out

    @property
    def per_channel(self) -> bool:
        shape = tuple(meta_value(self.w_scale).shape)
        return len(shape) == 2 and shape[1] == 1 and shape[0] > 1

    @property
    def per_tensor(self) -> bool:
        return meta_value(self.w_scale).numel() == 1


# Why a linear with quantized activations keeps the reference quant/dequant path: checked in order,
# first hit wins. (Weight-only linears: ``_choose_weight_only``. An outlier split lowers its inlier
# linear by these rules; its outlier columns' linear stays in floating point.)
_REFERENCE_RULES: tuple[tuple[str, Callable[[QLinear, Target], bool]], ...] = (
    ("int4 weights", lambda q, t: q.weight_dtype == "int4"),
    # A scale per block of K (or per column of W) cannot be applied after the integer dot product.
    ("per-group weights", lambda q, t: q.group_size > 0),
    ("per-input-channel weights", lambda q, t: not (q.per_channel or q.per_tensor)),
    # Dynamic asymmetric activations run with the zero points subtracted after the integer product
    # (``zp * sum_k W[n, k]``); a static zero point has no 7-bit counterpart yet.
    ("asymmetric static activations", lambda q, t: not q.act.symmetric and not q.act.dynamic),
    # _scaled_mm on CPU is an emulation, 2-30x slower than fp32 (FACTS.md).
    ("fp8 on CPU", lambda q, t: q.act.dtype != torch.int8 and t.device == "cpu"),
    ("oneDNN not available", lambda q, t: t.device == "cpu" and not t.onednn and not t.int_mm),
    ("fp8 needs CUDA compute capability 8.9+", lambda q, t: t.device == "cuda" and q.act.dtype != torch.int8
     and (t.capability or (0, 0)) < (8, 9)),
    ("no kernel for this device", lambda q, t: t.device not in ("cpu", "cuda")),
)


def match_act(x_dq) -> ActQuant | None:
    """The quantize pass's activation quant/dequant whose dequantized output is ``x_dq``; None where
    the input is not quantized (weight-only)."""
    if not (isinstance(x_dq, fx.Node) and x_dq.target is ops.dequantize):
        return None
    x_q = x_dq.args[0]
    x, scale, zp, _qmin, _qmax, dtype = x_q.args
    src = scale.args[0] if scale.op == "call_function" and scale.target is operator.getitem else None
    dynamic = src is not None and src.target is ops.choose_qparams
    return ActQuant(x=x, x_q=x_q, x_dq=x_dq, scale=scale, zero_point=zp, dynamic=dynamic,
                    per_token=dynamic and bool(src.args[1]), symmetric=zp is None, dtype=dtype)


def match(qg: QGraph, out: fx.Node, path: str, config: QuantConfig) -> QLinear:
    """Read the quantize pass's nodes around the linear ``out``."""
    lin = out if out.target is F.linear else next(a for a in out.args if isinstance(a, fx.Node) and a.target is F.linear)
    x_dq, w_dq, bias = (list(lin.args) + [None])[:3]
    act = match_act(x_dq)
    x_val = meta_value(act.x if act else x_dq)
    lead = x_val.shape[:-1]
    m = 1
    for d in lead:
        m = m * d if isinstance(d, int) and isinstance(m, int) else None
    return QLinear(
        path=path, out=out, act=act, w_q=w_dq.args[0], w_scale=w_dq.args[1], group_size=w_dq.args[3], bias=bias,
        weight_dtype=config.weight.dtype, m=m, device=meta_value(w_dq.args[0]).device, out_dtype=meta_value(lin).dtype,
        w_zero_point=w_dq.args[2], linear=lin,
    )


def choose(q: QLinear, target: Target) -> tuple[str, str]:
    """``(kernel, why)``: the kernel name from ``KERNELS``, or ``"reference"`` and the reason."""
    if q.act is None:
        return _choose_weight_only(q, target)
    for why, applies in _REFERENCE_RULES:
        if applies(q, target):
            return "reference", why
    if target.device == "cuda":
        return ("cuda_int8" if q.act.dtype == torch.int8 else "cuda_fp8"), ""
    if target.int_mm and target.int8_dot is not False:
        return "cpu_int_mm", ""
    decode = q.m is not None and q.m <= DECODE_M
    return ("fbgemm" if decode and target.fbgemm else "onednn"), ""


#: Most tokens a float32 weight-only linear runs as a reduction for (``_emit_cpu_wo_reduction``).
WEIGHT_ONLY_REDUCTION_M = 1

#: Weight-only kernels per weight dtype (CPU; ``qpass.kernels.weight_only``).
_WEIGHT_ONLY_KERNELS = {"int8": "cpu_w8", "int4": "cpu_w4"}


def _choose_weight_only(q: QLinear, target: Target) -> tuple[str, str]:
    """``choose`` for a linear with unquantized activations: ATen's weight-only CPU kernels where
    they are fast (bf16 activations) and take the weight's shape and scheme."""
    kernel = _WEIGHT_ONLY_KERNELS.get(q.weight_dtype)
    if target.device != "cpu":
        return "reference", "weight-only (its kernels here are CPU kernels)"
    if q.m is not None and q.m <= WEIGHT_ONLY_REDUCTION_M and meta_value(q.linear.args[0]).dtype == torch.float32:
        return "cpu_wo_reduction", ""
    if kernel is None:
        return "reference", f"weight-only {q.weight_dtype}: no kernel"
    dtype = meta_value(q.linear.args[0]).dtype
    if dtype not in kernels.WEIGHT_ONLY_DTYPES:
        # Measured: 10-80x slower than a float linear with float32 / float16 activations (kernels.weight_only).
        return "reference", f"weight-only with {str(dtype).removeprefix('torch.')} activations (its kernels are fast with bfloat16 only)"
    n, k = meta_value(q.w_q).shape
    if kernel == "cpu_w8":
        if q.group_size > 0:
            return "reference", "per-group int8 weights (the int8 weight-only kernel takes a scale per output channel)"
        if q.w_zero_point is not None:
            return "reference", "asymmetric int8 weights (the int8 weight-only kernel has no zero points)"
        if not (q.per_channel or q.per_tensor):
            return "reference", "per-input-channel weights"
        why = kernels.int8_refusal(n, k)
    else:
        why = kernels.int4_refusal(n, k, q.group_size)
    return ("reference", why) if why else (kernel, "")


# ----------------------------------------------------------------------------- emitters


class _Emit:
    """Graph-building helpers shared by the kernels of one pass run (one graph)."""

    def __init__(self, qg: QGraph, calibration: Calibration | None, split_weights: float | None = None):
        self.qg = qg
        self.calibration = calibration
        self.split_weights = split_weights  # QuantConfig.split_weights
        self.doubled: dict[fx.Node, fx.Node] = {}  # x_q -> cat([x_q, x_q], -1), for GRID_SPLIT
        self.acts: dict[tuple, tuple[fx.Node, fx.Node | float]] = {}  # (x_dq, act_qmax, as_float) -> (x_q, scale)
        self.zps: dict[int, fx.Node] = {}
        self.smoothing = {qg.module_of(n): s for n, s in qg.smoothing.items()}  # path -> s (input divided by)
        self.grids: dict[str, tuple[Grid, str]] = qg.memo.setdefault("grids", {})  # path -> (grid, why), per backend

    def settled_grid(self, path: str, target: Target, kernel: str) -> Grid | None:
        """The grid ``path`` already runs on (once per backend), or the only one ``split_weights``
        leaves it (recorded with why); None when the calibration samples have to choose."""
        if path in self.grids:
            return self.grids[path][0]
        if kernel_grids(target, kernel, self.split_weights) == (GRID_SPLIT,):
            self.grids[path] = (GRID_SPLIT, SPLIT_ALL)
            return GRID_SPLIT
        return None

    def grid(self, q: QLinear, target: Target, kernel: str) -> Grid:
        """The exact grid for ``q`` on ``target``'s ``kernel`` with the smallest output error on the
        calibration samples (the default grid without samples)."""
        if (settled := self.settled_grid(q.path, target, kernel)) is not None:
            return settled
        grids = cpu_grids(target, kernel)
        stats = self.calibration.get(q.path) if self.calibration is not None else None
        if len(grids) == 1 or stats is None or stats.samples is None:
            self.grids[q.path] = (grids[0], "")
            return grids[0]
        s = self.smoothing.get(q.path)
        x = stats.samples.float() / (s if s is not None else 1.0)
        if q.split:  # what reaches the inlier linear: the outlier channels masked out
            x = x * self.qg.value(q.act.x.args[1])
        static = None if q.act.dynamic else float(self.qg.value(q.act.scale))
        w_q, w_s = self.qg.value(q.w_q), self.qg.value(q.w_scale).float()
        if self.split_weights is not None:  # the 8-bit integers (GRID_SPLIT computes them exactly)
            grids = grids + (GRID_8BIT,)
        errors = [grid_error(x, w_q, w_s, g, per_token=q.act.per_token, static_scale=static,
                             symmetric=q.act.symmetric) for g in grids]
        best = min(range(len(grids)), key=errors.__getitem__)
        why = "kernel grid by calibration error: " + ", ".join(
            f"{g.note or '8-bit'} {100 * e:.2f}%" for g, e in zip(grids, errors))
        if self.split_weights is not None:
            e8, best = errors[-1], min(range(len(grids) - 1), key=errors.__getitem__)
            if errors[best] - e8 > self.split_weights:
                self.grids[q.path] = (GRID_SPLIT, f"{why}: 7-bit over 8-bit by more than {100 * self.split_weights:g}%, split")
                return GRID_SPLIT
        self.grids[q.path] = (grids[best], why)
        return grids[best]

    def call(self, target, args, before: fx.Node, kwargs=None) -> fx.Node:
        return self.qg.call(target, tuple(args), kwargs, before=before)

    def zero_point(self, zp: int) -> fx.Node:
        if zp not in self.zps:
            self.zps[zp] = self.qg.constant(f"act_zero_point_{zp}", torch.tensor(float(zp)))
        return self.zps[zp]

    def quantized_act(self, q: QLinear, grid: Grid, before: fx.Node, *,
                      as_float: bool = False) -> tuple[fx.Node, fx.Node | float, fx.Node | None]:
        """``(x_u8, scale, zp)``: the activation on ``grid`` stored as uint8 (one per input and grid,
        shared by q / k / v); ``scale`` is a node (dynamic) or a float (static). On the 8-bit grid
        this is the reference's own quantization.

        Symmetric: the integers carry the grid's fixed zero point (``grid.act_zp``) and ``zp`` is
        None. Asymmetric (dynamic): the integers lie in ``[0, 2 * act_qmax + 1]`` with the zero
        point ``zp`` of each row (or of the tensor) added, a node the caller subtracts after the
        integer product (``zp * sum_k W[n, k]``), as the kernels take one zero point per tensor.

        ``as_float=True`` gives the integers as float32, without the grid's zero point (FBGEMM's input)."""
        a = q.act
        key = (a.x_dq, grid.act_qmax, as_float)
        if key not in self.acts:
            if not a.symmetric:
                self.acts[key] = self._asymmetric_act(q, grid, before, as_float)
                return self.acts[key]
            lo, hi = grid.act_range
            if a.dynamic and grid.act_qmax == 127:
                scale = s_node = a.scale
            elif a.dynamic:
                pair = self.call(ops.choose_qparams, (a.x, a.per_token, True, lo, hi), before)
                scale = s_node = self.call(operator.getitem, (pair, 0), before)
            else:
                scale = float(self.qg.value(a.scale).double() * (127.0 / grid.act_qmax))
                s_node = a.scale if grid.act_qmax == 127 else self.qg.constant(
                    f"{q.path}.input_scale_{grid.act_qmax}", torch.tensor([scale], dtype=torch.float32))
            if as_float:
                xq = self.call(ops.quantize, (a.x, s_node, None, lo, hi, torch.float32), before)
            else:
                zp = self.zero_point(grid.act_zp)
                xq = self.call(ops.quantize, (a.x, s_node, zp, lo + grid.act_zp, hi + grid.act_zp, torch.uint8), before)
            self.acts[key] = (xq, scale, None)
        return self.acts[key]

    def act_for(self, x_q: fx.Node, grid: Grid, before: fx.Node) -> fx.Node:
        """``x_q``, or ``cat([x_q, x_q], -1)`` against the ``[hi | lo]`` weights of ``GRID_SPLIT``
        (once per input, shared by the linears reading it)."""
        if not grid.halves:
            return x_q
        if x_q not in self.doubled:
            self.doubled[x_q] = self.call(torch.cat, ([x_q, x_q], -1), before)
        return self.doubled[x_q]

    def _asymmetric_act(self, q: QLinear, grid: Grid, before: fx.Node, as_float: bool):
        a = q.act
        qmax = float(2 * grid.act_qmax + 1)  # 255 on the 8-bit grid, 127 on the 7-bit one
        if grid.act_qmax == 127:
            # The reference's int8 grid [-128, 127] shifted by 128: the same integers.
            scale, zp = a.scale, self.call(torch.add, (a.zero_point, 128.0), before)
        else:
            pair = self.call(ops.choose_qparams, (a.x, a.per_token, False, 0.0, qmax), before)
            scale = self.call(operator.getitem, (pair, 0), before)
            zp = self.call(operator.getitem, (pair, 1), before)
        dtype = torch.float32 if as_float else torch.uint8
        xq = self.call(ops.quantize, (a.x, scale, zp, 0.0, qmax, dtype), before)
        return xq, scale, zp

    def zero_point_correction(self, q: QLinear, y: fx.Node, zp: fx.Node | None, w_q: Tensor,
                              w_s: Tensor, name: str, before: fx.Node) -> fx.Node:
        """``y - zp * (w_s * sum_k w_q[:, k])``: removes an asymmetric activation's zero point from
        ``y = x_u8 @ (w_q * w_s).T`` (``zp`` of shape (..., 1) per token, or (1,) per tensor)."""
        if zp is None:
            return y
        # once per backend and layer (exact: an int8 row sums exactly in int32), shared by its graphs
        colsum = self.packed(name, q.path, w_q, w_s, lambda: (w_q.sum(dim=1, dtype=torch.int32).double() * w_s.double()).float())
        colsum = self.qg.constant(f"{q.path}.{name}", colsum)
        return self.call(torch.sub, (y, self.call(torch.mul, (zp, colsum), before)), before)

    def finish(self, q: QLinear, y: fx.Node, scale: fx.Node | None, bias: fx.Node | None, before: fx.Node) -> fx.Node:
        """``y * scale + bias`` as aten ops (Inductor fuses them with what follows), in the output dtype."""
        if scale is not None:
            y = self.call(torch.mul, (y, scale), before)
        if bias is not None:
            y = self.call(torch.add, (y, bias), before)
        if meta_value(y).dtype != q.out_dtype:
            y = self.call(torch.ops.prims.convert_element_type.default, (y, q.out_dtype), before)
        return y

    def sizes(self, x: fx.Node, before: fx.Node) -> list[int | fx.Node]:
        """``x``'s sizes for a new node's arguments: ints where static, ``aten.sym_size`` nodes where
        symbolic (dynamic shapes), so that no traced size is written into the graph."""
        return [d if isinstance(d, int) else self.call(torch.ops.aten.sym_size.int, (x, i), before)
                for i, d in enumerate(meta_value(x).shape)]

    def packed(self, kind: str, path: str, w_q: Tensor, w_s: Tensor, pack: Callable):
        """``pack()``, once per backend for the same layer and integers: every graph the backend
        compiles (prefill, decode, recompiles) shares the packed weight instead of holding its own
        copy. An FBGEMM handle gets one registry user per graph (each graph releases its own)."""
        key = _packed_key(self.qg.memo, kind, path, w_q, w_s)
        cached = self.qg.memo.get(key)
        if kind == "fbgemm" and cached is not None:
            try:
                kernels.retain_fbgemm(cached)
            except KeyError:  # every graph that used it is gone
                cached = None
        if cached is None:
            cached = self.qg.memo[key] = pack()
        return cached

    def weight(self, q: QLinear, grid: Grid) -> tuple[Tensor, Tensor]:
        """The int8 ``(N, K)`` weight on ``grid`` (``(N, 2K)`` halves on ``GRID_SPLIT``) and its
        ``(N,)`` float32 scales."""
        if isinstance(q.w_q, Tensor):  # a shared-input group's concatenated weights (``_emit_shared_input``)
            return q.w_q, q.w_scale
        w_q = self.qg.value(q.w_q)
        w_s = self.qg.value(q.w_scale).float().reshape(-1).expand(w_q.shape[0]).contiguous()
        if grid.halves:
            return split_weight(w_q), w_s
        return narrow_weight(w_q, w_s, grid.w_qmax)


def _packed_key(memo: dict, kind: str, path: str, w_q: Tensor, w_s: Tensor) -> tuple:
    """``_Emit.packed``'s cache key: a digest of the integers and scales, taken again only when they
    are not the very tensors (same storages, views and version counters, the storages alive) the
    last digest of this layer was taken of: a loaded checkpoint's graphs hand on the same stored
    integers, and hashing them was ~0.2 s per graph for SmolLM2."""
    marks = (storage_mark(w_q), storage_mark(w_s))
    seen = memo.get(("packed_key", kind, path))
    if seen is not None and seen[0] == marks and all(r() is not None for r in seen[1]):
        return seen[2]
    digest = hashlib.sha1(w_q.contiguous().numpy().tobytes())
    digest.update(w_s.contiguous().numpy().tobytes())
    key = ("packed", kind, path, digest.hexdigest())
    memo[("packed_key", kind, path)] = (marks, [weakref.ref(t.untyped_storage()) for t in (w_q, w_s)], key)
    return key


def _emit_onednn(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    before = q.out
    grid = e.grid(q, target, "onednn")
    w_q, w_s = e.weight(q, grid)
    packed = e.packed("onednn", q.path, w_q, w_s, lambda: kernels.pack_onednn_int8(w_q, w_s))
    pw = e.qg.constant(f"{q.path}.weight_onednn", packed.packed)
    ws = e.qg.constant(f"{q.path}.weight_scale_onednn", packed.scales)
    x_u8, scale, zp = e.quantized_act(q, grid, before)
    x_u8 = e.act_for(x_u8, grid, before)
    if isinstance(scale, fx.Node):  # dynamic: op at unit scale, then per-token (or per-tensor) rescale + bias
        kernel_zp = grid.act_zp if zp is None else 0
        y = e.call(torch.ops.qpass.onednn_qlinear.default, (x_u8, 1.0, kernel_zp, pw, ws, None), before)
        y = e.zero_point_correction(q, y, zp, w_q, packed.scales, "weight_colsum_onednn", before)
        return e.finish(q, y, scale, q.bias, before)
    y = e.call(torch.ops.qpass.onednn_qlinear.default, (x_u8, scale, grid.act_zp, pw, ws, q.bias), before)
    return e.finish(q, y, None, None, before)


def _emit_fbgemm(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    before = q.out
    grid = e.grid(q, target, "fbgemm")
    # Packed at unit scales (FBGEMM returns the integer dot products); the weight scales are a graph
    # constant applied with the activation scale, and the process-wide registry entry is freed when
    # that constant is.
    w_q, w_s = e.weight(q, grid)
    handle = e.packed("fbgemm", q.path, w_q, w_s, lambda: kernels.pack_fbgemm_dynamic(w_q, torch.ones(w_q.shape[0])))
    x_int, scale, zp = e.quantized_act(q, grid, before, as_float=True)
    x_int = e.act_for(x_int, grid, before)
    static = not isinstance(scale, fx.Node)
    ws = e.qg.constant(f"{q.path}.weight_scale_fbgemm", w_s * (scale if static else 1.0))
    weakref.finalize(getattr(e.qg.root, ws.target), kernels.release_fbgemm, handle)
    # Symmetric: integers in [-act_zp, act_zp - 1], stored by FBGEMM with the grid's zero point;
    # asymmetric: integers in [0, 2 * act_qmax + 1] with their own zero points, stored as they are.
    y = e.call(torch.ops.qpass.fbgemm_qlinear.default, (x_int, grid.act_zp if zp is None else 0, handle), before)
    y = e.zero_point_correction(q, y, zp, w_q, torch.ones(w_q.shape[0]), "weight_colsum_fbgemm", before)
    y = e.call(torch.mul, (y, ws), before)
    return e.finish(q, y, None if static else scale, q.bias, before)


def _emit_mm(e: _Emit, q: QLinear, w_q: Tensor, w_s: Tensor,
             product: Callable[[fx.Node, fx.Node], tuple[fx.Node, fx.Node]]) -> fx.Node:
    """The linear as one 2-D product of the reference's own integers (or fp8 values), the frame of
    the kernels that take them as they are (CPU ``_int_mm``, CUDA ``_int_mm`` / ``_scaled_mm``)::

        linear(dequantize(x_q, sx, zp), dequantize(W_q, W_s), b)
    ->  y2 = product(reshape(x_q, (-1, K)))                 # (M, N) float32, times sx and W_s
        y2 = y2 - (zp * sx) * const(W_s * sum_k W_q[n, k])  # asymmetric activations only
        y = reshape(y2, (..., N)) + b

    ``product(x2, before)`` gives ``(y2, sx)``: the scaled product and the activation scale it applied.
    ``w_q`` / ``w_s``: the int8 ``(N, K)`` weight and its ``(N,)`` scales (``_Emit.weight``). M and the
    output's leading sizes are read from the graph, so the lowering runs under dynamic shapes."""
    before = q.out
    n, k = w_q.shape
    x2 = e.call(torch.reshape, (q.act.x_q, (-1, k)), before)
    y2, sx = product(x2, before)
    if q.act.zero_point is not None:  # asymmetric: subtract sx * zp * sw * sum_k W[n, k]
        zp = _rows(e, q, q.act.zero_point, before)
        y2 = e.zero_point_correction(q, y2, e.call(torch.mul, (zp, sx), before), w_q, w_s, "weight_colsum", before)
    y = e.call(torch.reshape, (y2, (*e.sizes(q.act.x, before)[:-1], n)), before)
    return e.finish(q, y, None, q.bias, before)


def _rows(e: _Emit, q: QLinear, node: fx.Node, before: fx.Node) -> fx.Node:
    """A per-token activation scale or zero point as ``(M, 1)`` rows of the ``(M, N)`` product; a
    per-tensor one as it is."""
    return e.call(torch.reshape, (node, (-1, 1)), before) if q.act.per_token else node


def _emit_cuda_int8(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    return _emit_cuda(e, q, kernels.int8_scaled_mm)


def _emit_cuda_fp8(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    return _emit_cuda(e, q, kernels.fp8_scaled_mm)


def _emit_cuda(e: _Emit, q: QLinear, mm) -> fx.Node:
    """``mm(x_q (M, K), W_q.T, ...)`` (``_emit_mm``) on the reference's own integer (or fp8) grid:
    exact on CUDA. Padded to the shapes CUDA accepts (``pad=True``, also when the graph runs on CPU
    tensors)."""

    def product(x2: fx.Node, before: fx.Node) -> tuple[fx.Node, fx.Node]:
        w_t = e.call(torch.t, (q.w_q,), before)  # a column-major view of the (N, K) constant
        tensorwise = not q.act.per_token and q.per_tensor
        if tensorwise:
            sx, sw = q.act.scale, q.w_scale
        else:
            sx = e.call(torch.reshape, (q.act.scale, (-1, 1)), before)
            sw = e.call(torch.reshape, (q.w_scale, (1, -1)), before)
        if mm is kernels.fp8_scaled_mm and not tensorwise:
            # Rowwise _scaled_mm wants sm90 and bf16 output: run it unscaled in fp32, scale outside.
            y2 = e.call(mm, (x2, w_t, 1.0, 1.0, None, torch.float32, True), before)
            return e.call(torch.mul, (e.call(torch.mul, (y2, sx), before), sw), before), sx
        return e.call(mm, (x2, w_t, sx, sw, None, torch.float32, True), before), sx

    return _emit_mm(e, q, *e.weight(q, GRID_8BIT), product)


def _emit_cpu_int_mm(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    """``torch._int_mm(x_q (M, K), W_q.t())`` (``_emit_mm``) in int32 on the reference's own 8-bit
    integers, then the scales as aten ops that Inductor fuses; where the probe finds ``_int_mm`` exact
    (VNNI / AMX). The weight is the plain int8 ``(N, K)`` tensor read as a column-major ``(K, N)``
    view: nothing packed, one copy shared by every graph of the backend (prefill and decode), and no
    Python-level kernel (Inductor calls the aten op from its generated code)."""
    w_q, w_s = e.weight(q, GRID_8BIT)
    w_q = e.packed("int_mm", q.path, w_q, w_s, w_q.contiguous)
    w = e.qg.constant(f"{q.path}.weight_int8", w_q)

    def product(x2: fx.Node, before: fx.Node) -> tuple[fx.Node, fx.Node]:
        if q.m == 1:
            # torch 2.13's CPU _int_mm reads a (1, K) operand's row stride as its leading dimension, and
            # Inductor gives a size-1 dim any stride (0 for this reshape): wrong products. An explicit
            # as_strided keeps row stride K (padding to two rows also works, at 2-3x the GEMM's time).
            k = w_q.shape[1]
            x2 = e.call(torch.as_strided, (x2, (1, k), (k, 1)), before)
        acc = e.call(torch._int_mm, (x2, e.call(torch.t, (w,), before)), before)
        y2 = e.call(torch.ops.prims.convert_element_type.default, (acc, torch.float32), before)
        sx = _rows(e, q, q.act.scale, before)
        sxw = e.call(torch.mul, (sx, e.qg.constant(f"{q.path}.weight_scale", w_s)), before)
        return e.call(torch.mul, (y2, sxw), before), sx

    return _emit_mm(e, q, w_q, w_s, product)


def _emit_cpu_w8(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    """``linear(x, dequantize(W_q, W_s), b)`` -> ``_weight_int8pack_mm(x (M, K), W_q, W_s as x's dtype) + b``."""
    before, x = q.out, q.linear.args[0]
    w_q, w_s = e.weight(q, GRID_8BIT)
    n, k = w_q.shape
    dtype = meta_value(x).dtype
    # one copy for every graph of the backend (prefill, decode, recompiles), as for the other kernels
    w_q, scales = e.packed(f"int8 weight-only {dtype}", q.path, w_q, w_s, lambda: (w_q.contiguous(), w_s.to(dtype)))
    w_q = e.qg.constant(f"{q.path}.weight_int8", w_q)
    scales = e.qg.constant(f"{q.path}.weight_scale_int8pack", scales)
    x2 = e.call(torch.reshape, (x, (-1, k)), before)
    y2 = e.call(torch.ops.aten._weight_int8pack_mm.default, (x2, w_q, scales), before)
    y = e.call(torch.reshape, (y2, (*e.sizes(x, before)[:-1], n)), before)
    return e.finish(q, y, None, q.bias, before)


def _emit_cpu_w4(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    """``linear(x, dequantize(W_q, W_s, W_zp, G), b)`` -> ``_weight_int4pack_mm_for_cpu(x (M, K), packed, G,
    scales_and_zeros) + b`` (``kernels.pack_int4``: ``W = (W_q + 8 - 8) * W_s - W_zp * W_s``)."""
    before, x, qg = q.out, q.linear.args[0], e.qg
    w_q, w_s = qg.value(q.w_q), qg.value(q.w_scale).float()
    w_zp = None if q.w_zero_point is None else qg.value(q.w_zero_point).float()
    n, k = w_q.shape
    dtype = meta_value(x).dtype
    key = w_s if w_zp is None else torch.cat([w_s.flatten(), w_zp.flatten()])
    packed, sz = e.packed(f"int4 {dtype}", q.path, w_q, key, lambda: kernels.pack_int4(w_q, w_s, w_zp, dtype))
    packed = qg.constant(f"{q.path}.weight_int4pack", packed)
    sz = qg.constant(f"{q.path}.weight_scales_and_zeros", sz)
    x2 = e.call(torch.reshape, (x, (-1, k)), before)
    y2 = e.call(torch.ops.aten._weight_int4pack_mm_for_cpu.default, (x2, packed, q.group_size, sz), before)
    y = e.call(torch.reshape, (y2, (*e.sizes(x, before)[:-1], n)), before)
    return e.finish(q, y, None, q.bias, before)


def _emit_cpu_wo_reduction(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    """A weight-only linear with float32 activations at one token (any weight layout the reference
    dequantizes: int8 / int4, per channel or per group, with or without zero points)::

        linear(x, dequantize(W_q, W_s, ...), b)  ->  sum(row(x) * dequantize(W_q, W_s, ...), -1) + b   (decode.reduction_linear)

    Under Inductor the dequantization fuses into one vectorised reduction over K, parallel over the
    outputs, that reads the stored integers once: a matrix-vector product is bound by reading its
    weight, and ATen's weight-only kernels are 10-80x slower than a float linear with float32
    activations (``kernels.weight_only``). SmolLM2's 49152 x 576 ``lm_head``, 1 thread: 1.1 ms from
    int8 against 3.9 ms as the fp32 reduction (``passes.decode``) and 7.4 ms by ``aten::mm``. The
    result is the reference's products summed in another order (relative differences ~1e-6). The
    stored integers are the graph's only copy of the weight; nothing is packed."""
    before, x, w_dq = q.out, q.linear.args[0], q.linear.args[1]
    y = reduction_linear(e.qg, x, w_dq, *meta_value(w_dq).shape, before)  # the row computed once, not per output
    return e.finish(q, y, None, q.bias, before)


@dataclass(frozen=True)
class Kernel:
    """A lowering: what the report calls it and how it rewrites one linear."""

    label: str
    emit: Callable[[_Emit, QLinear, Target], fx.Node]


KERNELS: dict[str, Kernel] = {
    "onednn": Kernel("onednn", _emit_onednn),
    "fbgemm": Kernel("fbgemm", _emit_fbgemm),
    "cpu_int_mm": Kernel("int8 (_int_mm)", _emit_cpu_int_mm),
    "cuda_int8": Kernel("cuda int8 (_int_mm)", _emit_cuda_int8),
    "cuda_fp8": Kernel("cuda fp8 (_scaled_mm)", _emit_cuda_fp8),
    "cpu_w8": Kernel("int8 weight-only (_weight_int8pack_mm)", _emit_cpu_w8),
    "cpu_w4": Kernel("int4 weight-only (_weight_int4pack_mm_for_cpu)", _emit_cpu_w4),
    "cpu_wo_reduction": Kernel("weight-only reduction (one token, dequantized inside the sum)", _emit_cpu_wo_reduction),
}

#: Added to the kernel label of an outlier split's inlier linear: its outlier columns' linear stays in floating point.
SPLIT_NOTE = " + float outlier columns"


def kernel_label(name: str, grid: Grid | None = None, *, split: bool = False) -> str:
    label = KERNELS[name].label
    label = f"{label} ({grid.note})" if grid is not None and grid.note else label
    return label + SPLIT_NOTE if split else label


# ----------------------------------------------------------------------------- shared-input groups

#: Whether linears reading the same quantized activation (q / k / v, gate / up) run as one GEMM.
FUSE_SHARED_INPUT = True


def shared_input_groups(e: _Emit, plans: list[tuple[QLinear, Target, str]]) -> list[list[tuple[QLinear, Target, str]]]:
    """``plans`` (linear, target, kernel) in groups that can run as one GEMM over their concatenated
    weights, in the order of their first member (a group of one otherwise): same quantized input,
    CPU kernel, target, grid, token count and output dtype, and biases that are all absent or all
    constants of one dtype (they are concatenated too)."""
    groups: dict[tuple, list] = {}
    for plan in plans:
        q, t, name = plan
        key: tuple = (id(plan),)
        if FUSE_SHARED_INPUT and name in ("onednn", "fbgemm", "cpu_int_mm") and q.act is not None and not q.split:
            bias = None if q.bias is None else e.qg.value(q.bias)
            if q.bias is None or bias is not None:
                key = (id(q.act.x_dq), t, name, e.grid(q, t, name), q.m, q.out_dtype,
                       None if bias is None else bias.dtype)
        groups.setdefault(key, []).append(plan)
    return list(groups.values())


def _emit_shared_input(e: _Emit, qs: list[QLinear], target: Target, name: str) -> list[fx.Node]:
    """One kernel call for linears that read the same activation (each on ``grid``)::

        q = linear(x_dq, W_q_dq); k = linear(x_dq, W_k_dq); v = linear(x_dq, W_v_dq)
    ->  y = <kernel>(quantize(x), const(packed [W_q; W_k; W_v])) * s + const([b_q; b_k; b_v])
        q = clone(narrow(y, -1, 0, N_q)); k = clone(narrow(y, -1, N_q, N_k)); v = ...

    Members read only by elementwise ops (gate / up into ``act(gate) * up``) take their columns of
    the kernel's output before the epilogue instead (``_narrowed``)::

        acc = <kernel>(...);  gate = narrow(acc, -1, 0, N_g) * narrow(const(s), -1, 0, N_g) + ...

    Every output element is computed as in the linear's own lowering (same integers, same scale and
    bias arithmetic per column), so the outputs are equal to the unfused ones."""
    qg, q0 = e.qg, qs[0]
    outs = {q.out for q in qs}
    before = next(n for n in qg.graph.nodes if n in outs)
    grid = e.grid(q0, target, name)
    path = "+".join(q.path.rsplit(".", 1)[-1] for q in qs)
    path = f"{q0.path.rsplit('.', 1)[0]}.{path}" if "." in q0.path else path
    e.grids.setdefault(path, (grid, ""))
    rows, w_cat, s_cat = _concatenated(e, qs, grid, path)
    bias = None
    if any(q.bias is not None for q in qs):
        bias = qg.constant(f"{path}.bias", torch.cat([qg.value(q.bias) for q in qs]))
    fused = QLinear(path=path, out=before, act=q0.act, w_q=w_cat, w_scale=s_cat, group_size=0, bias=bias,
                    weight_dtype=q0.weight_dtype, m=q0.m, device=q0.device, out_dtype=torch.float32)
    y = KERNELS[name].emit(e, fused, target)
    ys, start = [], 0
    elementwise = all(_read_elementwise(q.out) for q in qs)
    for q, n in zip(qs, rows):
        part = _narrowed(e, y, start, n, sum(rows), before) if elementwise else e.call(torch.narrow, (y, -1, start, n), before)
        if part.target is torch.narrow:
            # contiguous, as the linear's own output was (a view of it may follow)
            part = e.call(torch.ops.aten.clone.default, (part,), before, {"memory_format": torch.contiguous_format})
        if q.out_dtype != torch.float32:
            part = e.call(torch.ops.prims.convert_element_type.default, (part, q.out_dtype), before)
        ys.append(part)
        start += n
    return ys


#: Elementwise ops of the kernels' epilogues (scales, zero-point sums, bias, dtype) that a member's
#: narrow moves through (``_narrowed``); ``reshape`` when it keeps the last dimension.
_EPILOGUE_OPS = (torch.mul, torch.sub, torch.add, torch.ops.prims.convert_element_type.default, torch.reshape)


#: Activations of gated MLPs (``act(gate) * up``) as Dynamo records them.
_ACTIVATIONS = (F.silu, F.gelu, F.relu, torch.sigmoid, torch.tanh)


def _read_elementwise(node: fx.Node) -> bool:
    """Whether every reader of ``node`` is an elementwise op (gate / up into ``act(gate) * up``), not
    a view into heads (q / k / v), where Inductor would repeat the inlined epilogue in each kernel
    that reads the heads (rotary reads q twice) and compiling takes longer."""
    return all(u.op == "call_function" and (u.target in (operator.mul, torch.mul) or u.target in _ACTIVATIONS)
               for u in node.users)


def _narrowed(e: _Emit, y: fx.Node, start: int, n: int, width: int, before: fx.Node) -> fx.Node:
    """``narrow(y, -1, start, n)`` with the narrow moved through ``y``'s elementwise epilogue down to
    the kernel's output: each member's scales and bias apply to its own columns of the shared
    accumulator. The same float operations per element as on the whole product, so the same values;
    but no member reads a float copy of the whole product, which Inductor realizes for its several
    readers: for gate / up a (tokens, 2 x FFN) float32 buffer written and read again before SiLU
    (SmolLM2, 512 tokens, 1 thread: that kernel 1094 -> 928 us per layer, the prefill 0.95x -> 0.98x
    torchao's in the same run; ``bench/results/profile_prefill_1thread.md``).

    Operands as wide as the product (``width`` last) are narrowed; broadcast ones (per-token scales
    and zero points, of last size 1, and scalars) are kept. Stops at anything else (the kernel's own
    output) with a plain narrow."""
    if y.op == "call_function" and y.target in _EPILOGUE_OPS:
        if y.target is torch.reshape:
            src, shape = y.args
            if meta_value(src).shape[-1] == width and shape[-1] == width:
                return e.call(torch.reshape, (_narrowed(e, src, start, n, width, before), (*shape[:-1], n)), before)
        else:
            args = []
            for a in y.args:
                v = meta_value(a) if isinstance(a, fx.Node) else None
                wide = v is not None and v.dim() >= 1 and v.shape[-1] == width
                args.append(_narrowed(e, a, start, n, width, before) if wide else a)
            return e.call(y.target, tuple(args), before, dict(y.kwargs) or None)
    return e.call(torch.narrow, (y, -1, start, n), before)


def _concatenated(e: _Emit, qs: list[QLinear], grid: Grid, path: str) -> tuple[list[int], Tensor, Tensor]:
    """Each member's output rows, and the members' weights on ``grid`` and their scales
    concatenated: once per backend while the members' quantized weights are the same unchanged
    tensors (every graph of a ``qpass.load``ed model, whose stored integers the quantize pass
    hands on as they are) and the concatenation is still alive (the ``_int_mm`` lowering keeps it
    as the graphs' weight), instead of per graph (SmolLM2: 2 x 60 concatenations, 0.6-3 s of a
    warm start). Held by weak references only: this adds no memory."""
    members = [t for q in qs for t in (e.qg.value(q.w_q), e.qg.value(q.w_scale))]
    marks = tuple(map(storage_mark, members))
    key = ("shared_input_weights", path, grid)
    cached = e.qg.memo.get(key)
    if cached is not None and cached[0] == marks:
        rows, storages, w_cat, s_cat = cached[1], cached[2], cached[3](), cached[4]()
        # the members' storages alive (so not reused by others) and the concatenation still held
        if w_cat is not None and s_cat is not None and all(r() is not None for r in storages):
            return rows, w_cat, s_cat
    weights = [e.weight(q, grid) for q in qs]
    rows, w_cat, s_cat = [w.shape[0] for w, _ in weights], torch.cat([w for w, _ in weights]), torch.cat([s for _, s in weights])
    e.qg.memo[key] = (marks, rows, [weakref.ref(t.untyped_storage()) for t in members], weakref.ref(w_cat), weakref.ref(s_cat))
    return rows, w_cat, s_cat


# ----------------------------------------------------------------------------- the pass


def lower(qg: QGraph, config: QuantConfig, calibration: Calibration | None, report: Report,
          *, target: Target | None = None) -> int:
    """Replace every quantized linear that has a kernel on its device; returns how many.

    ``target`` overrides what is detected from each linear's device (tests use it for CUDA).
    """
    if not config.lower or config.weight is None:
        return 0
    emit = _Emit(qg, calibration, config.split_weights)
    targets: dict[torch.device, Target] = {}
    done = 0
    plans: list[tuple[QLinear, Target, str]] = []
    for out, path in list(qg.quantized.items()):
        q = match(qg, out, path, config)
        t = target or targets.setdefault(q.device, Target.detect(q.device))
        name, why = choose(q, t)
        if name == "reference":
            report.row(path).add_kernel(f"reference ({why})")
            logger.warning("%s: kept on the reference quant/dequant path: %s", path, why)
            continue
        plans.append((q, t, name))
    for group in shared_input_groups(emit, plans):
        q, t, name = group[0]
        if len(group) > 1:
            ys = _emit_shared_input(emit, [g[0] for g in group], t, name)
        elif q.split:  # the inlier linear on the kernel; the outlier columns' float linear and the add stay
            ys = [KERNELS[name].emit(emit, dataclasses.replace(q, out=q.linear), t)]
        else:
            ys = [KERNELS[name].emit(emit, q, t)]
        for (q, _t, _name), y in zip(group, ys):
            if q.split:
                q.linear.replace_all_uses_with(y)
                qg.graph.erase_node(q.linear)
            else:
                q.out.replace_all_uses_with(y)
                qg.graph.erase_node(q.out)
                del qg.quantized[q.out]
                qg.quantized[y] = q.path
            row = report.row(q.path)
            grid, why = emit.grids.get(q.path, (None, ""))
            row.add_kernel(kernel_label(name, grid, split=q.split))
            notes = [why] if why else []
            if len(group) > 1:
                notes.append("one GEMM with " + ", ".join(g[0].path for g in group if g[0] is not q) + " (same input)")
            for note in notes:
                row.reason = f"{row.reason}; {note}" if row.reason else note
            done += 1
    _lower_experts(qg, config, calibration, report, emit, target, targets)
    return done


# ----------------------------------------------------------------------------- fused experts


@dataclass
class QExperts:
    """One quantized grouped matmul over fused expert weights as the quantize pass left it::

        grouped_mm(dequantize(quantize(x, s, ...)), transpose(dequantize(W_q, W_s, zp, group), -2, -1), offs)

    ``s``: ``getitem(choose_qparams(x, ...), 0)`` (dynamic) or, static per expert,
    ``unsqueeze(index_select(const(scales (E,)), 0, expert_of_rows(x, offs)), -1)``."""

    path: str
    node: fx.Node
    act: ActQuant | None
    w_q: fx.Node  # const (E, N, K)
    w_scale: fx.Node  # const (E, N, 1) per output channel, (E, 1, 1) per tensor, (E, N, K / G) per group
    w_zero_point: fx.Node | None
    group_size: int
    offs: fx.Node
    weight_dtype: str
    device: torch.device
    out_dtype: torch.dtype

    @property
    def experts(self) -> int:
        return meta_value(self.w_q).shape[0]


def match_experts(node: fx.Node, path: str, config: QuantConfig) -> QExperts:
    """Read the quantize pass's nodes around the grouped matmul ``node`` (``quantize._quantize_experts``)."""
    x_dq, w_arg = node.args[0], node.args[1]
    offs = node.args[2] if len(node.args) > 2 else node.kwargs["offs"]
    w_dq = w_arg.args[0]
    w_q, w_s, w_zp, group = w_dq.args[:4]
    act = match_act(x_dq)
    return QExperts(path=path, node=node, act=act, w_q=w_q, w_scale=w_s, w_zero_point=w_zp, group_size=group,
                    offs=offs, weight_dtype=config.weight.dtype, device=meta_value(w_q).device, out_dtype=meta_value(node).dtype)


# Why quantized fused experts keep the reference quant/dequant path: checked in order, first hit wins.
_EXPERTS_REFERENCE_RULES: tuple[tuple[str, Callable[[QExperts, Target], bool]], ...] = (
    ("weight-only", lambda q, t: q.act is None),
    ("int4 weights", lambda q, t: q.weight_dtype == "int4"),
    # A scale per block of K cannot be applied after the integer dot product.
    ("per-group weights", lambda q, t: q.group_size > 0),
    ("asymmetric weights", lambda q, t: q.w_zero_point is not None),
    # Dynamic asymmetric activations run with each row's zero point subtracted after the integer
    # product (``zp * sum_k W[e, n, k]`` of its expert); a static zero point has no 7-bit counterpart yet.
    ("asymmetric static activations", lambda q, t: not q.act.symmetric and not q.act.dynamic),
    ("fp8 on CPU", lambda q, t: q.act.dtype != torch.int8 and t.device == "cpu"),
    ("oneDNN not available", lambda q, t: t.device == "cpu" and not t.onednn and _choose_experts(t) == "onednn"),
    ("fp8 fused experts: no grouped fp8 kernel yet", lambda q, t: t.device == "cuda" and q.act.dtype != torch.int8),
    ("no kernel for this device", lambda q, t: t.device not in ("cpu", "cuda")),
)


def _choose_experts(target: Target) -> str:
    """The int8 grouped kernel of fused experts on ``target``: ``_int_mm`` per expert wherever the
    dense linears choose ``_int_mm`` (``choose``: CUDA, and CPUs where its probe finds it exact), so
    experts and dense linears run one kernel family; oneDNN per expert elsewhere on CPU."""
    if target.device == "cuda":
        return "cuda_int8"
    return "cpu_int_mm" if target.int_mm and target.int8_dot is not False else "onednn"


#: The report's kernel column for lowered experts, per grouped kernel (the grid note added as for dense linears).
EXPERTS_KERNELS = {
    "onednn": "onednn (per expert)",
    "cpu_int_mm": "int8 (_int_mm per expert)",
    "cuda_int8": "cuda int8 (_int_mm per expert)",
}
EXPERTS_KERNEL = EXPERTS_KERNELS["onednn"]


def experts_label(grid: Grid | None, kernel: str = "onednn") -> str:
    label = EXPERTS_KERNELS[kernel]
    return f"{label[:-1]}, {grid.note})" if grid is not None and grid.note else label


def _lower_experts(qg: QGraph, config: QuantConfig, calibration: Calibration | None, report: Report, emit: _Emit,
                   target: Target | None, targets: dict) -> None:
    """Replace every quantized grouped matmul whose experts have a kernel; the rest keep the
    reference path, with the reason in their row and one warning per backend listing them::

        y = grouped_mm(dq(q(x, s)), dequantize(const(W_q), const(W_s)).transpose(-2, -1), offs)
    ->  y = qpass.onednn_grouped_qlinear(qpass.quantize(x, s, const(128), 0, 255, u8), offs,
                                         [const(packed W_q[e]) for e], const(W_s (E, N)), 128) * s

    On ``GRID_SPLIT`` (``split_weights``) each packed weight is its expert's ``[hi | lo]`` (N, 2K) and
    the uint8 rows are repeated, ``cat([x_u8, x_u8], -1)``, as for dense linears. Where the dense
    linears run ``_int_mm`` (``_choose_experts``), the experts do too: ``_emit_experts_int_mm``.
    An outlier split lowers its int8 grouped matmul; the outlier columns' float grouped matmul and
    the add stay.
    """
    reference = []
    for node, path in list(qg.quantized_experts.items()):
        q = match_experts(node, path, config)
        t = target or targets.setdefault(q.device, Target.detect(q.device))
        row = report.row(path)
        why = next((why for why, applies in _EXPERTS_REFERENCE_RULES if applies(q, t)), None)
        if why is not None:
            row.add_kernel(f"reference ({why})")
            reference.append(f"{path} ({why})")
            continue
        kernel = _choose_experts(t)
        y = _emit_experts_onednn(emit, q, t) if kernel == "onednn" else _emit_experts_int_mm(emit, q, t)
        node.replace_all_uses_with(y)
        qg.graph.erase_node(node)
        del qg.quantized_experts[node]
        grid, why = emit.grids.get(path, (None, ""))
        split = ("expert_outliers", path) in qg.memo  # the outlier columns' float grouped matmul and the add stay
        row.add_kernel(experts_label(grid, kernel) + (SPLIT_NOTE if split else ""))
        if why and why not in row.reason.split("; "):
            row.reason = f"{row.reason}; {why}" if row.reason else why
    if reference and not qg.memo.get("experts_reference_warned"):
        qg.memo["experts_reference_warned"] = True
        logger.warning("qpass lower: %d fused expert weights kept on the reference quant/dequant path: %s",
                       len(reference), ", ".join(reference))


def _experts_grid(e: _Emit, q: QExperts, target: Target, w_q: Tensor, w_s: Tensor) -> Grid:
    """``_Emit.grid`` for fused experts: the exact grid of oneDNN with the smallest output error on
    the calibration samples, each sample multiplied by its own expert's weight (and static scale);
    errors averaged over the sampled tokens. With ``split_weights=d``, ``GRID_SPLIT`` (every
    expert's weights split) where the best 7-bit grid's error exceeds the 8-bit one's by more than d."""
    if (settled := e.settled_grid(q.path, target, "onednn")) is not None:
        return settled
    grids = cpu_grids(target, "onednn")
    stats = e.calibration.get(q.path) if e.calibration is not None else None
    if len(grids) == 1 or stats is None or stats.samples is None or stats.sample_experts is None:
        e.grids[q.path] = (grids[0], "")
        return grids[0]
    if e.split_weights is not None:  # the 8-bit integers, which GRID_SPLIT computes exactly
        grids = grids + (GRID_8BIT,)
    s = e.qg.smoothing.get(q.node)
    static = None if q.act.dynamic else _static_expert_scales(e.qg, q)[0]
    split = e.qg.memo.get(("expert_outliers", q.path))  # an outlier split: the int8 part sees the inliers
    errors, total = [0.0] * len(grids), 0
    for ex in range(q.experts):
        rows = stats.sample_experts == ex
        n = int(rows.sum())
        if not n:
            continue
        x = stats.samples[rows].float()
        if s is not None:
            x = x / (s[ex] if s.dim() == 2 else s)
        if split is not None:
            x = x * split.keep[ex]
        for i, g in enumerate(grids):
            errors[i] += n * grid_error(x, w_q[ex], w_s[ex], g, per_token=q.act.per_token, symmetric=q.act.symmetric,
                                        static_scale=None if static is None else float(static[ex]))
        total += n
    if not total:
        e.grids[q.path] = (grids[0], "")
        return grids[0]
    best = min(range(len(grids)), key=errors.__getitem__)
    why = "kernel grid by calibration error: " + ", ".join(
        f"{g.note or '8-bit'} {100 * err / total:.2f}%" for g, err in zip(grids, errors))
    if e.split_weights is not None:
        e8, best = errors[-1] / total, min(range(len(grids) - 1), key=errors.__getitem__)
        if errors[best] / total - e8 > e.split_weights:
            e.grids[q.path] = (GRID_SPLIT, f"{why}: 7-bit over 8-bit by more than {100 * e.split_weights:g}%, split")
            return GRID_SPLIT
    e.grids[q.path] = (grids[best], why)
    return grids[best]


def _static_expert_scales(qg: QGraph, q: QExperts) -> tuple[Tensor, fx.Node]:
    """``(scales (E,), ids)`` of static per-expert activations: ``s = unsqueeze(index_select(const(scales), 0, ids), -1)``."""
    gather = q.act.scale.args[0]
    if q.act.scale.target is not torch.unsqueeze or gather.target is not torch.index_select:
        raise AssertionError(f"{q.path}: unexpected static expert activation scale {q.act.scale.format_node()}")
    return qg.value(gather.args[0]), gather.args[2]


def _expert_weight_scales(qg: QGraph, q: QExperts, n: int) -> Tensor:
    """(E, N) float32: each expert's per-output-channel (or per-tensor, broadcast) weight scales."""
    experts = q.experts
    return qg.value(q.w_scale).float().reshape(experts, -1).expand(experts, n).contiguous()


def _emit_experts_onednn(e: _Emit, q: QExperts, target: Target) -> fx.Node:
    before, a, qg = q.node, q.act, e.qg
    w_q = qg.value(q.w_q)  # (E, N, K) int8
    experts, n = w_q.shape[:2]
    w_s = _expert_weight_scales(qg, q, n)
    grid = _experts_grid(e, q, target, w_q, w_s)
    pws, scales, w_ks = [], [], []
    for ex in range(experts):  # GRID_SPLIT: (N, 2K) [hi | lo] halves against the activations repeated along K
        wq_e, ws_e = (split_weight(w_q[ex]), w_s[ex]) if grid.halves else narrow_weight(w_q[ex], w_s[ex], grid.w_qmax)
        w_ks.append(wq_e)
        packed = e.packed("onednn", f"{q.path}.{ex}", wq_e, ws_e,
                          lambda wq_e=wq_e, ws_e=ws_e: kernels.pack_onednn_int8(wq_e, ws_e))
        pws.append(qg.constant(f"{q.path}.{ex}.weight_onednn", packed.packed))
        scales.append(packed.scales)
    ws = qg.constant(f"{q.path}.weight_scale_onednn", torch.stack(scales))
    if not a.symmetric:
        return _emit_experts_asymmetric(e, q, grid, torch.stack(w_ks), pws, ws)
    lo, hi = grid.act_range
    if grid.act_qmax == 127:
        s_node = a.scale
    elif a.dynamic:
        pair = e.call(ops.choose_qparams, (a.x, a.per_token, True, lo, hi), before)
        s_node = e.call(operator.getitem, (pair, 0), before)
    else:  # each expert's static scale, widened to the grid
        static, ids = _static_expert_scales(qg, q)
        const = qg.constant(f"{q.path}.input_scale_{grid.act_qmax}", (static.double() * (127.0 / grid.act_qmax)).float())
        s_node = e.call(torch.unsqueeze, (e.call(torch.index_select, (const, 0, ids), before), -1), before)
    zp = e.zero_point(grid.act_zp)
    x_u8 = e.call(ops.quantize, (a.x, s_node, zp, lo + grid.act_zp, hi + grid.act_zp, torch.uint8), before)
    x_u8 = e.act_for(x_u8, grid, before)
    y = e.call(torch.ops.qpass.onednn_grouped_qlinear.default, (x_u8, q.offs, pws, ws, grid.act_zp), before)
    return _experts_finish(e, q, y, s_node)


def _emit_experts_asymmetric(e: _Emit, q: QExperts, grid: Grid, w_k: Tensor, pws: list[fx.Node], ws: fx.Node) -> fx.Node:
    """Dynamic activations with zero points (``_Emit._asymmetric_act``): the kernel multiplies the
    stored integers in ``[0, 2 * act_qmax + 1]``; each row's ``zp * colsum[e]`` of its expert ``e``
    (``ops.expert_of_rows``) is subtracted after it, then the activation scale applied."""
    before, a, qg = q.node, q.act, e.qg
    qmax = float(2 * grid.act_qmax + 1)
    if grid.act_qmax == 127:  # the reference's int8 grid [-128, 127] shifted by 128: the same integers
        scale, zp = a.scale, e.call(torch.add, (a.zero_point, 128.0), before)
    else:
        pair = e.call(ops.choose_qparams, (a.x, a.per_token, False, 0.0, qmax), before)
        scale, zp = (e.call(operator.getitem, (pair, i), before) for i in (0, 1))
    x_u8 = e.act_for(e.call(ops.quantize, (a.x, scale, zp, 0.0, qmax, torch.uint8), before), grid, before)
    y = e.call(torch.ops.qpass.onednn_grouped_qlinear.default, (x_u8, q.offs, pws, ws, 0), before)
    # (E, N): w_s[e, n] * sum_k W_k[e, n, k] (the split halves sum to the same integers)
    colsum = (w_k.double().sum(dim=2) * qg.value(ws).double()).float()
    colsum = qg.constant(f"{q.path}.weight_colsum_onednn", colsum)
    ids = e.call(ops.expert_of_rows, (a.x, q.offs), before)
    per_row = e.call(torch.index_select, (colsum, 0, ids), before)
    y = e.call(torch.sub, (y, e.call(torch.mul, (zp, per_row), before)), before)
    return _experts_finish(e, q, y, scale)


def _experts_finish(e: _Emit, q: QExperts, y: fx.Node, scale: fx.Node) -> fx.Node:
    """``y * scale`` (each row's activation scale) in the grouped matmul's output dtype."""
    before = q.node
    y = e.call(torch.mul, (y, scale), before)
    if q.out_dtype != torch.float32:
        y = e.call(torch.ops.prims.convert_element_type.default, (y, q.out_dtype), before)
    return y


def _emit_experts_int_mm(e: _Emit, q: QExperts, target: Target) -> fx.Node:
    """The reference's own int8 rows through ``qpass::grouped_int_mm`` (``_int_mm`` per expert, int32),
    then the scales as aten ops that Inductor fuses (``_emit_mm``'s arithmetic with each row's expert)::

        y = grouped_mm(dequantize(x_q, sx, zp), dequantize(const(W_q), const(W_s)).transpose(-2, -1), offs)
    ->  ids = expert_of_rows(x, offs)
        y = float(qpass.grouped_int_mm(x_q, offs, const(W_q), pad)) * (sx * index_select(const(W_s (E, N)), 0, ids))
        y = y - (zp * sx) * index_select(const(W_s * sum_k W_q (E, N)), 0, ids)   # asymmetric activations only

    ``sx``: per token ``(rows, 1)``, per tensor ``(1,)``, or each row's expert's static scale. The
    weight is the plain ``(E, N, K)`` int8 constant, shared by every graph of the backend; on CUDA
    (``pad``) it is zero-padded once to N and K multiples of 8 and the output narrowed back to N.
    Rows past ``offs[-1]`` (which grouped matmuls leave undefined and transformers masks) are zero,
    except with asymmetric activations: minus their zero point's term for the last expert, as on oneDNN."""
    before, a, qg = q.node, q.act, e.qg
    w_q = qg.value(q.w_q)  # (E, N, K) int8
    experts, n, k = w_q.shape
    w_s = _expert_weight_scales(qg, q, n)
    pad = target.device == "cuda"

    def weight() -> Tensor:
        if not pad:
            return w_q.contiguous()
        padded = w_q.new_zeros((experts, -(-n // 8) * 8, -(-k // 8) * 8))
        padded[:, :n, :k] = w_q
        return padded

    w = qg.constant(f"{q.path}.weight_int8", e.packed("int_mm padded" if pad else "int_mm", q.path, w_q, w_s, weight))
    acc = e.call(torch.ops.qpass.grouped_int_mm.default, (a.x_q, q.offs, w, pad), before)
    if meta_value(w).shape[1] != n:
        acc = e.call(torch.narrow, (acc, 1, 0, n), before)
    y = e.call(torch.ops.prims.convert_element_type.default, (acc, torch.float32), before)
    # each row's expert: the static scales' own gather reads it already
    ids = _static_expert_scales(qg, q)[1] if not a.dynamic else e.call(ops.expert_of_rows, (a.x, q.offs), before)
    sw = e.call(torch.index_select, (qg.constant(f"{q.path}.weight_scale", w_s), 0, ids), before)
    y = e.call(torch.mul, (y, e.call(torch.mul, (a.scale, sw), before)), before)
    if a.zero_point is not None:  # asymmetric: subtract sx * zp * sw * sum_k W[e, n, k] of each row's expert
        colsum = qg.constant(f"{q.path}.weight_colsum", (w_q.double().sum(dim=2) * w_s.double()).float())
        per_row = e.call(torch.index_select, (colsum, 0, ids), before)
        zp_sx = e.call(torch.mul, (a.zero_point, a.scale), before)
        y = e.call(torch.sub, (y, e.call(torch.mul, (zp_sx, per_row), before)), before)
    if q.out_dtype != torch.float32:
        y = e.call(torch.ops.prims.convert_element_type.default, (y, q.out_dtype), before)
    return y
