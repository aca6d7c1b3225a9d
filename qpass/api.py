"""``qpass.compile``: one call that quantizes a model's forward, so that ``model(...)`` and
``model.generate(...)`` both run through qpass, and says which linears never did.

``torch.compile(model, backend=...)`` returns a wrapper whose ``generate`` calls the uncompiled
forward; compiling ``model.forward`` in place reaches every caller of the module.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qpass.backend import QPassBackend
from qpass.calibration import Calibration, is_linear_module
from qpass.config import QuantConfig

logger = logging.getLogger(__name__)

__all__ = ["compile"]


def compile(  # noqa: A001 - qpass.compile, like torch.compile
    model: nn.Module,
    config: QuantConfig | str | None = None,
    calibration: Calibration | None = None,
    *,
    dynamic: bool | None = None,
    inductor: bool = True,
    inductor_config: Mapping[str, Any] | None = None,
    graph_constants: bool = True,
    by_block: bool = True,
    **compile_kwargs,
) -> QPassBackend:
    """Compile ``model.forward`` in place with a qpass backend and return the backend (its
    ``report``, ``graphs`` and ``release_weights``). The module keeps its identity and parameters;
    ``model.forward`` becomes the compiled forward (``del model.forward`` undoes it).
    ``dynamic`` and ``compile_kwargs`` go to ``torch.compile`` (the default ``dynamic=None`` compiles
    prefill and one decode shape, then one graph with dynamic shapes for the growing KV cache);
    ``inductor=False`` runs the rewritten graphs without Inductor (to debug a pass);
    ``inductor_config`` patches Inductor's settings while qpass's graphs compile, and
    ``graph_constants=False`` keeps qpass's tensors graph inputs in decode graphs too, and
    ``by_block=False`` compiles a prompt's graph whole instead of one decoder block at a time
    (``qpass.backend``: a cold compile about 2.5x longer, a prompt's run about 3%, or 5 ms on a short
    prompt, faster).

    Dynamo runs some frames eagerly: after a graph break inside a loop it skips the whole frame
    (a decoder's layer loop), so those layers never reach qpass. After each call, the linears that
    are in no compiled graph get one warning listing them and a report row saying so.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"qpass.compile: expected an nn.Module, got {type(model).__name__}")
    if "forward" in model.__dict__:
        raise RuntimeError("qpass.compile: this model's forward is already replaced (compiled?); `del model.forward` first")
    backend = QPassBackend(config, calibration, inductor=inductor, inductor_config=inductor_config,
                           graph_constants=graph_constants, by_block=by_block).bind(model)
    compiled = torch.compile(type(model).forward.__get__(model), backend=backend, dynamic=dynamic, **compile_kwargs)
    linears = [path for path, module in model.named_modules() if is_linear_module(module)]
    if calibration is not None:  # the linears known to run; others may be unused (a second head)
        linears = [path for path in linears if path in calibration]
    warned: set[str] = set()

    # Opaque to an outer torch.compile: transformers' generate() compiles ``model.__call__`` itself
    # on CUDA with a static cache (and wherever a CompileConfig asks for it), and an outer compile
    # would trace through this forward with its own backend, dropping qpass's. Disabled here, the
    # outer graph breaks at the call and this forward runs qpass's compiled graphs.
    @torch.compiler.disable
    @functools.wraps(type(model).forward)
    def forward(*args, **kwargs):
        with backend.lend():
            out = compiled(*args, **kwargs)
        try:  # before the coverage check adds rows for the layers that ran eagerly
            backend.check_deferred()  # a qpass.load weight still deferred in no compiled graph read NaN: raises
        finally:
            _check_coverage(backend, linears, warned)
        return out

    forward.qpass_backend = backend  # release_weights knows the model runs through ``backend.lend``
    model.forward = forward
    return backend


def _check_coverage(backend: QPassBackend, linears: list[str], warned: set[str]) -> None:
    """Warn once about the linears no compiled graph holds: Dynamo ran their frames eagerly."""
    missing = [p for p in linears if p not in backend.report.rows and p not in warned]
    if not missing:
        return
    warned.update(missing)
    for path in missing:
        row = backend.report.row(path)
        row.weight = row.activation = "fp32 (ran eagerly)"
        row.reason = "in no compiled graph: Dynamo ran its frame eagerly (or it did not run)"
    logger.warning(
        "qpass: %d linears are in no compiled graph and run eagerly in full precision (Dynamo skipped their "
        "frames, e.g. after a graph break inside a loop; TORCH_LOGS=graph_breaks says where): %s",
        len(missing), ", ".join(missing),
    )
