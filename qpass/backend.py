"""The torch.compile backend: capture -> smooth -> quantize -> lower -> Inductor.

``PIPELINE`` is the one place that states the order of the passes.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from torch import fx, nn

from qpass.calibration import Calibration
from qpass.config import QuantConfig
from qpass.graph import QGraph
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
)


class QPassBackend:
    """A torch.compile backend with a fixed configuration and calibration.

    ``report`` accumulates one row per linear over every graph compiled;
    ``graphs`` keeps the rewritten FX graphs for inspection. ``inductor=False``
    runs the rewritten graph eagerly (useful to debug a pass).
    """

    def __init__(self, config: QuantConfig | None = None, calibration: Calibration | None = None, *, inductor: bool = True):
        self.config = config if config is not None else QuantConfig()
        if calibration is not None and not isinstance(calibration, Calibration):
            raise TypeError(f"qpass.backend: calibration must be a qpass.Calibration, got {type(calibration).__name__}")
        self.calibration = calibration
        self.inductor = inductor
        self.report = Report()
        self.graphs: list[fx.GraphModule] = []
        # Parameters the compiled graphs read / no longer read (the lowered linears hold their own
        # low-precision copies), for ``release_weights``: id -> weak reference.
        self._read: dict[int, weakref.ref] = {}
        self._superseded: dict[int, weakref.ref] = {}
        if calibration is None and self.config.smoothing is not None:
            logger.warning("qpass: no calibration given; smoothing is off (pass calibration=qpass.calibrate(...))")

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        qg = QGraph(gm, example_inputs)
        self.report.graphs += 1
        for name, run in PIPELINE:
            if name == "smooth" and self.calibration is None:
                continue
            n = run(qg, self.config, self.calibration, self.report)
            logger.info("qpass %s: %d linears rewritten", name, n)
        new_gm = qg.build()
        self.graphs.append(new_gm)
        for node, (_path, param) in qg.params.items():
            (self._read if node.users else self._superseded)[id(param)] = weakref.ref(param)
        if not self.inductor:
            return new_gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(new_gm, example_inputs)


    def release_weights(self, model: nn.Module) -> int:
        """Free the fp32 storage of ``model``'s parameters that no graph compiled so far reads any
        more (the quantized linears' weights: the compiled graphs hold their own int8 copies), so
        resident weight memory drops to the low-precision weights plus what stays fp32 (embeddings,
        norms, skipped layers). Returns the bytes freed.

        Compile every input shape you will run first: a recompile needs the fp32 weights and raises
        a RuntimeError naming the released layer. Calling ``model`` itself (not the compiled
        model) afterwards raises a RuntimeError naming the layer; ``model.qpass_released`` lists
        the released parameters.
        """
        released, freed = [], 0
        for name, p in model.named_parameters(remove_duplicate=False):
            if not _holds(self._superseded, p) or _holds(self._read, p) or _is_released(p):
                continue
            freed += p.untyped_storage().nbytes()
            p.untyped_storage().resize_(0)
            released.append(name)
        if not released:
            logger.warning("qpass release_weights: no parameter of this model is superseded by a compiled graph")
            return 0
        owners = {name.rsplit(".", 1)[0] if "." in name else "" for name in released}
        for path, module in model.named_modules():
            if path in owners:
                module.register_forward_pre_hook(_released_hook(path))
        model.qpass_released = tuple(released)
        logger.warning(
            "qpass: released the fp32 storage of %d parameters (%.1f MB) of %s; run the compiled model, "
            "calling the module itself now raises", len(released), freed / 2**20, type(model).__name__,
        )
        return freed


def _holds(refs: dict[int, weakref.ref], p: torch.Tensor) -> bool:
    ref = refs.get(id(p))
    return ref is not None and ref() is p


def _is_released(p: torch.Tensor) -> bool:
    return p.numel() > 0 and p.untyped_storage().nbytes() == 0


def _released_hook(path: str):
    def hook(module, args):
        if torch.compiler.is_compiling():
            return None
        raise RuntimeError(
            f"qpass: the fp32 weights of {path or 'the model'} were released by QPassBackend.release_weights(); "
            "only the compiled model can run"
        )
    return hook


def backend(config: QuantConfig | None = None, calibration: Calibration | None = None, **kwargs) -> QPassBackend:
    """``torch.compile(model, backend=qpass.backend(config, calibration=calib))``."""
    return QPassBackend(config, calibration, **kwargs)


def qpass(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """The default configuration as a plain backend function (registered as ``"qpass"``)."""
    return QPassBackend()(gm, example_inputs)
