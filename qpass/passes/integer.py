"""Integer-only inference (I-LLM): between the embedding and ``lm_head``, no floating-point op.

Before (one Llama layer, as Dynamo captures it; norms decomposed, rotary as mul/cat/neg)::

    h = embedding(ids)
    y = w1 * (h * rsqrt(mean(h**2) + eps));  q, k, v = linear(y, Wq), linear(y, Wk), linear(y, Wv)
    q = q * cos + cat(-q2, q1) * sin;  o = sdpa(q, k, v, mask);  h = h + linear(o, Wo)
    y = w2 * norm(h);  h = h + linear(silu(linear(y, Wg)) * linear(y, Wu), Wd);  logits = lm_head(norm(h))

After (every value an integer tensor with a dyadic scale, four tensors q, zp, m, e; qpass.intops)::

    h = int_quantize(embedding(ids))                         # float -> int boundary (int64, 2**-e per token)
    y = di_rmsnorm(h, w1);  q = di_matmul(int_requant(y), Wq_int8)             # int8 per token, int32 acc
    q = di_add(di_mul(q, int_quantize(cos)), di_mul(cat(-q2, q1), int_quantize(sin)))   # cos/sin: Q14
    s = di_matmul(requant(q), requant(k)^T);  o = di_matmul(di_softmax(s, mask), requant(v))
    h = di_add(h, di_matmul(requant(o), Wo_int8));  ... di_silu, di_mul for SwiGLU
    logits = lm_head(int_dequantize(di_rmsnorm(h, w)))       # int -> float boundary

The rewrite walks the graph in order from the embedding's output: an op reading an integer value
gets its integer counterpart (``_RULES``), movement ops (view, transpose, cat, getitem, expand)
apply to all four tensors, and an op with no integer counterpart raises a ``NotImplementedError``
naming it and its module; nothing falls back to float silently. A skipped linear (``lm_head``)
and the graph output read the dequantized value: the region ends there.

Rotary embedding: cos and sin depend on the positions only (not on the activations); they are
computed as the model computes them and quantized where they enter the region, to int16-range
integers with a power-of-two scale (2**-14 for values in [-1, 1]): the same numbers as a
quantized table indexed by position, without holding a table for every position.

``check_integer_region(gm)`` lists the floating-point ops between the embedding's quantization and
the final dequantization; it is empty for a fully integer graph (the ablation switches of
``IntegerOnly`` put float islands there, and the check names them).
"""

from __future__ import annotations

import logging
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx

from qpass import intops as I
from qpass.calibration import Calibration
from qpass.config import QuantConfig
from qpass.graph import LINEAR_TARGETS, QGraph, meta_value, normalize_path
from qpass.report import Report

logger = logging.getLogger(__name__)

__all__ = ["integer_only", "check_integer_region", "assert_integer_region"]

_EMBEDDINGS = (F.embedding, torch.embedding)
_MOVES = {"view": torch.Tensor.reshape, "reshape": torch.Tensor.reshape, "transpose": torch.Tensor.transpose,
          "permute": torch.Tensor.permute, "expand": torch.Tensor.expand, "unsqueeze": torch.Tensor.unsqueeze,
          "squeeze": torch.Tensor.squeeze, "flatten": torch.Tensor.flatten, "repeat_interleave": torch.Tensor.repeat_interleave}
_MOVE_FUNCS = {torch.reshape: torch.reshape, torch.transpose: torch.transpose, torch.permute: torch.permute,
               torch.unsqueeze: torch.unsqueeze, torch.squeeze: torch.squeeze, torch.flatten: torch.flatten,
               operator.getitem: operator.getitem, torch.repeat_interleave: torch.repeat_interleave}
_IDENTITY = {"contiguous", "clone", "to", "float", "type_as"}
_SILU = (F.silu, torch.nn.functional.silu)
_GELU = (F.gelu,)
_SDPA = (F.scaled_dot_product_attention,)
_Q_BOUNDARY = 16  # bits of a float operand from outside the region (cos / sin): |q| < 2**15


def _method(node: fx.Node) -> str | None:
    return node.target if node.op == "call_method" else None


def _is(node, fns, method: str | None = None) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_function" and node.target in fns) or
                                          (method is not None and _method(node) == method))


class _RMSNorm:
    """``w * to(x * rsqrt(mean(x**2, -1, keepdim) + eps))`` found around one ``rsqrt``."""

    def __init__(self, x: fx.Node, out: fx.Node, weight: torch.Tensor | None, eps: float, inner: set[fx.Node]):
        self.x, self.out, self.weight, self.eps, self.inner = x, out, weight, eps, inner


