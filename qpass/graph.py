"""The graph qpass rewrites: a private copy of Dynamo's graph that knows its parameters.

Dynamo lifts parameters to graph inputs and passes the real parameter tensors
among the example inputs. ``QGraph`` copies the graph (Dynamo's own must not be
mutated: that changes the arguments Dynamo passes), names every parameter input
by its module path, and turns every tensor a pass rewrites into a constant of a
fresh root module (a ``get_attr`` node). ``build()`` returns the GraphModule for
Inductor, called with the same inputs as Dynamo's graph.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._guards import detect_fake_mode

from qpass import ops
from qpass.qmath import QuantizedWeight

__all__ = ["QGraph", "LinearSite", "ExpertsSite", "normalize_path", "placeholder_sources", "LINEAR_TARGETS", "MATMUL_TARGETS"]

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
MATMUL_TARGETS = (operator.matmul, torch.matmul)  # ``x @ W.T``: a linear when W is a 2-D constant

_SOURCE_KEY = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]|\.(\w+)")


_ROOT = re.compile(r"^L\[['\"]\w+['\"]\]")


def normalize_path(source: str) -> str:
    """``L['self']._modules['model']._modules['layers']._modules['0']`` or
    ``L['self'].model.layers[0]`` -> ``model.layers.0``, relative to the frame's module argument,
    whatever its name (``forward(this, x)``, ``f(model, x)``)."""
    return split_source(source)[1]


def split_source(source: str) -> tuple[str, str]:
    """A Dynamo source name -> (its root local, e.g. ``L['self']``, or ``""``; the module path below it)."""
    root = _ROOT.match(source)
    rest = source[root.end():] if root else source
    parts = [a or b for a, b in _SOURCE_KEY.findall(rest)]
    return (root.group(0) if root else ""), ".".join(p for p in parts if p not in ("_modules", "_parameters", "_buffers"))


@dataclass
class LinearSite:
    """One linear layer call in the graph: ``y = x @ W.T + b``, in any of its spellings:

    - ``linear(x, W, b)``: nn.Linear, ``F.linear``;
    - ``addmm(b, x, W)``: GPT-2's Conv1D, W stored as (in, out);
    - ``x @ W2`` (``torch.matmul``, ``.matmul``), W2 a 2-D constant stored (in, out) or
      ``W.T`` / ``W.t()`` / ``W.transpose(0, 1)`` of one, optionally ``+ b`` (b 1-D, one per output).

    ``weight_t`` is True where the weight argument holds (in, out). ``node`` is the linear's
    output (the bias add of ``x @ W.T + b``), which a rewrite replaces; ``reader`` is the op that
    reads ``x`` and the weight (the matmul under that add; ``node`` itself otherwise).
    """

    node: fx.Node
    path: str
    reader: fx.Node | None = None

    def __post_init__(self):
        self.reader = self.node if self.reader is None else self.reader

    @property
    def weight_t(self) -> bool:
        return self.reader.target is torch.addmm or is_matmul(self.reader)

    @property
    def in_dim(self) -> int:
        """The weight argument's dimension of input channels."""
        return 0 if self.weight_t else 1

    @property
    def input(self) -> fx.Node:
        return self.reader.args[1] if self.reader.target is torch.addmm else self.reader.args[0]

    @property
    def weight_arg(self) -> tuple[fx.Node, int, str | None]:
        """(node, argument position, keyword) of the weight, as ``ArgEdits`` takes them."""
        if self.reader.target is torch.addmm:
            return self.reader, 2, None
        return self.reader, 1, None if is_matmul(self.reader) else "weight"

    @property
    def bias_arg(self) -> tuple[fx.Node, int, str | None] | None:
        if self.reader.target is torch.addmm:
            return self.reader, 0, None
        if self.node is not self.reader:  # x @ W.T + b, or b + x @ W.T
            return self.node, int(self.node.args[0] is self.reader), None
        return None if is_matmul(self.reader) else (self.reader, 2, "bias")

    @property
    def weight_node(self) -> fx.Node:
        return _arg(*self.weight_arg)

    @property
    def bias_node(self) -> fx.Node | None:
        return None if self.bias_arg is None else _arg(*self.bias_arg)


