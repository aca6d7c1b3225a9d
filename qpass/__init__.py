"""qpass: torch.fx / torch.compile passes that run LLMs in W8A8 without losing accuracy.

    calib = qpass.calibrate(model, batches)
    compiled = torch.compile(model, backend=qpass.backend(qpass.QuantConfig(), calibration=calib))
"""

from qpass.api import compile
from qpass.backend import PIPELINE, DeferredParameter, QPassBackend, ReleasedParameter, backend, qpass
from qpass.calibration import Calibration, CalibrationFileError, ChannelStats, calibrate
from qpass.config import (
    AdaDim,
    IntegerOnly,
    OutlierSplit,
    PerGroup,
    PerInputChannel,
    PerInputChannelGroup,
    PerOutputChannel,
    PerTensor,
    PerToken,
    QuantConfig,
    QuantSpec,
    Smoothing,
)
from qpass.presets import PRESETS, preset
from qpass.printer import format_graph
from qpass.report import Report
from qpass.load import load
from qpass.save import save

__all__ = [
    "compile", "PIPELINE", "QPassBackend", "ReleasedParameter", "DeferredParameter", "backend", "qpass", "Calibration", "CalibrationFileError", "ChannelStats", "calibrate",
    "AdaDim", "IntegerOnly", "OutlierSplit", "PerGroup", "PerInputChannel", "PerInputChannelGroup", "PerOutputChannel", "PerTensor", "PerToken",
    "QuantConfig", "QuantSpec", "Smoothing", "format_graph", "Report", "PRESETS", "preset", "save", "load",
]
