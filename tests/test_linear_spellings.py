"""Linears in the spellings test_patterns.py does not cover: ``addmm`` (GPT-2's Conv1D, written by
hand or with the weight transposed in the graph) and ``nn.Linear`` subclasses. Each is matched,
smoothed, quantized and lowered exactly as the nn.Linear it stands for."""

import copy
import dataclasses
import re

import pytest
import torch
from torch import nn

import qpass
from tests.test_patterns import FusedQKV, GeGLU, LayerNormMLP, _input, _smooth_spelled

SPELLINGS = ("addmm(b, x2d, W), W (in, out)", "addmm(b, x2d, W.t())", "nn.Linear subclass", "nn.Linear subclass, own forward")


class AddmmLinear(nn.Module):
    """``linear``'s function as GPT-2's Conv1D computes it: ``addmm`` on a 2-D view."""

    def __init__(self, linear: nn.Linear, transposed_in_graph: bool):
        super().__init__()
        self.transposed_in_graph = transposed_in_graph
        w = linear.weight.detach().clone()
        self.weight = nn.Parameter(w if transposed_in_graph else w.t().contiguous())
        b = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(w.shape[0])
        self.bias = nn.Parameter(b)

    def forward(self, x):
        w = self.weight.t() if self.transposed_in_graph else self.weight
        y = torch.addmm(self.bias, x.view(-1, x.shape[-1]), w)
        return y.view(*x.shape[:-1], y.shape[-1])


class SubLinear(nn.Linear):
    """An nn.Linear subclass that only adds state (as quantization-aware or adapter layers do)."""

    tag = "subclass"


class OwnForwardLinear(nn.Linear):
    """An nn.Linear subclass with its own forward that calls the functional linear."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _respell(linear: nn.Linear, spelling: str) -> nn.Module:
    if spelling.startswith("addmm"):
        return AddmmLinear(linear, transposed_in_graph=spelling.endswith("W.t())"))
    cls = SubLinear if spelling == "nn.Linear subclass" else OwnForwardLinear
    new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
    new.load_state_dict(linear.state_dict())
    return new


def spelled(module: nn.Module, spelling: str) -> nn.Module:
    out = copy.deepcopy(module)
    for path, lin in [(p, m) for p, m in out.named_modules() if type(m) is nn.Linear]:
        parent, _, name = path.rpartition(".")
        setattr(out.get_submodule(parent), name, _respell(lin, spelling))
    return out


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("make", [LayerNormMLP, GeGLU, FusedQKV, qpass.patterns.linear_linear.Example],
                         ids=["layernorm-mlp", "geglu", "fused-qkv", "gqa"])
def test_spelled_linears_fold_like_nn_linear(make, spelling):
    """Same folds, same report rows, exact (<=1e-5), and the spelled module calibrates by itself."""
    torch.manual_seed(0)
    module = make().eval()
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    x = _input(32 if make is qpass.patterns.linear_linear.Example else 16)
    twin = spelled(module, spelling)
    calib, twin_calib = qpass.calibrate(module, [x]), qpass.calibrate(twin, [x])
    assert set(twin_calib) == set(calib)
    expected = _smooth_spelled(module, x, calib)
    report = _smooth_spelled(twin, x, twin_calib)
    assert report.counts() == expected.counts()
    assert {p: (r.smoothing, r.absorber, r.reason) for p, r in report.rows.items()} == {
        p: (r.smoothing, r.absorber, r.reason) for p, r in expected.rows.items()}


def _unfused(rows: dict) -> dict:
    return {p: dataclasses.replace(r, reason=re.sub(r"(; )?one GEMM with .*? \(same input\)", "", r.reason))
            for p, r in rows.items()}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_spelled_linears_quantize_and_lower_like_nn_linear(spelling):
    """Biased q/k/v/o in ``spelling``: w8a8_dynamic quantizes and lowers each like nn.Linear, same logits."""
    torch.manual_seed(0)
    module = qpass.patterns.linear_linear.Example().eval()
    x = _input(32)
    calib = qpass.calibrate(module, [x])
    outs, reports = [], []
    for m in (module, spelled(module, spelling)):
        torch._dynamo.reset()
        backend = qpass.backend(qpass.preset("w8a8_dynamic", skip=()), calibration=calib)
        with torch.no_grad():
            outs.append(torch.compile(m, backend=backend, dynamic=False)(x))
        reports.append(backend.report)
    # the rows agree except for the shared-input fusion note: the addmm spellings each read their own
    # 2-D view of the input, so their q/k/v run as three GEMMs where nn.Linear's run as one
    assert _unfused(reports[1].rows) == _unfused(reports[0].rows)
    assert all(r.kernel and not r.kernel.startswith("reference") and r.weight.startswith("int8")
               for r in reports[1].rows.values()), str(reports[1])
    assert ((outs[1] - outs[0]).norm() / outs[0].norm()).item() <= 1e-5