@dataclass
class ExpertsSite:
    """One grouped matmul over fused expert weights (a mixture-of-experts layer)::

        y = grouped_mm(x_sorted, W.transpose(-2, -1), offs)    # W: (E, N, K), as transformers stores it

    Row ``r`` of ``x_sorted`` belongs to expert ``e`` when ``offs[e-1] <= r < offs[e]`` and is
    multiplied by ``W[e].T``. The weight argument holds (E, K, N) (``in_dim`` 1). ``path`` names the
    parameter (``model.layers.1.mlp.experts.gate_up_proj``), which is also its report row and its
    calibration key; ``param`` is the parameter's placeholder.
    """

    node: fx.Node
    path: str
    param: fx.Node

    in_dim = 1  # input channels of the weight argument (E, K, N)
    bias_arg = None
    bias_node = None

    @property
    def reader(self) -> fx.Node:
        return self.node

    @property
    def input(self) -> fx.Node:
        return self.node.args[0]

    @property
    def weight_arg(self) -> tuple[fx.Node, int, str | None]:
        return self.node, 1, None

    @property
    def weight_node(self) -> fx.Node:
        return self.node.args[1]

    @property
    def offsets(self) -> fx.Node:
        return self.node.args[2] if len(self.node.args) > 2 else self.node.kwargs["offs"]


def is_grouped_mm(node: fx.Node) -> bool:
    """transformers' grouped matmul: ``torch._grouped_mm``, ``F.grouped_mm`` or its CPU fallback op
    ``transformers::grouped_mm_fallback`` (what Dynamo captures for fp32 weights)."""
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        name = target._qualified_op_name if isinstance(target, torch._ops.OpOverloadPacket) else target.name()
        return name.split(".")[0] in ("transformers::grouped_mm_fallback", "aten::_grouped_mm")
    return target in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) and target is not None


def is_topk(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.topk) or (node.op == "call_method" and node.target == "topk")


def is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in MATMUL_TARGETS) or (
        node.op == "call_method" and node.target == "matmul"
    )


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add)) or (
        node.op == "call_method" and node.target == "add"
    )


def _arg(node: fx.Node, i: int, name: str | None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name) if name else None