def _find_rmsnorms(qg: QGraph) -> dict[fx.Node, _RMSNorm]:
    found = {}
    for r in qg.graph.nodes:
        if not _is(r, (torch.rsqrt,), "rsqrt"):
            continue
        add = r.args[0]
        if not (_is(add, (operator.add, torch.add), "add") and isinstance(add.args[1], (int, float))):
            continue
        mean = add.args[0]
        if not _is(mean, (torch.mean,), "mean"):
            continue
        pw = mean.args[0]
        if not (_is(pw, (torch.pow, operator.pow), "pow") and pw.args[1] == 2):
            continue
        x = pw.args[0]
        muls = [u for u in r.users if _is(u, (operator.mul, torch.mul), "mul") and x in u.args]
        if len(muls) != 1:
            continue
        inner, out = {r, add, mean, pw, muls[0]}, muls[0]
        while len(out.users) == 1 and _method(next(iter(out.users))) == "to":
            out = next(iter(out.users))
            inner.add(out)
        weight = None
        if len(out.users) == 1:
            u = next(iter(out.users))
            if _is(u, (operator.mul, torch.mul), "mul") and len(u.args) == 2:
                other = u.args[0] if u.args[1] is out else u.args[1]
                w = qg.value(other) if isinstance(other, fx.Node) and not qg._varies(other) else None
                if w is not None and w.dim() == 1:
                    weight, out = w.float(), u
                    inner.add(u)
        found[out] = _RMSNorm(x, out, weight, float(add.args[1]), inner)
    return found


