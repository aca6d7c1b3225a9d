"""Lower quantized linears to low-precision kernels (oneDNN / FBGEMM on x86, ``_int_mm`` / ``_scaled_mm`` on CUDA).

Before (``quantize``: dynamic per-token INT8 activations, per-output-channel weights)::

    s = qpass.choose_qparams(x, True, True, -128, 127)[0]
    x_dq = qpass.dequantize(qpass.quantize(x, s, None, -128, 127, i8), s, None, 0, f32)
    y = linear(x_dq, qpass.dequantize(const(W_q), const(W_s), None, 0, f32), b)

After (x86 without VNNI: 7-bit activations keep the u8 x s8 kernels exact)::

    s = qpass.choose_qparams(x, True, True, -64, 63)[0]
    y = qpass.onednn_qlinear(qpass.quantize(x, s, const(64), 0, 127, u8), 1.0, 64, const(packed W_q), const(W_s), None) * s + b
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
from qpass.graph import LinearSite, QGraph
from qpass.passes.quantize import act_view
from qpass.report import Report

logger = logging.getLogger(__name__)

__all__ = ["lower", "Target", "Grid", "QLinear", "match", "choose", "DECODE_M"]

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
    """The integer grid the kernel multiplies: activations ``[-act_qmax - 1, act_qmax]`` stored as
    uint8 with zero point ``act_zp``, weights as the reference quantized them."""

    act_qmax: int
    act_zp: int
    note: str  # shown in the report's kernel column

    @property
    def act_range(self) -> tuple[int, int]:
        return -self.act_qmax - 1, self.act_qmax


#: Full 8-bit activations: exact only where u8 x s8 products do not saturate int16 (VNNI / AMX).
GRID_8BIT = Grid(127, 128, "")
#: 7-bit activations, u8 in [0, 127]: 2 * 127 * 128 < 2**15, exact with ``vpmaddubsw`` (AVX2).
GRID_7BIT = Grid(63, 64, "7-bit act")


def cpu_grid(target: Target) -> Grid:
    return GRID_8BIT if target.int8_dot else GRID_7BIT


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

    def __init__(self, qg: QGraph, calibration: Calibration | None):
        self.qg = qg
        self.calibration = calibration
        self.acts: dict[tuple, tuple[fx.Node, fx.Node | float]] = {}  # (x_dq, grid) -> (x_u8 / x_int, scale)
        self.zps: dict[int, fx.Node] = {}
        self.linears = {qg.module_of(n): n for n in qg.smoothing}  # path -> erased linear (smoothing lookup)

    def call(self, target, args, before: fx.Node, kwargs=None) -> fx.Node:
        return self.qg.call(target, tuple(args), kwargs, before=before)

    def zero_point(self, zp: int) -> fx.Node:
        if zp not in self.zps:
            self.zps[zp] = self.qg.constant(f"act_zero_point_{zp}", torch.tensor(float(zp)))
        return self.zps[zp]

    def act_scale(self, q: QLinear, grid: Grid, before: fx.Node) -> fx.Node | float:
        """The activation scale on ``grid``: a node (dynamic) or a float (static)."""
        a = q.act
        if a.dynamic:
            if grid is GRID_8BIT:
                return a.scale
            qmin, qmax = grid.act_range
            pair = self.call(ops.choose_qparams, (a.x, a.per_token, True, float(qmin), float(qmax)), before)
            return self.call(operator.getitem, (pair, 0), before)
        ref = self.qg.value(a.scale)
        if grid is GRID_8BIT:
            return float(ref)
        return float(self.static_scale(q, grid, ref))

    def static_scale(self, q: QLinear, grid: Grid, ref: Tensor) -> Tensor:
        """Static per-tensor scale on ``grid``, from calibration exactly as ``quantize`` computes it."""
        stats = self.calibration.get(q.path) if self.calibration is not None else None
        node = self.linears.get(q.path)
        view = act_view(self.qg, LinearSite(node, q.path), stats) if stats is not None else None
        qmin, qmax = grid.act_range
        if view is None:  # no statistics under this path: rescale the reference scale
            return ref.double() * (127.0 / qmax)
        return ops.qparams_from_range(view[0].min().reshape(1), view[1].max().reshape(1), True, qmin, qmax)[0]

    def quantized_act(self, q: QLinear, grid: Grid, before: fx.Node, *, as_float: bool = False):
        """``(x_u8, scale)`` on ``grid`` (uint8 with the zero point added), shared by q / k / v.

        ``as_float=True`` gives the integer values as float32 without the zero point (FBGEMM's input)."""
        key = (q.act.x_dq, grid, as_float)
        if key not in self.acts:
            scale = self.act_scale(q, grid, before)
            s = scale if isinstance(scale, fx.Node) else self.qg.constant(f"{q.path}.input_scale_k", torch.tensor([scale]))
            qmin, qmax = grid.act_range
            if as_float:
                xq = self.call(ops.quantize, (q.act.x, s, None, float(qmin), float(qmax), torch.float32), before)
            else:
                zp = self.zero_point(grid.act_zp)
                xq = self.call(ops.quantize, (q.act.x, s, zp, float(qmin + grid.act_zp), float(qmax + grid.act_zp),
                                              torch.uint8), before)
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

    def w_scales_1d(self, q: QLinear) -> Tensor:
        n = self.qg.value(q.w_q).shape[0]
        return self.qg.value(q.w_scale).float().reshape(-1).expand(n).contiguous()


def _emit_onednn(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    grid = cpu_grid(target)
    before = q.out
    w_q = e.qg.value(q.w_q)
    packed = kernels.pack_onednn_int8(w_q, e.w_scales_1d(q))
    pw = e.qg.constant(f"{q.path}.weight_onednn", packed.packed)
    ws = e.qg.constant(f"{q.path}.weight_scale_onednn", packed.scales)
    x_u8, scale = e.quantized_act(q, grid, before)
    if isinstance(scale, fx.Node):  # dynamic: op at unit scale, then per-token (or per-tensor) rescale + bias
        y = e.call(torch.ops.qpass.onednn_qlinear.default, (x_u8, 1.0, grid.act_zp, pw, ws, None), before)
        return e.finish(q, y, scale, q.bias, before)
    y = e.call(torch.ops.qpass.onednn_qlinear.default, (x_u8, scale, grid.act_zp, pw, ws, q.bias), before)
    return e.finish(q, y, None, None, before)


def _emit_fbgemm(e: _Emit, q: QLinear, target: Target) -> fx.Node:
    grid = cpu_grid(target)
    before = q.out
    # Packed at unit scales (FBGEMM returns the integer dot products); the weight scales are a graph
    # constant applied with the activation scale, and the process-wide registry entry is freed when
    # that constant is.
    w_q = e.qg.value(q.w_q)
    handle = kernels.pack_fbgemm_dynamic(w_q, torch.ones(w_q.shape[0]))
    x_int, scale = e.quantized_act(q, grid, before, as_float=True)
    static = not isinstance(scale, fx.Node)
    ws = e.qg.constant(f"{q.path}.weight_scale_fbgemm", e.w_scales_1d(q) * (scale if static else 1.0))
    weakref.finalize(e.qg.root._buffers[ws.target], kernels.release_fbgemm, handle)
    y = e.call(torch.ops.qpass.fbgemm_qlinear.default, (x_int, grid.act_zp, handle), before)
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
    if config.release_weights:
        raise NotImplementedError(
            "qpass: QuantConfig.release_weights is not implemented: Dynamo passes the model's fp32 "
            "parameters to the compiled graph on every call and guards on their metadata, so freeing "
            "their storage cannot be done safely from a backend; keep release_weights=False"
        )
    if not config.lower or config.weight is None:
        return 0
    emit = _Emit(qg, calibration)
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
        if t.device == "cpu" and cpu_grid(t) is GRID_7BIT and not grid_logged:
            grid_logged = True
            logger.info(
                "qpass lower: this CPU has no VNNI: int8 kernels use 7-bit activations [-64, 63] (uint8, zero point 64) "
                "instead of the reference's 8-bit grid, so that u8 x s8 products cannot saturate"
            )
    return done