class QGraph:
    """A rewritable copy of a Dynamo graph plus the real values of its parameters.

    Offline math (scales, searches, packing) runs on CPU, where the calibration statistics live:
    ``value`` gives CPU tensors. Constants written into the graph go to the graph's ``device``
    (that of its parameters), so a model on CUDA gets CUDA constants.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: list,
        names: Mapping[torch.Tensor, str] | None = None,
        sources: list[tuple[str, str]] | None = None,
        memo: dict | None = None,
        stored_weights: Mapping[str, QuantizedWeight] | None = None,
        stored_params: Mapping[str, tuple] | None = None,
    ):
        self.graph = fx.Graph()
        val_map: dict[fx.Node, fx.Node] = {}
        out = self.graph.graph_copy(gm.graph, val_map)
        self.graph.output(out)
        self.placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if len(self.placeholders) != len(example_inputs):
            raise RuntimeError("qpass: graph inputs and example inputs differ in number")
        self.fake_mode = _graph_fake_mode(self.graph) or detect_fake_mode(example_inputs)
        self.root = nn.Module()
        self.names: dict[str, str] = {}  # constant attribute -> module path it came from
        self.smoothing: dict[fx.Node, torch.Tensor] = {}  # linear -> per-input-channel s its input was divided by
        self.quantized: dict[fx.Node, str] = {}  # output node of a quantized linear -> module path
        self.quantized_experts: dict[fx.Node, str] = {}  # quantized grouped matmul -> its expert weights' path
        self.params: dict[fx.Node, tuple[str, torch.Tensor]] = {}
        if sources is None:
            sources = placeholder_sources(gm)
        sources = {n: src for n, v, src in zip(self.placeholders, example_inputs, sources) if isinstance(v, nn.Parameter)}
        # Dynamo names parameters relative to the frame it traced: after a graph break inside a
        # submodule that is the submodule (``self_attn.q_proj``). ``names`` (parameter -> path from
        # the root module the user compiled) tells what each frame-local access path stands for.
        self._roots = _roots(sources, dict(zip(self.placeholders, example_inputs)), names)
        for node, value in zip(self.placeholders, example_inputs):
            if isinstance(value, nn.Parameter):
                self.params[node] = (self._resolve(*sources[node]) or node.name, value)
                if getattr(value, "qpass_released", None) is not None:
                    raise RuntimeError(
                        f"qpass: {self.params[node][0]} was released by QPassBackend.release_weights() and this "
                        "recompile needs it: compile every input shape before releasing the fp32 weights"
                    )
        self.device = next((v.device for _, v in self.params.values() if v.device.type != "cpu"), torch.device("cpu"))
        self._const_cache: dict[fx.Node, torch.Tensor | None] = {}
        self._fake_cache: dict[tuple, object] = {}
        self._experts: dict[fx.Node, ExpertsSite] = {}
        # decisions that depend on a layer's weights and statistics, not on this graph (the alpha and
        # static-or-per-token searches, the kernel grid): the backend shares one memo across its graphs
        self.memo: dict = memo if memo is not None else {}
        # path -> the quantized weight a checkpoint stored for it (``qpass.load``): the quantize pass
        # uses it as it is instead of quantizing the dequantized weight again
        self.stored_weights: Mapping[str, QuantizedWeight] = stored_weights or {}
        # path -> (weak reference to the parameter ``qpass.load`` wrote as the stored weight
        # dequantized, ``storage_mark`` of it then): while the layer reads that parameter unchanged,
        # the stored weight needs no comparison against it
        self.stored_params: Mapping[str, tuple] = stored_params or {}


    # -- reading ---------------------------------------------------------------
    def value(self, node) -> torch.Tensor | None:
        """The real value of a node computed from parameters and constants alone
        (a parameter, a constant, or e.g. Gemma's ``1.0 + w.float()``); else None."""
        if not isinstance(node, fx.Node):
            return None
        if node in self._const_cache:
            return self._const_cache[node]
        result = None
        if node in self.params:
            result = self.params[node][1].detach().cpu()
        elif node.op == "get_attr":
            result = getattr(self.root, node.target).detach().cpu()
        elif node.op in ("call_function", "call_method"):
            tensor_args = [a for a in node.all_input_nodes]
            if tensor_args and all(self.value(a) is not None for a in tensor_args):
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.value)
                with torch.no_grad():
                    fn = getattr(args[0].__class__, node.target) if node.op == "call_method" else node.target
                    result = fn(*args, **kwargs)
                if not isinstance(result, torch.Tensor):
                    result = None
        self._const_cache[node] = result
        return result

    def site(self, node) -> LinearSite | None:
        """The linear layer computed by ``node``, if its weight is a parameter or constant."""
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
            return None
        reader = node
        if is_matmul(node):
            if not self._matmul_linear(node) or (len(node.users) == 1 and self._bias_add(next(iter(node.users)))):
                return None  # not a linear, or one whose output is the bias add after it
        elif _is_add(node):
            if (reader := self._bias_add(node)) is None:
                return None
        elif not (node.op == "call_function" and (node.target in LINEAR_TARGETS or (
                node.target is torch.addmm and len(node.args) == 3 and not node.kwargs))):
            return None
        site = LinearSite(node, "", reader)
        w = self.value(site.weight_node)
        if w is None or w.dim() != 2:
            return None
        site.path = self.module_of(node)
        return site

    def _matmul_linear(self, node: fx.Node) -> bool:
        """``x @ W2``: W2 a 2-D constant, x not."""
        if len(node.args) != 2 or node.kwargs or not self._varies(node.args[0]) or self._varies(node.args[1]):
            return False
        w = self.value(node.args[1])
        return w is not None and w.dim() == 2

    def _varies(self, node) -> bool:
        """Whether ``node`` depends on a graph input that is not a parameter. Asked before ``value``,
        whose recursion would follow an activation back through every layer."""
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if isinstance(n, fx.Node) and n not in seen:
                if n.op == "placeholder" and n not in self.params:
                    return True
                seen.add(n)
                stack.extend(n.all_input_nodes)
        return False

    def _bias_add(self, node: fx.Node) -> fx.Node | None:
        """The matmul of ``x @ W2 + b`` (either order), where ``b`` is a 1-D constant with one value
        per output and the add is the matmul's only reader."""
        if not _is_add(node) or len(node.args) != 2 or node.kwargs:
            return None
        for m, b in (node.args, node.args[::-1]):
            if isinstance(m, fx.Node) and is_matmul(m) and len(m.users) == 1 and self._matmul_linear(m):
                bias = None if self._varies(b) else self.value(b)
                if bias is not None and bias.dim() == 1 and bias.numel() == self.value(m.args[1]).shape[1]:
                    return m
        return None

    def linears(self) -> list[LinearSite]:
        """Every linear whose weight is a parameter or constant, in graph order."""
        return [s for n in self.graph.nodes if (s := self.site(n)) is not None]

    def experts_site(self, node) -> ExpertsSite | None:
        """The grouped matmul computed by ``node``, if its weight is a 3-D parameter (or a transpose
        of one) and its input is an activation."""
        if not isinstance(node, fx.Node) or not is_grouped_mm(node) or len(node.args) < 2:
            return None
        if node in self._experts:  # found before a pass replaced its weight by a constant
            return self._experts[node]
        offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
        w = self.value(node.args[1])
        if offs is None or w is None or w.dim() != 3 or not self._varies(node.args[0]):
            return None
        params = self._params_under(node.args[1])
        if len(params) != 1 or self.params[params[0]][1].dim() != 3:
            return None
        self._experts[node] = ExpertsSite(node, self.params[params[0]][0], params[0])
        return self._experts[node]

    def _params_under(self, node: fx.Node) -> list[fx.Node]:
        found, stack, seen = [], [node], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in self.params:
                found.append(n)
            stack.extend(n.all_input_nodes)
        return found

    def experts(self) -> list[ExpertsSite]:
        """Every grouped matmul over fused expert weights, in graph order."""
        return [s for n in self.graph.nodes if (s := self.experts_site(n)) is not None]

    def is_router(self, site: LinearSite, depth: int = 8) -> bool:
        """Whether the linear's output decides a top-k choice (a mixture-of-experts router) within a
        few ops: quantizing it would change which experts run, so it stays in full precision."""
        frontier, seen = [site.node], set()
        for _ in range(depth):
            nxt = []
            for n in frontier:
                for u in n.users:
                    if is_topk(u):
                        return True
                    if u not in seen and u.op != "output":
                        seen.add(u)
                        nxt.append(u)
            frontier = nxt
        return False

    def module_of(self, node: fx.Node) -> str:
        """Module path of the innermost module that ran ``node`` (``model.layers.0.mlp.up_proj``)."""
        stack = node.meta.get("nn_module_stack")
        if stack:
            source, _cls = list(stack.values())[-1]
            return self._resolve(*split_source(source))
        site_weight = node.args[1] if node.target in LINEAR_TARGETS and len(node.args) > 1 else None
        if site_weight in self.params:
            return self.params[site_weight][0].rsplit(".", 1)[0]
        return node.name

    def _resolve(self, root: str, rel: str) -> str:
        """The full module path of ``rel`` under the frame-local ``root``."""
        parts = rel.split(".") if rel else []
        best = max((k for k in self._roots if k[0] == root and tuple(parts[: len(k[1])]) == k[1]),
                   key=lambda k: len(k[1]), default=None)
        if best is None:
            return rel
        return ".".join((*self._roots[best], *parts[len(best[1]):]))

    def fake(self, tensor: torch.Tensor):
        """``tensor``'s fake counterpart for a constant's ``meta['val']``. A plain dense tensor gets a
        fresh fake tensor of its shape, strides, dtype and device (0.05 ms against ``from_tensor``'s
        0.3-0.4 ms: SmolLM2's 800 constants per graph); Inductor fakes the buffers it is given itself."""
        if self.fake_mode is None:
            return tensor
        if type(tensor) is not torch.Tensor or tensor.layout != torch.strided or tensor.is_quantized:
            return self.fake_mode.from_tensor(tensor, static_shapes=True)
        with self.fake_mode:
            return torch.empty_strided(tuple(tensor.shape), tuple(tensor.stride()), dtype=tensor.dtype,
                                       device=tensor.device)

    def shape(self, node) -> torch.Size | None:
        val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
        return val.shape if isinstance(val, torch.Tensor) else None

    # -- writing ---------------------------------------------------------------
    def constant(self, name: str, tensor: torch.Tensor) -> fx.Node:
        """A ``get_attr`` node reading ``tensor`` as a buffer of the new root module, on the
        graph's device (``value`` of the node stays the CPU tensor given here)."""
        base = re.sub(r"\W", "_", name)
        attr, i = base, 1
        while hasattr(self.root, attr):
            attr, i = f"{base}_{i}", i + 1
        # the tensor itself where it can be (a packed weight shared by several graphs stays one)
        placed = (tensor.detach() if tensor.requires_grad else tensor).to(self.device).contiguous()
        self.root.register_buffer(attr, placed)
        self.names[attr] = name
        first = next(n for n in self.graph.nodes if n.op not in ("placeholder", "get_attr"))
        with self.graph.inserting_before(first):
            node = self.graph.get_attr(attr)
        node.meta["val"] = node.meta["example_value"] = self.fake(placed)
        self._const_cache[node] = tensor.detach() if tensor.device.type == "cpu" else placed.cpu()
        return node

    def call(self, target, args: tuple, kwargs: dict | None = None, *, before: fx.Node) -> fx.Node:
        """Insert ``target(*args)`` before ``before``, with ``meta['val']`` from fake tensors."""
        with self.graph.inserting_before(before):
            node = self.graph.call_function(target, args, kwargs or {})
        fake_args, fake_kwargs = fx.node.map_arg((args, kwargs or {}), meta_value)
        if self.fake_mode is not None:
            key = _fake_key(target, fake_args, fake_kwargs)
            if key is not None and key in self._fake_cache:
                val = _like(self._fake_cache[key], self.fake_mode)
            else:
                with self.fake_mode:  # qpass's own ops (and linear) from their inputs' metadata, the rest by running them
                    val = _FAKE_RULES.get(target, target)(*fake_args, **fake_kwargs)
                if key is not None:
                    self._fake_cache[key] = val
        else:
            val = None
        node.meta["val"] = node.meta["example_value"] = val
        for key in ("nn_module_stack", "stack_trace"):
            if key in before.meta:
                node.meta[key] = before.meta[key]
        return node

    def build(self) -> fx.GraphModule:
        """The rewritten GraphModule. It keeps every input of Dynamo's graph (those
        now unused included), so it is called exactly as Dynamo's graph is."""
        self.graph.eliminate_dead_code(is_impure_node=_mutates)
        self.graph.lint()
        used = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        for attr in [a for a, _ in self.root.named_buffers() if a not in used]:
            delattr(self.root, attr)  # e.g. smoothed fp32 weights superseded by quantized ones
            self.names.pop(attr, None)
        gm = fx.GraphModule(self.root, self.graph)
        gm.qpass_names = dict(self.names)
        return gm