class _Rewriter:
    def __init__(self, qg: QGraph, config: QuantConfig, report: Report):
        self.qg, self.config, self.spec, self.report = qg, config, config.integer_only, report
        self.ints: dict[fx.Node, tuple[fx.Node, ...]] = {}
        self.sources: set[fx.Node] = set()  # embeddings: what the region depends on
        self.boundary: dict[fx.Node, tuple[fx.Node, ...]] = {}  # float tensors from outside the region, quantized
        self.linears = 0
        self.float_islands: list[str] = []
        self.requants: dict[tuple, tuple[fx.Node, ...]] = {}  # (value, dims, signed) -> its requantization

    def requant(self, v: tuple[fx.Node, ...], dims: list[int], before: fx.Node, signed: bool = True) -> tuple:
        """``v`` as 8-bit integers per row over ``dims``: once per value (q, k and v read one norm output),
        and not at all for a value that already is (DI-Norm's and DI-SwiGLU's int8 outputs)."""
        key = (v, tuple(dims), signed)
        if key not in self.requants:
            self.requants[key] = self.op4(I.int_requant, (*v, list(dims), 8, signed), before)
            self.requants[(self.requants[key], tuple(dims), signed)] = self.requants[key]
        return self.requants[key]

    # -- graph helpers --------------------------------------------------------------------------
    def call(self, target, args, before, kwargs=None) -> fx.Node:
        return self.qg.call(target, tuple(args), kwargs, before=before)

    def op4(self, target, args, before) -> tuple[fx.Node, ...]:
        node = self.call(target, args, before)
        return tuple(self.call(operator.getitem, (node, i), before) for i in range(4))

    def const4(self, name: str, q: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> tuple[fx.Node, ...]:
        qg = self.qg
        zp = torch.zeros((1,) * max(q.dim(), 1), dtype=torch.int64)
        return (qg.constant(name + ".q", q), qg.constant(name + ".zp", zp), qg.constant(name + ".m", m),
                qg.constant(name + ".e", e))

    def scalar4(self, value: float, name: str) -> tuple[fx.Node, ...]:
        """A float constant as an integer value: q = sign, (m, e) its magnitude."""
        v = torch.as_tensor(value, dtype=torch.float64)
        m, e = I.const(v.abs().clamp(min=1e-30))
        return self.const4(name, torch.sign(v).to(torch.int64), m, e)

    def depends_on_region(self, node: fx.Node) -> bool:
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in self.sources:
                return True
            if isinstance(n, fx.Node) and n not in seen:
                seen.add(n)
                stack.extend(n.all_input_nodes)
        return False

    def operand(self, a, node: fx.Node) -> tuple[fx.Node, ...]:
        """An operand of a binary op whose other side is integer: an integer value, a constant, or a
        float from outside the region (positions: cos / sin), quantized where it enters."""
        if isinstance(a, fx.Node) and a in self.ints:
            return self.ints[a]
        if isinstance(a, (int, float)):
            return self.scalar4(float(a), f"{self.where(node)}.scalar")
        if isinstance(a, fx.Node):
            value = None if self.qg._varies(a) else self.qg.value(a)
            if value is not None and value.is_floating_point():
                v = value.double()
                m, e = I.const(v.abs().clamp(min=1e-30))
                return self.const4(f"{self.where(node)}.const", torch.sign(v).to(torch.int64), m, e)
            if not self.depends_on_region(a):  # once per tensor (q and k read one cos)
                if a not in self.boundary:
                    self.boundary[a] = self.op4(I.int_quantize, (a, [-1], _Q_BOUNDARY, True), node)
                return self.boundary[a]
        raise self.unsupported(node, f"operand {a} is a float computed from the activations")

    def where(self, node: fx.Node) -> str:
        return self.qg.module_of(node)

    def unsupported(self, node: fx.Node, why: str = "") -> NotImplementedError:
        target = _method(node) or getattr(node.target, "__name__", str(node.target))
        return NotImplementedError(
            f"qpass integer_only: {target} in {self.where(node)} has no integer implementation"
            + (f" ({why})" if why else "") + "; the integer-only preset covers Llama-family decoders")

    def dequant(self, v: tuple[fx.Node, ...], dtype: torch.dtype, before: fx.Node) -> fx.Node:
        return self.call(I.int_dequantize, (*v, dtype), before)

    def float_island(self, fn, ins: list[tuple[fx.Node, ...]], node: fx.Node, label: str, extra=()) -> tuple:
        """An ablation: dequantize, run ``fn`` in float, quantize back (24 bits; the next DI op requantizes)."""
        fl = [self.dequant(v, torch.float32, node) for v in ins]
        y = self.call(fn, (*fl, *extra), node)
        self.float_islands.append(f"{label} in {self.where(node)}")
        return self.op4(I.int_quantize, (y, [-1], 24, True), node)

    # -- the walk -------------------------------------------------------------------------------
    def run(self) -> int:
        graph = self.qg.graph
        norms = _find_rmsnorms(self.qg)
        inner = set().union(*(n.inner for n in norms.values())) if norms else set()
        embeds = [n for n in graph.nodes if _is(n, _EMBEDDINGS)]
        if not embeds:
            raise NotImplementedError("qpass integer_only: no embedding in this graph (the region starts at one)")
        for node in list(graph.nodes):
            if node.op == "output":
                self.finish_output(node)
                continue
            if node.op not in ("call_function", "call_method"):
                continue
            if node in embeds:
                self.sources.add(node)
                self.ints[node] = self.op4(I.int_quantize, (node, [-1], 24, True), node.next)
                continue
            if node in norms and norms[node].x in self.ints:
                self.rmsnorm(norms[node], node)
                continue
            if node in inner and any(a in self.ints for a in node.all_input_nodes):
                continue  # part of a norm, rewritten whole at its output
            if not any(a in self.ints for a in node.all_input_nodes):
                continue
            self.rewrite(node)
        return self.linears

    def rewrite(self, node: fx.Node) -> None:
        meth = _method(node)
        if node.op == "call_function" and node.target is F.dropout:
            training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            if training:
                raise self.unsupported(node, "dropout in training mode")
            self.ints[node] = self.ints[node.args[0]]  # eval: the identity
        elif meth in _IDENTITY:
            if meth == "to" and any(isinstance(a, torch.dtype) and not a.is_floating_point
                                    for a in (*node.args[1:], *node.kwargs.values())):
                raise self.unsupported(node, "a cast to an integer dtype")
            self.ints[node] = self.ints[node.args[0]]
        elif meth in _MOVES or (node.op == "call_function" and node.target in _MOVE_FUNCS):
            self.move(node, _MOVES.get(meth) or _MOVE_FUNCS[node.target])
        elif _is(node, (torch.cat,), "cat"):
            self.cat(node)
        elif _is(node, (operator.neg, torch.neg), "neg"):
            q, zp, m, e = self.ints[node.args[0]]
            q64 = self.call(torch.Tensor.to, (q, torch.int64), node)
            self.ints[node] = (self.call(torch.neg, (q64,), node), self.call(torch.neg, (zp,), node), m, e)
        elif _is(node, (operator.add, torch.add), "add") or _is(node, (operator.sub, torch.sub), "sub"):
            self.add(node, sub=_is(node, (operator.sub, torch.sub), "sub"))
        elif _is(node, (operator.mul, torch.mul), "mul"):
            a, b = node.args[0], node.args[1]
            self.ints[node] = self.op4(I.di_mul, (*self.operand(a, node), *self.operand(b, node)), node)
        elif _is(node, (operator.truediv, torch.div), "div") and isinstance(node.args[1], (int, float)):
            self.ints[node] = self.op4(I.di_mul, (*self.ints[node.args[0]], *self.scalar4(1.0 / node.args[1], "div")), node)
        elif node.op == "call_function" and node.target in LINEAR_TARGETS:
            self.linear(node)
        elif _is(node, _SILU) or _is(node, _GELU):
            self.act(node)
        elif _is(node, _SDPA):
            self.attention(node)
        elif node.op == "call_function" and node.target is F.rms_norm:
            x, shape, w, eps = (list(node.args) + [None, None, None])[:4]
            eps = node.kwargs.get("eps", eps)
            weight = None if w is None else self.qg.value(w)
            self.rmsnorm(_RMSNorm(x, node, None if weight is None else weight.float(),
                                  1e-6 if eps is None else float(eps), set()), node)
        elif node.op == "call_function" and node.target is F.layer_norm:
            self.layernorm(node)
        else:
            raise self.unsupported(node)

    def move(self, node: fx.Node, fn) -> None:
        q, zp, m, e = self.ints[node.args[0]]
        rest = node.args[1:]
        if fn is torch.Tensor.reshape and len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            rest = (tuple(rest[0]),)
        out = [self.call(fn, (q, *rest), node, dict(node.kwargs))]
        for t in (zp, m, e):
            full = self.call(torch.Tensor.expand_as, (t, q), node)
            out.append(self.call(fn, (full, *rest), node, dict(node.kwargs)))
        self.ints[node] = tuple(out)

    def cat(self, node: fx.Node) -> None:
        parts = node.args[0]
        if not all(p in self.ints for p in parts):
            if any(isinstance(p, fx.Node) and not self.depends_on_region(p) for p in parts):
                raise NotImplementedError(
                    f"qpass integer_only: {self.where(node)} concatenates a KV cache (state from outside the call) with the new "
                    "keys or values: the integer-only preset runs without a KV cache so far; call the model with "
                    "use_cache=False (generate() is not supported by integer_only yet)")
            raise self.unsupported(node, "a cat of integer and float tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        comps = []
        for i in range(4):
            ts = []
            for p in parts:
                v = self.ints[p]
                ts.append(v[i] if i == 0 else self.call(torch.Tensor.expand_as, (v[i], v[0]), node))
            if i == 0:
                ts = [self.call(torch.Tensor.to, (t, torch.int64), node) for t in ts]
            comps.append(self.call(torch.cat, (ts, dim), node))
        self.ints[node] = tuple(comps)

    def add(self, node: fx.Node, sub: bool) -> None:
        a, b = node.args[0], node.args[1]
        if node.kwargs.get("alpha", 1) != 1:
            raise self.unsupported(node, "add with alpha")
        va, vb = self.operand(a, node), self.operand(b, node)
        if sub:
            vb = self.op4(I.di_mul, (*vb, *self.scalar4(-1.0, "neg")), node)
        self.ints[node] = self.op4(I.di_add, (*va, *vb), node)

    # -- linears, norms, activations, attention -------------------------------------------------
    def linear(self, node: fx.Node) -> None:
        site = self.qg.site(node)
        if site is None or site.input not in self.ints:
            raise self.unsupported(node, "a linear whose weight is not a constant")
        if self.config.skips(site.path):  # lm_head: the region's end
            node.replace_input_with(site.input, self.dequant(self.ints[site.input], torch.float32, node))
            return
        w = self.qg.value(site.weight_node).float()
        if site.weight_t:
            w = w.t()
        s = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        wq = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        # one exponent for the layer, 24-bit mantissas per channel: DI-MatMul's output scale stays per token
        e = torch.floor(torch.log2(s.max().double())).to(torch.int64) - 23
        m = torch.round(s.double() / torch.pow(2.0, e.double())).to(torch.int64)
        weight = self.const4(f"{site.path}.weight_int8", wq.t().contiguous(), m[None], e.reshape(1, 1))
        x8 = self.requant(self.ints[site.input], [-1], node)
        out = self.op4(I.di_matmul, (*x8, *weight), node)
        bias = self.qg.value(site.bias_node) if site.bias_node is not None else None
        if bias is not None:
            b = bias.double()
            bm, be = I.const(b.abs().clamp(min=1e-30))
            out = self.op4(I.di_add, (*out, *self.const4(f"{site.path}.bias_int", torch.sign(b).to(torch.int64), bm, be)),
                           node)
        self.ints[node] = out
        row = self.report.row(site.path)
        row.weight = "int8 per-channel (dyadic scales)"
        row.activation = "int8 per-token asym (DI-MatMul)"
        row.add_kernel("integer-only (qpass.di_matmul)")
        self.qg.quantized[node] = site.path
        self.linears += 1

    def rmsnorm(self, norm: _RMSNorm, node: fx.Node) -> None:
        x = self.ints[norm.x]
        n = self.qg.shape(norm.x)[-1]
        w = norm.weight if norm.weight is not None else torch.ones(n)
        if not self.spec.norm:
            def fn(t, weight, eps=norm.eps):
                return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight
            wn = self.qg.constant(f"{self.where(node)}.float_norm_weight", w)
            self.ints[node] = self.float_island(fn, [x], node, "float RMSNorm", (wn,))
            return
        wm, we = I.const(w.double().abs().clamp(min=1e-30))
        wm = wm * torch.sign(w).to(torch.int64)  # signed mantissas (SmolLM2 has negative norm weights)
        path = self.where(node)
        eps_m, eps_e = I.const(max(norm.eps, 1e-30))
        out = self.op4(I.di_rmsnorm, (*x, self.qg.constant(f"{path}.norm_m", wm),
                                      self.qg.constant(f"{path}.norm_e", we), int(eps_m), int(eps_e)), node)
        self.ints[node] = self.requants[(out, (-1,), True)] = out  # int8 per token already

    def layernorm(self, node: fx.Node) -> None:
        x, shape = node.args[0], node.args[1]
        w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        b = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
        n = shape[-1]
        wv = torch.ones(n) if w is None else self.qg.value(w).float()
        bv = torch.zeros(n) if b is None else self.qg.value(b).float()
        path = self.where(node)
        wm, we = I.const(wv.double().abs().clamp(min=1e-30))
        wm = wm * torch.sign(wv).to(torch.int64)
        bm, be = I.const(bv.double().abs().clamp(min=1e-30))
        c = self.qg.constant
        eps_m, eps_e = I.const(float(eps))
        out = self.op4(I.di_layernorm, (*self.ints[x], c(f"{path}.ln_m", wm), c(f"{path}.ln_e", we),
                                        c(f"{path}.ln_bq", bm * torch.sign(bv).to(torch.int64)),
                                        c(f"{path}.ln_be", be), int(eps_m), int(eps_e)), node)
        self.ints[node] = self.requants[(out, (-1,), True)] = out

    def act(self, node: fx.Node) -> None:
        x = self.ints[node.args[0]]
        gelu = _is(node, _GELU)
        if gelu and node.kwargs.get("approximate", "none") not in ("none", "tanh"):
            raise self.unsupported(node)
        if not self.spec.act:
            self.ints[node] = self.float_island(node.target, [x], node, "float GELU" if gelu else "float SiLU")
            return
        x8 = self.requant(x, [-1], node)
        consts = I.GELU_CONST if gelu else I.SILU_CONST
        self.ints[node] = self.op4(I.di_silu, (*x8, *consts), node)

    def attention(self, node: fx.Node) -> None:
        args = list(node.args) + [None] * 7
        q, k, v = args[:3]
        kw = node.kwargs
        mask = kw.get("attn_mask", args[3])
        if kw.get("dropout_p", args[4] or 0.0) not in (0, 0.0, None) or kw.get("enable_gqa", False):
            raise self.unsupported(node, "dropout or enable_gqa")
        if kw.get("is_causal", args[5] or False):
            if mask is not None:
                raise self.unsupported(node, "is_causal with a mask")
            sq, sk = self.qg.shape(q), self.qg.shape(k)
            if sq is None or sk is None or not all(isinstance(d, int) for d in (sq[-2], sk[-2])):
                raise self.unsupported(node, "is_causal with dynamic shapes")
            lq, lk = sq[-2], sk[-2]
            mask = self.qg.constant(f"{self.where(node)}.causal_mask",
                                    torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq))
        if mask is not None:
            val = meta_value(mask)
            if val is None or val.dtype != torch.bool:
                raise self.unsupported(node, "a float attention mask (a boolean one is supported)")
        if not all(t in self.ints for t in (q, k, v)):
            raise self.unsupported(node, "query, key and value must all be integer")
        scale = kw.get("scale", args[6])
        if scale is None:
            scale = 1.0 / math.sqrt(self.qg.shape(q)[-1])
        q8 = self.requant(self.ints[q], [-1], node)
        k8 = self.requant(self.ints[k], [-1], node)
        # V per (batch, head): its tokens are PV's reduction dim, so one scale per head
        v8 = self.requant(self.ints[v], [-2, -1], node)
        kt = tuple(self.call(torch.Tensor.transpose, (t, -2, -1), node) for t in k8)
        scores = self.op4(I.di_matmul, (*q8, *kt), node)
        if self.spec.softmax:
            probs = self.op4(I.di_softmax, (*scores, mask, *I.softmax_consts(float(scale), self.spec.clip)), node)
        else:
            def fn(s, m, sc=float(scale)):
                s = s * sc
                return (s if m is None else s.masked_fill(~m, float("-inf"))).softmax(-1)
            p = self.float_island(fn, [scores], node, "float softmax", (mask,))
            probs = self.requant(p, [-1], node, signed=False)
        self.ints[node] = self.op4(I.di_matmul, (*probs, *v8), node)

    def finish_output(self, node: fx.Node) -> None:
        def fix(a):
            if isinstance(a, fx.Node) and a in self.ints:
                return self.dequant(self.ints[a], torch.float32, node)
            return a
        node.args = fx.node.map_aggregate(node.args, fix)


def integer_only(qg: QGraph, config: QuantConfig, calibration: Calibration | None, report: Report) -> int:
    """Rewrite the graph between the embedding and ``lm_head`` onto qpass.intops (see the module
    docstring); returns the number of linears rewritten. Does nothing unless ``config.integer_only``."""
    if config.integer_only is None:
        return 0
    rw = _Rewriter(qg, config, report)
    n = rw.run()
    if rw.float_islands:
        logger.warning("qpass integer_only: ablation runs %d ops in float: %s", len(rw.float_islands),
                       ", ".join(rw.float_islands[:4]) + (" ..." if len(rw.float_islands) > 4 else ""))
    return n


# -- the region check ---------------------------------------------------------------------------------
def _is_op(node: fx.Node, op) -> bool:
    return node.op == "call_function" and node.target is op


def check_integer_region(gm: fx.GraphModule) -> list[str]:
    """The floating-point ops between the embedding's ``int_quantize`` and the final ``int_dequantize``
    (nodes that depend on the first and feed the second), one line each; empty when none is left."""
    graph = gm.graph
    starts = [n for n in graph.nodes if _is_op(n, I.int_quantize) and _is(n.args[0], _EMBEDDINGS)]
    if not starts:
        return ["no integer region: no int_quantize of an embedding"]
    after = _reach(starts, lambda n: n.users)
    ends = [n for n in after if _is_op(n, I.int_dequantize) and not any(
        _is_op(d, I.int_dequantize) or (isinstance(d.target, torch._ops.OpOverload) and d.target.namespace == "qpass")
        for d in _descendants(n))]
    before = _reach(ends, lambda n: n.all_input_nodes)
    bad = []
    for i, node in enumerate(graph.nodes):
        if node in after and node in before and node not in ends and node.op in ("call_function", "call_method"):
            vals = meta_value(node)
            vals = vals if isinstance(vals, (tuple, list)) else (vals,)
            if any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in vals):
                target = _method(node) or getattr(node.target, "__name__", str(node.target))
                bad.append(f"%{i} {target} in {_module(node)}")
    return bad


def assert_integer_region(gm: fx.GraphModule) -> None:
    """Raise an AssertionError naming every floating-point op in the integer region."""
    bad = check_integer_region(gm)
    if bad:
        raise AssertionError(f"{len(bad)} floating-point ops between the embedding and lm_head: " + "; ".join(bad))


def _reach(nodes, step) -> set[fx.Node]:
    """Every node reached from ``nodes`` by repeated ``step`` (users or inputs), ``nodes`` excluded
    unless reached again."""
    seen, stack = set(), list(nodes)
    while stack:
        for u in step(stack.pop()):
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _descendants(node: fx.Node) -> set[fx.Node]:
    return _reach([node], lambda n: n.users)


def _module(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        return normalize_path(str(list(stack.values())[-1][0]))
    return "?"
