"""Lower quantized linears to low-precision kernels (oneDNN / FBGEMM on x86, ``_int_mm`` / ``_scaled_mm`` on CUDA).

Before (``quantize``: dynamic per-token INT8 activations, per-output-channel weights)::

    s = qpass.choose_qparams(x, True, True, -128, 127)[0]
    x_dq = qpass.dequantize(qpass.quantize(x, s, None, -128, 127, i8), s, None, 0, f32)
    y = linear(x_dq, qpass.dequantize(const(W_q), const(W_s), None, 0, f32), b)

After (x86 without VNNI: the activations keep the reference's 8-bit grid, the weights are requantized
to 7 bits so that the u8 x s8 kernels cannot saturate)::

    s = qpass.choose_qparams(x, True, True, -128, 127)[0]
    y = qpass.onednn_qlinear(qpass.quantize(x, s, const(128), 0, 255, u8), 1.0, 128, const(packed W7), const(W7_s), None) * s + b
"""

from __future__ import annotations

import logging
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from qpass import kernels, ops
from qpass.calibration import Calibration
from qpass.config import QuantConfig
from qpass.graph import QGraph
from qpass.report import Report

logger = logging.getLogger(__name__)

__all__ = ["lower", "Target", "Grid", "QLinear", "match", "choose", "narrow_weight", "DECODE_M"]

#: Token counts up to this are "decode": the FBGEMM kernel beats oneDNN there (see bench/speed.py).
DECODE_M = 16


@dataclass(frozen=True)
class Target:
    """What the linear's device can run: found from the device (``Target.detect``) or given in tests."""

    device: str  # "cpu" or "cuda"
    onednn: bool = False
    fbgemm: bool = False
    int8_dot: bool = False  # u8 x s8 dot product without int16 saturation (VNNI / AMX)
    capability: tuple[int, int] | None = None  # CUDA compute capability

    @staticmethod
    def detect(device: torch.device) -> "Target":
        if device.type == "cuda":
            return Target("cuda", capability=torch.cuda.get_device_capability(device))
        if device.type == "cpu":
            return Target(
                "cpu",
                onednn=kernels.kernel_available("onednn"),
                fbgemm=kernels.kernel_available("fbgemm"),
                int8_dot=kernels.cpu_has_int8_dot(),
            )
        return Target(device.type)


@dataclass(frozen=True)
class Grid:
    """The integer grid a CPU kernel multiplies: activations on the reference's 8-bit grid, stored
    as uint8 with zero point 128; weights in ``[-w_qmax, w_qmax]``."""

    w_qmax: int
    note: str  # shown in the report's kernel column

    act_zp = 128


#: Full 8-bit weights: exact only where u8 x s8 products do not saturate int16 (VNNI / AMX).
GRID_8BIT = Grid(127, "")
#: 7-bit weights: u8 (<= 255) x s8 (|w| <= 63) pair sums stay below 2**15, exact with AVX2's
#: saturating ``vpmaddubsw``. Activations keep all 8 bits: they carry the outliers, weights do not.
GRID_W7 = Grid(63, "7-bit weights")


def cpu_grid(target: Target) -> Grid:
    return GRID_8BIT if target.int8_dot else GRID_W7


