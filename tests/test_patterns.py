"""Pattern coverage on small hand-written modules: each fold is exact and named."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpass

SMOOTH_ONLY = qpass.QuantConfig(weight=None, activation=None, skip=())


class FunctionalRMSNorm(nn.Module):
    def __init__(self, affine=True):
        super().__init__()
        self.w = nn.Parameter(torch.rand(16) + 0.5) if affine else None
        self.q, self.k = nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x):
        y = F.rms_norm(x, (16,), self.w, 1e-6)
        return self.q(y) * self.k(y)


class LayerNormMLP(nn.Module):
    def __init__(self, **ln_kwargs):
        super().__init__()
        self.ln = nn.LayerNorm(16, **ln_kwargs)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.ln(x))))


class GeGLU(nn.Module):
    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = approximate
        self.gate, self.up, self.down = nn.Linear(16, 24), nn.Linear(16, 24), nn.Linear(24, 16)

    def forward(self, x):
        return self.down(F.gelu(self.gate(x), approximate=self.approximate) * self.up(x))


class FusedQKV(nn.Module):
    """Fused qkv projection, multi-head attention, output projection, with dropout and a cast."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, self.d).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = F.dropout(a.transpose(1, 2).reshape(b, t, c).float(), p=0.1, training=self.training)
        return self.out(a)


class Residual(nn.Module):
    """The norm output is also added to the residual: no fold into the norm."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        y = self.ln(x)
        return self.fc(y) + y


def _compile(module, x):
    torch._dynamo.reset()
    calib = qpass.calibrate(module, [x])
    backend = qpass.backend(SMOOTH_ONLY, calibration=calib, inductor=False)
    with torch.no_grad():
        out = torch.compile(module, backend=backend, dynamic=False)(x)
        ref = module(x)
        assert ((out - ref).norm() / ref.norm()).item() <= 1e-6
    return backend.report


def _input(dim=16):
    torch.manual_seed(0)
    x = torch.randn(2, 7, dim)
    x[..., 3] *= 50
    return x


@pytest.mark.parametrize(
    "module,expected",
    [
        (FunctionalRMSNorm(), {"linear-norm": 1}),
        (FunctionalRMSNorm(affine=False), {"linear-norm": 1}),
        (LayerNormMLP(), {"linear-norm": 1, "multiply": 1}),
        (LayerNormMLP(bias=False), {"linear-norm": 1, "multiply": 1}),
        (LayerNormMLP(elementwise_affine=False), {"linear-norm": 1, "multiply": 1}),
        (GeGLU(), {"gated-act": 1, "multiply": 1}),
        (GeGLU("tanh"), {"gated-act": 1, "multiply": 1}),
        (FusedQKV(), {"linear-norm": 1, "linear-linear": 1}),
    ],
    ids=["rms_norm", "rms_norm-no-weight", "layernorm", "layernorm-no-bias", "layernorm-no-affine", "geglu", "geglu-tanh", "fused-qkv"],
)
def test_pattern_folds_exactly(module, expected):
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    report = _compile(module.eval(), _input())
    assert dict(report.counts()) == expected


def test_residual_reader_blocks_norm_fold():
    report = _compile(Residual().eval(), _input())
    row = report.rows["fc"]
    assert row.smoothing == "multiply" and "also read by add" in row.reason