def meta_value(node) -> object:
    """A node's value as traced (``meta['val']``, else Dynamo's ``example_value``: a fake tensor, a
    symbolic or plain number); None for what is not a node."""
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None


def constants(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The constants qpass placed in a rewritten graph (``QGraph.constant``), by attribute name
    (``gm.qpass_names`` maps each to what it stands for): buffers, or in a decode step's graph plain
    tensor attributes (``backend.compile_inductor`` tells why), which ``gm.buffers()`` does not list."""
    return {attr: getattr(gm, attr) for attr in getattr(gm, "qpass_names", {})}


def storage_mark(t: torch.Tensor) -> tuple:
    """What tells a tensor's values unchanged without reading them: its storage, view and version
    counter (every in-place write bumps the counter; ``.data =`` or a new tensor changes the storage)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t._version)


def _fake_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``'s output as a fake tensor, from its shapes alone: torch 2.11's composite
    ``linear`` (seen with CUDA fake tensors) calls ``numel()`` and fails on symbolic sizes."""
    if x.dtype != weight.dtype or x.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"qpass: linear of a {x.dtype} {tuple(x.shape)} input and a {weight.dtype} "
                           f"{tuple(weight.shape)} weight")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


#: Targets whose ``meta['val']`` comes from their inputs' metadata instead of running them on fake tensors.
_FAKE_RULES = {F.linear: _fake_linear, **ops.META}


def _fake_key(target, args: tuple, kwargs: dict) -> tuple | None:
    """What fixes the output metadata of one of qpass's integer operators (``qpass.intops``: composite
    ops whose fake run dispatches dozens of aten ops, inserted once per layer with the same shapes):
    the operator, its tensors' shapes, strides, dtypes and devices, and its other arguments. None for
    any other target, and for symbolic shapes (those run every time)."""
    if not (isinstance(target, torch._ops.OpOverload) and target.namespace == "qpass"):
        return None

    def part(a):
        if isinstance(a, torch.Tensor):
            if any(isinstance(d, torch.SymInt) for d in (*a.shape, *a.stride())):
                return None
            return tuple(a.shape), tuple(a.stride()), a.dtype, a.device
        if isinstance(a, (list, tuple)) and all(type(v) in (int, float, bool) for v in a):
            return "seq", *a
        if a is None or type(a) in (int, float, bool, str, torch.dtype):
            return "value", a
        return None

    parts = [part(a) for a in (*args, *(v for _, v in sorted(kwargs.items())))]
    if any(p is None for p in parts):
        return None
    return target, tuple(sorted(kwargs)), *parts


def _like(val, fake_mode):
    """New fake tensors with ``val``'s metadata (a tensor, or a tuple of them): what the operator gives
    for inputs like the ones it was first run on; the integer operators return new tensors, none a view."""
    if isinstance(val, tuple):
        return tuple(_like(v, fake_mode) for v in val)
    with fake_mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)


def placeholder_sources(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(root local, relative module path) of each placeholder, from Dynamo's sources; read them
    while the backend runs (Dynamo drops them from the graph's metadata afterwards)."""
    out = []
    for node in gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        name = grapharg.source.name if grapharg is not None else ""
        out.append(split_source(name() if callable(name) else name) if name else ("", ""))
    return out


