"""The torch.compile backend: capture -> smooth -> quantize -> lower -> Inductor.

``PIPELINE`` is the one place that states the order of the passes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
import unittest.mock
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn

from torch.utils.weak import WeakIdKeyDictionary

from qpass import checks, coverage
from qpass.blocks import compile_by_block
from qpass.calibration import Calibration
from qpass.config import QuantConfig
from qpass.graph import QGraph, placeholder_sources, storage_mark
from qpass.qmath import QuantizedWeight
from qpass.passes.attention import decode_attention, grouped_query_attention
from qpass.passes.decode import float_decode_linears
from qpass.passes.integer import integer_only
from qpass.passes.lower import lower
from qpass.passes.quantize import quantize
from qpass.passes.smooth import smooth
from qpass.report import Report

logger = logging.getLogger(__name__)

__all__ = ["QPassBackend", "backend", "qpass", "PIPELINE"]

Pass = Callable[[QGraph, QuantConfig, "Calibration | None", Report], int]

# The passes, in the order they run. Each returns how many linears it rewrote.
PIPELINE: tuple[tuple[str, Pass], ...] = (
    ("smooth", smooth),  # fold SmoothQuant scales into norms / previous linears (exact)
    ("quantize", quantize),  # quant/dequant around every quantized linear (reference semantics)
    ("lower", lower),  # quantized linears -> oneDNN / FBGEMM / _int_mm / _scaled_mm kernels where one fits
    ("integer", integer_only),  # config.integer_only (I-LLM): everything between embedding and lm_head on integers
)
# integer_only replaces quantize and lower: its linears are DI-MatMuls on qpass.intops
_INTEGER_SKIPS = ("quantize", "lower")


#: Inductor settings for qpass's graphs, under the user's ``inductor_config``. Without masked tail
#: vectorization Inductor generates two variants of each C++ kernel instead of three (scalar and
#: vectorized; a loop whose length is no multiple of the vector width runs its last few elements
#: scalar). qpass's fused quantization kernels made that code generation, in Python, the largest
#: part of a cold compile: SmolLM2 ``w8a8_dynamic``, 1 thread, 79.6 s -> 66.0 s from a checkpoint
#: to the first two tokens.
INDUCTOR_DEFAULTS: dict[str, Any] = {"cpp.enable_loop_tail_vec": False}


def _inductor_config(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """``settings`` checked against ``torch._inductor.config`` now rather than at the first compile."""
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise TypeError(f"qpass.backend: inductor_config must be a mapping of Inductor settings, got {type(settings).__name__}")
    from torch._inductor import config as inductor_config

    unknown = [k for k in settings if not isinstance(k, str) or not hasattr(inductor_config, k)]
    if unknown:
        raise ValueError(f"qpass.backend: inductor_config names no Inductor setting: {', '.join(map(repr, unknown))}")
    return dict(settings)


def compile_inductor(gm: fx.GraphModule, example_inputs: list, settings: Mapping[str, Any], *,
                     as_constants: bool = False, by_block: bool = False) -> Callable:
    """Inductor's ``compile_fx`` of a rewritten graph, under the Inductor ``settings`` given.

    ``by_block`` (prompt graphs): one ``compile_fx`` per decoder block (``qpass.blocks``), so that
    Inductor generates the kernels of identical blocks once and its FX graph cache serves the rest.

    ``as_constants`` (decode steps): qpass's tensors (quantized weights, scales, folded norms) are
    made plain attributes of ``gm`` instead of buffers. AOTAutograd lifts a module's buffers to graph
    inputs, but traces a plain tensor attribute as a constant, which Inductor keeps in the compiled
    module; a call then passes only Dynamo's inputs. SmolLM2's calibrated ``w8a8_dynamic`` decode
    graph had 816 inputs against Dynamo's 364, each passed through AOTAutograd's runtime wrapper and
    unpacked, checked and deleted by Inductor's wrapper on every token: 3 ms of a 19 ms step at 1 thread. oneDNN's packed weights stay
    inputs (Inductor's cache cannot pickle them). Dynamo's fake mode has to accept the real tensors
    while AOTAutograd traces them.

    Caching then: Inductor's FX graph cache would key such constants by their values and store them
    in its entry (a second copy of every weight). They are marked as frozen parameters instead, the
    way Inductor's freezing marks its constants: the key holds their metadata and a hit binds them by
    name from the graph being compiled. AOTAutograd's own cache, whose hits would take constants from
    the entry, is bypassed, so a warm start traces the graph again. Prompt graphs, which run once
    per generation, keep their tensors as inputs and both caches."""
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    if not as_constants:
        with inductor_config.patch(settings):
            split = compile_by_block(gm, compile_fx) if by_block else None
            return split if split is not None else compile_fx(gm, example_inputs)

    from torch._functorch import config as functorch_config
    from torch._guards import detect_fake_mode
    from torch._inductor.freezing_utils import record_has_frozen_params

    for attr in getattr(gm, "qpass_names", {}):
        if attr in gm._buffers and not gm._buffers[attr].is_mkldnn:
            gm.__dict__[attr] = gm._buffers.pop(attr)

    def inner_compile(aot_gm: fx.GraphModule, inputs, **kwargs):
        for node in aot_gm.graph.nodes:
            if node.op == "get_attr" and isinstance(value := getattr(aot_gm, node.target), torch.Tensor):
                value._is_frozen_param = True
        record_has_frozen_params(aot_gm)
        return compile_fx_inner(aot_gm, inputs, **kwargs)

    fake_mode = detect_fake_mode(example_inputs)
    with contextlib.ExitStack() as stack:
        if fake_mode is not None:
            stack.enter_context(unittest.mock.patch.object(fake_mode, "allow_non_fake_inputs", True))
        stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        stack.enter_context(inductor_config.patch(settings))
        return compile_fx(gm, example_inputs, inner_compile=inner_compile)


def _decode_graph(qg: QGraph, sites: list) -> bool:
    """A decode step: every linear reads one token per sequence (``(B, 1, K)``, or ``(1, K)``), with
    static shapes. A prompt's graph, however short, is not one: it compiles once per start, where
    AOTAutograd's cache saves more than its constants would per call (``compile_inductor``)."""
    def one_token(site) -> bool:
        shape = qg.shape(site.input)
        if shape is None or len(shape) < 2 or not all(isinstance(d, int) for d in shape):
            return False
        return shape[-2] == 1 if len(shape) >= 3 else shape[0] == 1

    return bool(sites) and all(one_token(site) for site in sites)


class QPassBackend:
    """A torch.compile backend with a fixed configuration and calibration.

    ``report`` accumulates one row per linear over every graph compiled;
    ``graphs`` keeps the rewritten FX graphs for inspection. ``inductor=False``
    runs the rewritten graph eagerly (useful to debug a pass). ``inductor_config``: Inductor
    settings (``torch._inductor.config`` names) patched around each compile of this backend's graphs.
    ``graph_constants``: decode graphs (one token per sequence) hold qpass's tensors as constants
    of the compiled graph, not as inputs passed on every call (``compile_inductor``).
    SmolLM2's decode step at 1 thread: 16.2 against 19.2 ms. The price is a warm start: such a
    graph is traced by AOTAutograd again (its cache is bypassed), about 8 s per graph for SmolLM2
    at 1 thread. ``False`` keeps them inputs, for short-lived processes that start more than they decode.
    ``by_block``: every other graph (a prompt's) compiles one decoder block at a time, identical
    blocks sharing one compile (``qpass.blocks``): SmolLM2's cold start to the first token, 59 -> 24 s.
    The split costs a prompt's run about 0.15 ms per piece (its call, and the fusion of the last
    kernel of a block with the first of the next; SmolLM2, 2 threads: 5 ms on a 2-token prompt, 3%
    of a 512-token one, ``bench/by_block.py``); ``False`` compiles prompt graphs whole.
    """

    def __init__(
        self, config: QuantConfig | str | None = None, calibration: Calibration | None = None, *, inductor: bool = True,
        inductor_config: Mapping[str, Any] | None = None, graph_constants: bool = True, by_block: bool = True,
    ):
        if isinstance(config, str):
            from qpass.presets import preset

            config = preset(config)
        if config is not None and not isinstance(config, QuantConfig):
            raise TypeError(
                f"qpass.backend: config must be a qpass.QuantConfig or a preset name, got {type(config).__name__}"
            )
        self.config = config if config is not None else QuantConfig()
        if calibration is not None and not isinstance(calibration, Calibration):
            raise TypeError(f"qpass.backend: calibration must be a qpass.Calibration, got {type(calibration).__name__}")
        if not isinstance(inductor, bool):
            raise TypeError(f"qpass.backend: inductor must be a bool, got {type(inductor).__name__}")
        if not isinstance(graph_constants, bool):
            raise TypeError(f"qpass.backend: graph_constants must be a bool, got {type(graph_constants).__name__}")
        if not isinstance(by_block, bool):
            raise TypeError(f"qpass.backend: by_block must be a bool, got {type(by_block).__name__}")
        self.inductor_config = {**INDUCTOR_DEFAULTS, **_inductor_config(inductor_config)}
        self.graph_constants = graph_constants
        self.by_block = by_block
        self.calibration = calibration
        # parameter -> its path from the root module, so that graphs Dynamo traced from inside a
        # submodule (a graph break there) still name layers by their full path; see ``bind``.
        self._names: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.report = Report()
        if calibration is not None:
            self._names.update(calibration.param_paths)
            self.report.model_class = calibration.model_class
        self._warned_no_linear = False
        self._skips_warned: set[str] = set()
        self._experts_warned: set[str] = set()
        self._memo: dict[tuple, dict] = {}  # per set of parameter identities: the passes' per-layer decisions
        self.inductor = inductor
        # path -> quantized weight used as it is (``qpass.load`` fills it from a checkpoint)
        self.stored_weights: dict[str, QuantizedWeight] = {}
        # path -> (weak reference to the parameter qpass.load filled with the stored weight
        # dequantized, its ``graph.storage_mark`` then): such a parameter, unchanged, is not compared
        self.stored_params: dict[str, tuple[weakref.ref, tuple]] = {}
        self.graphs: list[fx.GraphModule] = []
        # Parameters the compiled graphs read / no longer read (the lowered linears hold their own
        # low-precision copies), for ``release_weights``: id -> weak reference.
        self._read: dict[int, weakref.ref] = {}
        self._superseded: dict[int, weakref.ref] = {}
        self._lent: list[nn.Parameter] = []  # released parameters, lent their class per call (see ``lend``)
        self._lend_depth = 0
        self._lend_hooked: weakref.WeakSet = weakref.WeakSet()  # models whose calls lend (see ``release_weights``)
        # Parameters ``defer_weights`` left unwritten (their stored integers dequantized on first read):
        # id -> (the parameter, its layer's module path, the stored weight); lent their class per call too.
        self._deferred: dict[int, tuple[nn.Parameter, str, QuantizedWeight]] = {}
        if calibration is None and self.config.smoothing is not None:
            logger.warning("qpass: no calibration given; smoothing is off (pass calibration=qpass.calibrate(...))")

    def bind(self, model: nn.Module) -> "QPassBackend":
        """Learn ``model``'s module paths, so that every graph compiled from it names its layers by
        their path from ``model`` (Dynamo names them relative to the frame it traced, which after a
        graph break inside a decoder layer is that layer). A calibration made in this process binds
        the model it ran on; call this when the calibration was loaded from a file. Returns self."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"QPassBackend.bind: expected an nn.Module, got {type(model).__name__}")
        for name, p in model.named_parameters():
            self._names[p] = name
        self.report.model_class = type(model).__name__
        checks.warn_eager_experts(model, self.report)
        return self

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        checks.check_grad_mode(example_inputs)
        return _PerParameters(self, gm, example_inputs)

    def _compile(self, gm: fx.GraphModule, example_inputs: list, sources=None) -> Callable:
        """Rewrite and compile ``gm`` for the parameters among ``example_inputs``."""
        memo = self._memo.setdefault(_param_key(example_inputs), {})
        qg = QGraph(gm, example_inputs, self._names, sources, memo, self.stored_weights, self.stored_params)
        known = [*(self.calibration or ()), *(name.rsplit(".", 1)[0] for name in self._names.values())]
        sites = qg.linears()
        decode = _decode_graph(qg, sites)
        as_constants = self.graph_constants and decode
        checks.warn_unmatched_skips(self.config, [s.path for s in sites], known, self._skips_warned)
        calibration = checks.vet_calibration(qg, self.config, self.calibration, self.report)
        checks.report_unhandled_experts(qg, self.report, self._experts_warned)
        self.report.graphs += 1
        coverage.survey(qg, self.report, self._names or None)
        if not self._warned_no_linear and (warning := coverage.no_linear_warning(qg, self.report.model_class)):
            self._warned_no_linear = True  # one warning per backend; the report lists every such parameter
            logger.warning(warning)
        for name, run in PIPELINE:
            if name == "smooth" and calibration is None:
                continue
            if self.config.integer_only is not None and name in _INTEGER_SKIPS:
                continue
            n = run(qg, self.config, calibration, self.report)
            logger.info("qpass %s: %d linears rewritten", name, n)
        if self.inductor and self.config.lower:
            n = float_decode_linears(qg, self.report)
            logger.info("qpass float decode: %d float linears as reductions", n)
        if self.config.lower and self.config.integer_only is None:  # the integer pass has its own attention
            self.report.grouped_attention += grouped_query_attention(qg)
            if self.inductor:
                self.report.decode_attention += decode_attention(qg)
        new_gm = qg.build()
        self.graphs.append(new_gm)
        for node, (_path, param) in qg.params.items():
            (self._read if node.users else self._superseded)[id(param)] = weakref.ref(param)
            if node.users and _holds_deferred(self._deferred, param):  # the graph reads its values when it runs
                self._materialize(param)
        if not self.inductor:
            return new_gm.forward
        return compile_inductor(new_gm, example_inputs, self.inductor_config, as_constants=as_constants,
                                by_block=self.by_block and not decode)

    def defer_weights(self, model: nn.Module, weights: dict[str, tuple[nn.Parameter, QuantizedWeight]]) -> int:
        """Leave each layer's weight ``weights[path][0]`` unwritten until something reads its values:
        ``qpass.load``'s quantized linears, whose values are the stored integers ``weights[path][1]``
        dequantized. The compiled graphs never read them (the quantize pass takes the stored
        integers as they are), so a checkpoint's startup skips the dequantization and the fp32
        weights never become resident unless read. Returns how many were deferred.

        Until then a parameter is a ``DeferredParameter``: metadata answers, and the first read of
        its values anywhere outside a compiled call (printing, arithmetic, ``state_dict()``,
        ``.detach()``, an eager call of its module) writes ``stored.dequantize()`` into it and makes
        it a plain ``nn.Parameter`` again. During a compiled call (``lend``) it has the
        ``nn.Parameter`` class that the graphs' guards check, and its unwritten pages read NaN: a
        graph that reads it is given its values before it runs (``_compile``), and a layer that
        runs outside every compiled graph is caught by ``qpass.compile``'s forward (``check_deferred``).
        A call of ``model`` not through this backend's ``qpass.compile`` forward (``del model.forward``,
        another backend's ``torch.compile(model)``) writes them all first (a pre-hook on ``model``)."""
        deferred = 0
        with _nan_file(max((p.untyped_storage().nbytes() for p, _ in weights.values()), default=0)) as nan_path:
            for path, (p, stored) in weights.items():
                if type(p) is not nn.Parameter or tuple(stored.q.shape) != tuple(p.shape):
                    raise ValueError(f"qpass defer_weights: {path}: a {type(p).__name__} {tuple(p.shape)} cannot "
                                     f"defer to stored integers {tuple(stored.q.shape)}")
                nbytes = p.untyped_storage().nbytes()
                with torch.no_grad():  # nothing resident until read; a read before materializing gives NaN
                    p.set_(torch.UntypedStorage.from_file(nan_path, shared=False, nbytes=nbytes), 0, p.shape, p.stride())
                p.__class__ = DeferredParameter
                self._deferred[id(p)] = (p, path, stored)
                _DEFERRED[p] = weakref.ref(self)
                deferred += 1
        if deferred:
            model.register_forward_pre_hook(torch.compiler.disable(functools.partial(self._materialize_unless_ours, model)))
        return deferred

    def _materialize_unless_ours(self, model: nn.Module, module, args) -> None:
        if self._deferred and getattr(model.__dict__.get("forward"), "qpass_backend", None) is not self:
            for p, _, _ in list(self._deferred.values()):
                self._materialize(p)

    def _materialize(self, p: nn.Parameter) -> None:
        """Write a deferred parameter's stored weight dequantized into it (the same float32 products
        ``torch.equal`` compares with) and make it a plain parameter; its values stay trusted as the
        stored weight (``stored_params``) until changed."""
        _param, path, stored = self._deferred.pop(id(p))
        _DEFERRED.pop(p, None)
        with torch._C.DisableTorchFunctionSubclass():
            stored.dequantize_into(p)
        p.__class__ = nn.Parameter
        if path in self.stored_params and self.stored_params[path][0]() is p:
            self.stored_params[path] = (weakref.ref(p), storage_mark(p))

    def check_deferred(self) -> None:
        """Called after each compiled call: a layer whose weight is still deferred and that no
        compiled graph holds ran eagerly (or not at all), on its unwritten (NaN) weight. Gives them
        their values and raises, naming them, so that no such output passes unnoticed (every
        deferred layer counts, whatever the calibration lists: a static checkpoint's per-token
        layers have no statistics)."""
        hit = [(p, path) for p, path, _ in list(self._deferred.values()) if path not in self.report.rows]
        for p, _path in hit:
            self._materialize(p)
        if hit:
            names = ", ".join(f"{path}.weight" for _, path in hit)
            raise RuntimeError(
                f"qpass: {len(hit)} deferred weights were read outside the compiled graphs ({names}): Dynamo ran "
                "their layers eagerly, on unwritten (NaN) weights, so this call's output is wrong. They hold their "
                "dequantized values now: call the model again (or load with qpass.load(dir, defer_weights=False))")

    def release_weights(self, model: nn.Module) -> int:
        """Free the fp32 storage of ``model``'s parameters that no graph compiled so far reads any
        more (the quantized linears' weights: the compiled graphs hold their own int8 copies), so
        resident weight memory drops to the low-precision weights plus what stays fp32 (embeddings,
        norms, skipped layers). Returns the bytes freed.

        Compile every input shape you will run first: a recompile needs the fp32 weights and raises
        a RuntimeError naming the released layer. Calling ``model`` itself (not the compiled
        model) afterwards raises a RuntimeError naming the layer, and so does every read of a
        released parameter's values (see ``ReleasedParameter``); ``model.qpass_released`` lists
        the released parameters. ``model`` may be the module or ``torch.compile``'s wrapper of it.
        """
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # torch.compile's wrapper
            model = model._orig_mod  # its paths; the hooks below run on every call through the wrapper
        victims: dict[int, tuple[str, nn.Parameter]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if _holds(self._superseded, p) and not _holds(self._read, p) and not _is_released(p):
                victims.setdefault(id(p), (name, p))
        if not victims:
            logger.warning("qpass release_weights: no parameter of this model is superseded by a compiled graph")
            return 0
        released, freed = [], 0
        with _nan_file(max(p.untyped_storage().nbytes() for _, p in victims.values())) as nan_path:
            for name, p in victims.values():
                if _holds_deferred(self._deferred, p):  # never written: nothing resident to free
                    del self._deferred[id(p)]
                    _DEFERRED.pop(p, None)
                    p.__class__ = nn.Parameter
                else:
                    freed += p.untyped_storage().nbytes()
                _poison(p, nan_path, name)
                released.append(name)
        owners = {name.rsplit(".", 1)[0] if "." in name else "" for name in released}
        for path, module in model.named_modules():
            if path in owners:
                _guard_released(module, path)
            holds = sorted(o for o in owners if path == "" or o == path or o.startswith(path + "."))
            if holds:  # an ancestor: refuse before touching anything, not half-way through its children
                _guard_ancestor(module, holds[0])
        model.qpass_released = tuple(released)
        # Between calls every read of a released parameter's values raises: its class becomes
        # ReleasedParameter. Dynamo's guards on the compiled graphs check the class, so each call
        # lends it back: qpass.compile's forward does, and for a plain torch.compile(model) hooks
        # on ``model`` do (a module's hooks run outside the frame Dynamo compiles).
        for _, p in victims.values():
            p.__class__ = ReleasedParameter
            self._lent.append(p)
        if getattr(model.__dict__.get("forward"), "qpass_backend", None) is not self and model not in self._lend_hooked:
            # disabled: run eagerly even where Dynamo's frame callback is active around the module call
            model.register_forward_pre_hook(torch.compiler.disable(self._lend_hook))
            model.register_forward_hook(torch.compiler.disable(self._unlend_hook), always_call=True)
            self._lend_hooked.add(model)
        logger.warning(
            "qpass: released the fp32 storage of %d parameters (%.1f MB) of %s; run the compiled model, "
            "calling the module itself now raises", len(released), freed / 2**20, type(model).__name__,
        )
        return freed


    @contextlib.contextmanager
    def lend(self):
        """Give the released parameters their ``nn.Parameter`` class for the length of one compiled
        call, whose guards check it (the graphs never read their values); re-entrant."""
        self._lend_enter()
        try:
            yield
        finally:
            self._lend_exit()

    def _lend_enter(self) -> None:
        self._lend_depth += 1
        if self._lend_depth == 1:
            for p in self._lent:
                p.__class__ = nn.Parameter
            for p, _, _ in self._deferred.values():
                p.__class__ = nn.Parameter

    def _lend_exit(self) -> None:
        self._lend_depth -= 1
        if self._lend_depth == 0:
            for p in self._lent:
                p.__class__ = ReleasedParameter
            for p, _, _ in self._deferred.values():
                p.__class__ = DeferredParameter

    def _lend_hook(self, module, args) -> None:
        if not torch.compiler.is_compiling():
            self._lend_enter()

    def _unlend_hook(self, module, args, output) -> None:
        if not torch.compiler.is_compiling():
            self._lend_exit()


def _param_key(example_inputs: list) -> tuple:
    """The memo of decisions is keyed by the weights a graph reads: a model compiled again with other
    weights under the same paths decides anew."""
    return tuple(sorted(id(v) for v in example_inputs if isinstance(v, nn.Parameter)))


class _PerParameters:
    """The compiled function Dynamo gets for one of its graphs, specialised on the identity of the
    parameters it was compiled for.

    qpass bakes the parameters' values into the rewritten graph (smoothed, quantized, packed), but
    Dynamo passes parameters as inputs and guards only their shapes: after a graph break inside a
    decoder layer it compiles that layer's frame once and runs the same graph for every layer. Each
    new set of parameters therefore gets its own rewrite and compile (once), from the same graph.
    """

    def __init__(self, backend: QPassBackend, gm: fx.GraphModule, example_inputs: list):
        self.backend, self.gm = backend, gm
        self.sources = placeholder_sources(gm)
        self.positions = [i for i, v in enumerate(example_inputs) if isinstance(v, nn.Parameter)]
        self.variants: dict[tuple, tuple[tuple, Callable]] = {}
        self._add(example_inputs)

    def _add(self, inputs) -> Callable:
        params = tuple(inputs[i] for i in self.positions)
        fn = self.backend._compile(self.gm, list(inputs), self.sources)
        self.variants[tuple(map(id, params))] = (tuple(weakref.ref(p) for p in params), fn)
        return fn

    def __call__(self, *args):
        key = tuple(id(args[i]) for i in self.positions)
        found = self.variants.get(key)
        if found is not None and all(ref() is args[i] for ref, i in zip(found[0], self.positions)):
            return found[1](*args)
        with torch.no_grad():
            fn = self._add(args)
        return fn(*args)


def _holds(refs: dict[int, weakref.ref], p: torch.Tensor) -> bool:
    ref = refs.get(id(p))
    return ref is not None and ref() is p


def _holds_deferred(deferred: dict, p: torch.Tensor) -> bool:
    entry = deferred.get(id(p))
    return entry is not None and entry[0] is p


def _is_released(p: torch.Tensor) -> bool:
    return getattr(p, "qpass_released", None) is not None


@contextlib.contextmanager
def _nan_file(nbytes: int):
    """A temporary file of ``nbytes`` of NaN, removed on exit (its private mappings stay valid)."""
    fd, path = tempfile.mkstemp(prefix="qpass-released-")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.full((nbytes // 4 + 1,), float("nan")).numpy().tofile(f)
        yield path
    finally:
        os.unlink(path)


def _poison(p: nn.Parameter, nan_path: str, name: str) -> None:
    """Drop ``p``'s fp32 storage for a private read-only-in-practice mapping of NaN pages, same
    tensor object, shape, strides and dtype (so the compiled model's guards still hold): nothing is
    resident until read, and a read gives NaN instead of freed memory (which crashed the process)."""
    nbytes = p.untyped_storage().nbytes()
    storage = torch.UntypedStorage.from_file(nan_path, shared=False, nbytes=nbytes)
    with torch.no_grad():
        p.set_(storage, p.storage_offset(), p.shape, p.stride())
    p.qpass_released = name


# What a released parameter still answers: its metadata, never its values.
_METADATA = frozenset({
    "shape", "dtype", "device", "layout", "ndim", "requires_grad", "is_leaf", "grad", "grad_fn", "names",
    "is_cuda", "is_cpu", "is_meta", "is_sparse", "is_quantized", "is_mkldnn", "is_nested", "itemsize", "nbytes",
    "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "element_size", "is_contiguous",
    "is_floating_point", "is_complex", "is_signed", "get_device", "requires_grad_", "__len__", "__hash__",
})


def _func_name(func) -> str:
    """The name of what ``__torch_function__`` was called for (a property getter: the property's)."""
    name = getattr(getattr(func, "__self__", None), "__name__", None) if func.__name__ == "__get__" else None
    return name or func.__name__


class ReleasedParameter(nn.Parameter):
    """A parameter whose fp32 storage ``QPassBackend.release_weights`` dropped, on a model compiled
    with ``qpass.compile``: its metadata (shape, dtype, device, ``numel``) still answers, and every
    read of its values (printing, arithmetic, ``float()``, ``.numpy()``, calling a function on it)
    raises a RuntimeError naming ``release_weights`` and the parameter. ``qpass_released`` holds its
    path. Each call of the model lends it the ``nn.Parameter`` class back (the compiled graphs'
    guards check the class): ``qpass.compile``'s forward, or hooks on the module given to
    ``release_weights``. (Compiled in a way that bypasses both, e.g. ``torch.compile(model.forward)``
    called directly, the guards fail and the recompile raises this error.)"""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = _func_name(func)
        if name in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        released = next(
            (a for a in (*args, *(kwargs or {}).values()) if isinstance(a, ReleasedParameter)),
            None,
        )
        where = getattr(released, "qpass_released", "a parameter")
        raise _released_error(where, f"reading its values ({name})")


#: deferred parameter -> its backend (``QPassBackend.defer_weights``)
_DEFERRED: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: What a deferred parameter answers without its values: the metadata, and what ``storage_mark``
#: reads (its storage's address and version counter).
_DEFERRED_METADATA = _METADATA | {"untyped_storage", "_version", "data_ptr", "_cdata"}


class DeferredParameter(nn.Parameter):
    """A parameter ``QPassBackend.defer_weights`` has not written yet (``qpass.load``'s quantized
    linears): its metadata answers, and the first read of its values (any function of it) writes its
    stored weight dequantized into it and makes it a plain ``nn.Parameter`` again."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if _func_name(func) not in _DEFERRED_METADATA:
            for a in (*args, *(kwargs or {}).values()):
                for t in (a if isinstance(a, (list, tuple)) else (a,)):
                    if isinstance(t, DeferredParameter) and (ref := _DEFERRED.get(t)) is not None and ref() is not None:
                        ref()._materialize(t)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _released_error(path: str, what: str) -> RuntimeError:
    return RuntimeError(
        f"qpass: the fp32 weights of {path or 'the model'} were released by QPassBackend.release_weights(); "
        f"{what} needs them: only the compiled model can run (reload the model to get them back)"
    )


def _guard_released(module: nn.Module, path: str) -> None:
    """Make every module-level way to read the freed weights raise instead of reading freed memory:
    calling the module, ``state_dict`` (so ``torch.save(model.state_dict())`` writes nothing),
    ``deepcopy``, pickling and ``.to()``/``.float()``. These are instance attributes and hooks, which
    Dynamo's guards on the compiled model do not look at (a new class would make it recompile).
    Direct tensor access to a released parameter (``layer.weight.sum()``) is not interceptable
    without changing its class, and reads freed memory: ``model.qpass_released`` lists them."""

    def forward_hook(mod, args):
        if torch.compiler.is_compiling():
            return None
        raise _released_error(path, "calling the module")

    module.register_forward_pre_hook(forward_hook)
    for param in module.parameters(recurse=False):
        _refuse_copies(param, path)


def _guard_ancestor(module: nn.Module, path: str) -> None:
    def state_dict_hook(mod, prefix, keep_vars):
        raise _released_error(path, "state_dict()")

    module.register_state_dict_pre_hook(state_dict_hook)
    _refuse_copies(module, path)
    module._apply = _refusal(path, "moving or casting the module (.to(), .float(), .cuda())")


def _refuse_copies(obj, path: str) -> None:
    obj.__deepcopy__ = _refusal(path, "deepcopy")

    def refuse_pickling(*args, **kwargs):
        _remove_file_being_saved()
        raise _released_error(path, "pickling (torch.save)")

    obj.__reduce_ex__ = refuse_pickling


def _remove_file_being_saved() -> None:
    """``torch.save(obj, path)`` creates ``path`` before it pickles ``obj``, and on an error still
    finishes the archive: a released tensor would leave a truncated file that fails to load. Called
    from inside that pickling, remove the file (the writer's handle keeps an unlinked inode)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not torch.serialization.save.__code__:
        frame = frame.f_back
    target = frame.f_locals.get("f") if frame is not None else None
    if isinstance(target, str) and os.path.isfile(target):
        os.unlink(target)


def _refusal(path: str, what: str):
    def refuse(*args, **kwargs):
        raise _released_error(path, what)
    return refuse


def backend(config: QuantConfig | str | None = None, calibration: Calibration | None = None, **kwargs) -> QPassBackend:
    """``torch.compile(model, backend=qpass.backend(config, calibration=calib))``; ``config`` may be a
    preset name (``qpass.backend("w8a8_static", calibration=calib)``)."""
    return QPassBackend(config, calibration, **kwargs)


def qpass(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """The default configuration as a plain backend function (registered as ``"qpass"``)."""
    return QPassBackend()(gm, example_inputs)
