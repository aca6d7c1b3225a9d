"""A fold is exact only when the value scaled by 1/s reaches the consumer linearly.

Scaling up's rows by 1/s and down's columns by s is exact when up's output enters the
product once, as one factor (``act(gate) * up``); ``up * up`` or ``silu(up) * up`` are not.
Attention is linear only in its value argument: ``sdpa(q, k, v)`` lets v_proj take 1/s,
``sdpa(v, v, v)`` (v also as query or key) does not. The unsound forms must not fold, must
say why, and the smoothing-only model must still equal fp32.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpass

SMOOTH_ONLY = qpass.QuantConfig(weight=None, activation=None, skip=())


class GatedMLP(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.up, self.down = nn.Linear(16, 24), nn.Linear(24, 16)
        self.gate = nn.Linear(16, 24) if form == "silu(g)*u" else None

    def forward(self, x):
        u = self.up(x)
        if self.form == "u*u":
            return self.down(u * u)
        if self.form == "silu(u)*u":
            return self.down(F.silu(u) * u)
        return self.down(F.silu(self.gate(x)) * u)


class Attention(nn.Module):
    """``form`` names what sdpa reads as (query, key, value): ``qkv`` is the usual call."""

    def __init__(self, form: str, heads: int = 4, kv_heads: int = 4, dim: int = 32):
        super().__init__()
        self.form, self.heads, self.kv_heads, self.d = form, heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, kv_heads * self.d)
        self.v = nn.Linear(dim, kv_heads * self.d)
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        args = {"q": q, "k": k, "v": v}
        query, key, value = (args[c] for c in self.form)
        a = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=self.heads != self.kv_heads)
        return self.o(a.transpose(1, 2).reshape(b, t, -1))


def _input(dim):
    torch.manual_seed(0)
    x = torch.randn(2, 7, dim)
    x[..., 3] *= 50
    return x


def _smooth(module: nn.Module, dim: int):
    """Compile ``module`` smoothing-only; returns (relative error against fp32, report)."""
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    with torch.no_grad():  # outlier channels in the value the fold would scale, so s is far from 1
        for lin in (getattr(module, "up", None), getattr(module, "v", None)):
            if lin is not None:
                lin.weight[::5] *= 30
    module.eval()
    x = _input(dim)
    torch._dynamo.reset()
    calib = qpass.calibrate(module, [x])
    backend = qpass.backend(SMOOTH_ONLY, calibration=calib, inductor=False)
    with torch.no_grad():
        out = torch.compile(module, backend=backend, dynamic=False)(x)
        ref = module(x)
    return ((out - ref).norm() / ref.norm()).item(), backend.report


UNSOUND = [  # module, input width, consumer, pattern it must not fold as, why (in the report)
    (GatedMLP("u*u"), 16, "down", "gated-act", "cannot fold into up: mul (mul) reads scaled values as argument 0, argument 1; it is linear only in one factor"),
    (GatedMLP("silu(u)*u"), 16, "down", "gated-act", "cannot fold into up: u is also read by silu"),
    (Attention("vvv"), 32, "o", "linear-linear", "cannot fold into v: scaled_dot_product_attention (a) reads scaled values as query, key, value; it is linear only in value"),
    (Attention("qvv"), 32, "o", "linear-linear", "cannot fold into v: scaled_dot_product_attention (a) reads scaled values as key, value"),
    (Attention("vkv"), 32, "o", "linear-linear", "cannot fold into v: scaled_dot_product_attention (a) reads scaled values as query, value"),
]


@pytest.mark.parametrize(
    "module,dim,consumer,kind,why", UNSOUND, ids=["down(u*u)", "down(silu(u)*u)", "sdpa(v,v,v)", "sdpa(q,v,v)", "sdpa(v,k,v)"]
)
def test_nonlinear_use_refuses_fold(module, dim, consumer, kind, why):
    err, report = _smooth(module, dim)
    assert err <= 1e-5
    assert report.counts()[kind] == 0
    row = report.rows[consumer]
    assert row.smoothing == "multiply"
    assert why in row.reason, row.reason


@pytest.mark.parametrize(
    "module,dim,expected",
    [
        (GatedMLP("silu(g)*u"), 16, {"gated-act": 1, "multiply": 1}),
        (Attention("qkv"), 32, {"linear-linear": 1, "multiply": 1}),
        (Attention("qkv", heads=4, kv_heads=2), 32, {"linear-linear": 1, "multiply": 1}),
    ],
    ids=["down(silu(g)*u)", "sdpa(q,k,v)", "gqa"],
)
def test_linear_use_folds(module, dim, expected):
    err, report = _smooth(module, dim)
    assert err <= 1e-5
    assert dict(report.counts()) == expected