def _roots(sources: dict, values: dict, names: Mapping[torch.Tensor, str] | None) -> dict:
    """(frame-local root, leading access path) -> the module path it stands for, read off the
    parameters whose full path ``names`` knows: ``L['self']``, ``self_attn.q_proj.weight`` named
    ``model.layers.1.self_attn.q_proj.weight`` gives ``(L['self'], ()) -> model.layers.1``. A tied
    parameter (one tensor, two paths) can disagree with the rest: the majority wins."""
    found: dict[tuple, Counter] = {}
    for node, (root, rel) in sources.items():
        full = names.get(values[node]) if names is not None else None
        if full is None or not rel:
            continue
        rel_parts, full_parts = rel.split("."), full.split(".")
        common = 0
        while common < min(len(rel_parts), len(full_parts)) and rel_parts[-1 - common] == full_parts[-1 - common]:
            common += 1
        if common < min(2, len(rel_parts)):  # ``weight`` alone says nothing (tied ``lm_head.weight``)
            continue
        key = (root, tuple(rel_parts[: len(rel_parts) - common]))
        found.setdefault(key, Counter())[tuple(full_parts[: len(full_parts) - common])] += 1
    return {key: votes.most_common(1)[0][0] for key, votes in found.items()}


def _mutates(node: fx.Node) -> bool:
    """Nodes dead-code elimination must keep: side effects, and in-place ops whose result is unused
    but whose input is read later (a KV cache's ``index_copy_``, ``add_``); FX sees neither as impure
    when Dynamo records them as methods."""
    if node.is_impure():
        return True
    if node.op not in ("call_method", "call_function"):
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def _graph_fake_mode(graph: fx.Graph):
    """The fake mode Dynamo traced ``graph`` under (new nodes' meta must share it)."""
    for node in graph.nodes:
        val = node.meta.get("example_value")
        if isinstance(val, torch._subclasses.FakeTensor):
            return val.fake_mode
    return None