def narrow_weight(w_q: Tensor, w_scale: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """Requantize symmetric int8 weights ``w_q * w_scale`` (scale per row or per tensor) onto
    ``[-qmax, qmax]``: ``(w_q', scale')`` with ``scale' = scale * 127 / qmax``."""
    if qmax == 127:
        return w_q, w_scale
    ratio = 127.0 / qmax
    w = torch.clamp(torch.round(w_q.float() / ratio), -qmax, qmax).to(torch.int8)
    return w, (w_scale.double() * ratio).float()


@dataclass
class ActQuant:
    """The reference activation quantization in front of a linear."""

    x: fx.Node  # the float input
    x_q: fx.Node  # qpass.quantize(x, scale, zp, qmin, qmax, dtype)
    x_dq: fx.Node  # qpass.dequantize(x_q, ...), shared by every linear reading x
    scale: fx.Node  # getitem(choose_qparams(...), 0) or a constant
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

    @property
    def per_channel(self) -> bool:
        shape = tuple(_val(self.w_scale).shape)
        return len(shape) == 2 and shape[1] == 1 and shape[0] > 1

    @property
    def per_tensor(self) -> bool:
        return _val(self.w_scale).numel() == 1


# Why a quantized linear keeps the reference quant/dequant path: checked in order, first hit wins.
# ``None`` as the linear's act means weight-only.
_REFERENCE_RULES: tuple[tuple[str, Callable[[QLinear, Target], bool]], ...] = (
    # Two partial products (quantized inliers + fp32 outliers); the kernels compute one.
    ("outlier split", lambda q, t: q.out.target is not F.linear),
    # The int kernels need both operands quantized.
    ("weight-only", lambda q, t: q.act is None),
    ("int4 weights", lambda q, t: q.weight_dtype == "int4"),
    # A scale per block of K (or per column of W) cannot be applied after the integer dot product.
    ("per-group weights", lambda q, t: q.group_size > 0),
    ("per-input-channel weights", lambda q, t: not (q.per_channel or q.per_tensor)),
    # The kernels take one zero point per tensor; asymmetric per-token has one per row.
    ("asymmetric activations", lambda q, t: not q.act.symmetric),
    # _scaled_mm on CPU is an emulation, 2-30x slower than fp32 (FACTS.md).
    ("fp8 on CPU", lambda q, t: q.act.dtype != torch.int8 and t.device == "cpu"),
    ("oneDNN not available", lambda q, t: t.device == "cpu" and not t.onednn),
    ("fp8 needs CUDA compute capability 8.9+", lambda q, t: t.device == "cuda" and q.act.dtype != torch.int8
     and (t.capability or (0, 0)) < (8, 9)),
    ("no kernel for this device", lambda q, t: t.device not in ("cpu", "cuda")),
)


def _val(node: fx.Node):
    return node.meta.get("val", node.meta.get("example_value"))


def match(qg: QGraph, out: fx.Node, path: str, config: QuantConfig) -> QLinear:
    """Read the quantize pass's nodes around the linear ``out``."""
    lin = out if out.target is F.linear else next(a for a in out.args if isinstance(a, fx.Node) and a.target is F.linear)
    x_dq, w_dq, bias = (list(lin.args) + [None])[:3]
    act = None
    if isinstance(x_dq, fx.Node) and x_dq.target is ops.dequantize:
        x_q = x_dq.args[0]
        x, scale, zp, _qmin, _qmax, dtype = x_q.args
        src = scale.args[0] if scale.op == "call_function" and scale.target is operator.getitem else None
        dynamic = src is not None and src.target is ops.choose_qparams
        act = ActQuant(
            x=x, x_q=x_q, x_dq=x_dq, scale=scale, dynamic=dynamic,
            per_token=dynamic and bool(src.args[1]), symmetric=zp is None, dtype=dtype,
        )
    x_val = _val(act.x if act else x_dq)
    lead = x_val.shape[:-1]
    m = 1
    for d in lead:
        m = m * d if isinstance(d, int) and isinstance(m, int) else None
    return QLinear(
        path=path, out=out, act=act, w_q=w_dq.args[0], w_scale=w_dq.args[1], group_size=w_dq.args[3], bias=bias,
        weight_dtype=config.weight.dtype, m=m, device=_val(w_dq.args[0]).device, out_dtype=_val(lin).dtype,
    )


def choose(q: QLinear, target: Target) -> tuple[str, str]:
    """``(kernel, why)``: the kernel name from ``KERNELS``, or ``"reference"`` and the reason."""
    for why, applies in _REFERENCE_RULES:
        if applies(q, target):
            return "reference", why
    if target.device == "cuda":
        return ("cuda_int8" if q.act.dtype == torch.int8 else "cuda_fp8"), ""
    decode = q.m is not None and q.m <= DECODE_M
    return ("fbgemm" if decode and target.fbgemm else "onednn"), ""


# ----------------------------------------------------------------------------- emitters


class _Emit:
    """Graph-building helpers shared by the kernels of one pass run (one graph)."""

    def __init__(self, qg: QGraph):
        self.qg = qg
        self.acts: dict[tuple, tuple[fx.Node, fx.Node | float]] = {}  # (x_dq, as_float) -> (x_u8 / x_int, scale)
        self.zps: dict[int, fx.Node] = {}

    def call(self, target, args, before: fx.Node, kwargs=None) -> fx.Node:
        return self.qg.call(target, tuple(args), kwargs, before=before)

    def zero_point(self, zp: int) -> fx.Node:
        if zp not in self.zps:
            self.zps[zp] = self.qg.constant(f"act_zero_point_{zp}", torch.tensor(float(zp)))
        return self.zps[zp]

    def quantized_act(self, q: QLinear, before: fx.Node, *, as_float: bool = False) -> tuple[fx.Node, fx.Node | float]:
        """``(x_u8, scale)``: the reference's own activation quantization stored as uint8 with zero
        point 128 (one per input, shared by q / k / v); ``scale`` is the reference's scale node
        (dynamic) or its value (static).

        ``as_float=True`` gives the integers as float32 without the zero point (FBGEMM's input)."""
        a = q.act
        key = (a.x_dq, as_float)
        if key not in self.acts:
            scale = a.scale if a.dynamic else float(self.qg.value(a.scale))
            zp = GRID_8BIT.act_zp
            if as_float:
                xq = self.call(ops.quantize, (a.x, a.scale, None, -128.0, 127.0, torch.float32), before)
            else:
                xq = self.call(ops.quantize, (a.x, a.scale, self.zero_point(zp), 0.0, 255.0, torch.uint8), before)
            self.acts[key] = (xq, scale)
        return self.acts[key]

    def finish(self, q: QLinear, y: fx.Node, scale: fx.Node | None, bias: fx.Node | None, before: fx.Node) -> fx.Node:
        """``y * scale + bias`` as aten ops (Inductor fuses them with what follows), in the output dtype."""
        if scale is not None:
            y = self.call(torch.mul, (y, scale), before)
        if bias is not None:
            y = self.call(torch.add, (y, bias), before)
        if _val(y).dtype != q.out_dtype:
            y = self.call(torch.ops.prims.convert_element_type.default, (y, q.out_dtype), before)
        return y

    def weight(self, q: QLinear, grid: Grid) -> tuple[Tensor, Tensor]:
        """The int8 ``(N, K)`` weight on ``grid`` and its ``(N,)`` float32 scales."""
        w_q = self.qg.value(q.w_q)
        w_s = self.qg.value(q.w_scale).float().reshape(-1).expand(w_q.shape[0]).contiguous()
        return narrow_weight(w_q, w_s, grid.w_qmax)


def _emit_onednn(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    before = q.out
    packed = kernels.pack_onednn_int8(*e.weight(q, cpu_grid(target)))
    pw = e.qg.constant(f"{q.path}.weight_onednn", packed.packed)
    ws = e.qg.constant(f"{q.path}.weight_scale_onednn", packed.scales)
    x_u8, scale = e.quantized_act(q, before)
    zp = GRID_8BIT.act_zp
    if isinstance(scale, fx.Node):  # dynamic: op at unit scale, then per-token (or per-tensor) rescale + bias
        y = e.call(torch.ops.qpass.onednn_qlinear.default, (x_u8, 1.0, zp, pw, ws, None), before)
        return e.finish(q, y, scale, q.bias, before)
    y = e.call(torch.ops.qpass.onednn_qlinear.default, (x_u8, scale, zp, pw, ws, q.bias), before)
    return e.finish(q, y, None, None, before)


def _emit_fbgemm(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    before = q.out
    # Packed at unit scales (FBGEMM returns the integer dot products); the weight scales are a graph
    # constant applied with the activation scale, and the process-wide registry entry is freed when
    # that constant is.
    w_q, w_s = e.weight(q, cpu_grid(target))
    handle = kernels.pack_fbgemm_dynamic(w_q, torch.ones(w_q.shape[0]))
    x_int, scale = e.quantized_act(q, before, as_float=True)
    static = not isinstance(scale, fx.Node)
    ws = e.qg.constant(f"{q.path}.weight_scale_fbgemm", w_s * (scale if static else 1.0))
    weakref.finalize(e.qg.root._buffers[ws.target], kernels.release_fbgemm, handle)
    y = e.call(torch.ops.qpass.fbgemm_qlinear.default, (x_int, GRID_8BIT.act_zp, handle), before)
    y = e.call(torch.mul, (y, ws), before)
    return e.finish(q, y, None if static else scale, q.bias, before)


def _emit_cuda_int8(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    return _emit_cuda(e, q, kernels.int8_scaled_mm)


def _emit_cuda_fp8(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    return _emit_cuda(e, q, kernels.fp8_scaled_mm)


def _emit_cuda(e: _Emit, q: QLinear, mm) -> fx.Node:
    """``mm(x_q (M, K), W_q.T, ...)`` on the reference's own integer (or fp8) grid: exact on CUDA."""
    before = q.out
    x_val = _val(q.act.x)
    k = x_val.shape[-1]
    n = _val(q.w_q).shape[0]
    x2 = e.call(torch.reshape, (q.act.x_q, (-1, k)), before)
    w_t = e.call(torch.t, (q.w_q,), before)  # a column-major view of the (N, K) constant
    tensorwise = not q.act.per_token and q.per_tensor
    if tensorwise:
        sx, sw = q.act.scale, q.w_scale
    else:
        sx = e.call(torch.reshape, (q.act.scale, (-1, 1)), before)
        sw = e.call(torch.reshape, (q.w_scale, (1, -1)), before)
    if mm is kernels.fp8_scaled_mm and not tensorwise:
        # Rowwise _scaled_mm wants sm90 and bf16 output: run it unscaled in fp32, scale outside.
        y2 = e.call(mm, (x2, w_t, 1.0, 1.0, None, torch.float32), before)
        y2 = e.call(torch.mul, (e.call(torch.mul, (y2, sx), before), sw), before)
    else:
        y2 = e.call(mm, (x2, w_t, sx, sw, None, torch.float32), before)
    y = e.call(torch.reshape, (y2, (*x_val.shape[:-1], n)), before)
    return e.finish(q, y, None, q.bias, before)


@dataclass(frozen=True)
class Kernel:
    """A lowering: what the report calls it and how it rewrites one linear."""

    label: str
    emit: Callable[[_Emit, QLinear, Target], fx.Node]


KERNELS: dict[str, Kernel] = {
    "onednn": Kernel("onednn", _emit_onednn),
    "fbgemm": Kernel("fbgemm", _emit_fbgemm),
    "cuda_int8": Kernel("cuda int8 (_int_mm)", _emit_cuda_int8),
    "cuda_fp8": Kernel("cuda fp8 (_scaled_mm)", _emit_cuda_fp8),
}


def kernel_label(name: str, target: Target) -> str:
    label = KERNELS[name].label
    note = cpu_grid(target).note if target.device == "cpu" else ""
    return f"{label} ({note})" if note else label


# ----------------------------------------------------------------------------- the pass


def lower(qg: QGraph, config: QuantConfig, calibration: Calibration | None, report: Report,
          *, target: Target | None = None) -> int:
    """Replace every quantized linear that has a kernel on its device; returns how many.

    ``target`` overrides what is detected from each linear's device (tests use it for CUDA).
    """
    if not config.lower or config.weight is None:
        return 0
    emit = _Emit(qg)
    targets: dict[torch.device, Target] = {}
    done, grid_logged = 0, False
    for out, path in list(qg.quantized.items()):
        q = match(qg, out, path, config)
        t = target or targets.setdefault(q.device, Target.detect(q.device))
        name, why = choose(q, t)
        row = report.row(path)
        if name == "reference":
            row.kernel = f"reference ({why})"
            logger.warning("%s: kept on the reference quant/dequant path: %s", path, why)
            continue
        y = KERNELS[name].emit(emit, q, t)
        out.replace_all_uses_with(y)
        qg.graph.erase_node(out)
        del qg.quantized[out]
        qg.quantized[y] = path
        row.kernel = kernel_label(name, t)
        done += 1
        if t.device == "cpu" and cpu_grid(t) is GRID_W7 and not grid_logged:
            grid_logged = True
            logger.info(
                "qpass lower: this CPU has no VNNI: int8 kernels use 7-bit weights [-63, 63] (requantized from "
                "the reference's int8 weights) so that u8 x s8 products cannot saturate; activations keep 8 bits"
            )
    return done
