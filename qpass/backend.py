"""The torch.compile backend: capture -> smooth -> quantize -> lower -> Inductor.

``PIPELINE`` is the one place that states the order of the passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import fx

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
        if not self.inductor:
            return new_gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(new_gm, example_inputs)


def backend(config: QuantConfig | None = None, calibration: Calibration | None = None, **kwargs) -> QPassBackend:
    """``torch.compile(model, backend=qpass.backend(config, calibration=calib))``."""
    return QPassBackend(config, calibration, **kwargs)


def qpass(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """The default configuration as a plain backend function (registered as ``"qpass"``)."""
    return QPassBackend()(gm, example_inputs)
