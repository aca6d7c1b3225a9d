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
        (LayerNormMLP(), {"linear-norm": 1, "relu-act": 1}),
        (LayerNormMLP(bias=False), {"linear-norm": 1, "relu-act": 1}),
        (LayerNormMLP(elementwise_affine=False), {"linear-norm": 1, "relu-act": 1}),
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


# -- linears spelled as a matmul ---------------------------------------------------------------
SPELLINGS = ("x @ W.T + b", "b + matmul(x, W.t())", "x.matmul(W.transpose(0, 1))", "F.linear", "x @ W, W (in, out)")


class MatmulLinear(nn.Module):
    """``linear``'s function, written without nn.Linear in one of ``SPELLINGS``."""

    def __init__(self, linear: nn.Linear, spelling: str):
        super().__init__()
        self.spelling = spelling
        w = linear.weight.detach().clone()
        self.weight = nn.Parameter(w.t().contiguous() if spelling == "x @ W, W (in, out)" else w)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        if self.spelling == "F.linear":
            return torch.nn.functional.linear(x, self.weight, self.bias)
        if self.spelling == "x @ W.T + b":
            y = x @ self.weight.T
        elif self.spelling == "b + matmul(x, W.t())":
            y = torch.matmul(x, self.weight.t())
            return y if self.bias is None else self.bias + y
        elif self.spelling == "x.matmul(W.transpose(0, 1))":
            y = x.matmul(self.weight.transpose(0, 1))
        else:
            y = x @ self.weight
        return y if self.bias is None else y + self.bias


def matmul_spelled(module: nn.Module, spelling: str) -> nn.Module:
    """A copy of ``module`` whose every nn.Linear is a ``MatmulLinear`` with the same weights."""
    import copy

    out = copy.deepcopy(module)
    for path, lin in [(p, m) for p, m in out.named_modules() if isinstance(m, nn.Linear)]:
        parent, _, name = path.rpartition(".")
        setattr(out.get_submodule(parent), name, MatmulLinear(lin, spelling))
    return out


def _smooth_spelled(module, x, calib):
    torch._dynamo.reset()
    backend = qpass.backend(SMOOTH_ONLY, calibration=calib, inductor=False)
    with torch.no_grad():
        out = torch.compile(module, backend=backend, dynamic=False)(x)
        ref = module(x)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    return backend.report


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("make", [LayerNormMLP, GeGLU, FusedQKV, qpass.patterns.linear_linear.Example],
                         ids=["layernorm-mlp", "geglu", "fused-qkv", "gqa"])
def test_matmul_spelled_linears_fold_like_nn_linear(make, spelling):
    """Every spelling is a linear: the same folds, exact, as with nn.Linear (biases folded too).
    qpass.calibrate records nn.Linear inputs only: the nn.Linear twin's calibration (same paths,
    same inputs) stands in for the spelled module's."""
    torch.manual_seed(0)
    module = make().eval()
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    x = _input(32 if make is qpass.patterns.linear_linear.Example else 16)
    calib = qpass.calibrate(module, [x])
    expected = _smooth_spelled(module, x, calib)
    report = _smooth_spelled(matmul_spelled(module, spelling), x, calib)
    assert report.counts() == expected.counts()
    assert {p: (r.smoothing, r.absorber, r.reason) for p, r in report.rows.items()} == {
        p: (r.smoothing, r.absorber, r.reason) for p, r in expected.rows.items()}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_matmul_spelled_linears_quantize_like_nn_linear(spelling):
    """Biased q/k/v/o as ``spelling``: w8a8_dynamic quantizes and lowers each like nn.Linear."""
    torch.manual_seed(0)
    module = qpass.patterns.linear_linear.Example().eval()
    x = _input(32)
    calib = qpass.calibrate(module, [x])
    outs, reports = [], []
    for m in (module, matmul_spelled(module, spelling)):
        torch._dynamo.reset()
        backend = qpass.backend(qpass.preset("w8a8_dynamic", skip=()), calibration=calib)
        with torch.no_grad():
            outs.append(torch.compile(m, backend=backend, dynamic=False)(x))
        reports.append(backend.report)
    assert reports[1].rows == reports[0].rows
    assert all(r.kernel and r.weight.startswith("int8") for r in reports[1].rows.values())
    assert ((outs[1] - outs[0]).norm() / outs[0].norm()).item() <= 1e-5


def _llama_and_matmul_twin():
    """A tiny Llama and a copy whose q/k/v/o/gate/up/down are ``MatmulLinear``s (spellings mixed)."""
    from tests.models import tiny_model

    model = tiny_model("llama")
    spelled = tiny_model("llama")
    for i, layer in enumerate(spelled.model.layers):
        for mod in (layer.self_attn, layer.mlp):
            for name, child in list(mod.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(mod, name, MatmulLinear(child, SPELLINGS[(i + len(name)) % len(SPELLINGS)]))
    return model, spelled


def test_matmul_spelled_llama_quantizes_like_nn_linear():
    """A tiny Llama whose q/k/v/o/gate/up/down compute ``x @ W.T``: w8a8_dynamic gives the same
    report (every linear smoothed, quantized and lowered the same way) and the same logits. The
    lowered graphs run eagerly (the same kernel ops; which kernel a linear gets does not depend on
    Inductor)."""
    from tests.models import token_batches

    model, spelled = _llama_and_matmul_twin()
    calib = qpass.calibrate(model, token_batches(2))
    ids = token_batches(1, seed=7)[0]
    logits, reports = [], []
    for m in (model, spelled):
        torch._dynamo.reset()
        backend = qpass.backend("w8a8_dynamic", calibration=calib, inductor=False)
        with torch.no_grad():
            logits.append(torch.compile(m, backend=backend, dynamic=False)(ids, use_cache=False).logits)
        reports.append(backend.report)
    assert reports[1].rows == reports[0].rows
    assert all(r.kernel and r.weight for p, r in reports[1].rows.items() if p != "lm_head")
    assert ((logits[1] - logits[0]).norm() / logits[0].norm()).item() <= 1e-4
    with torch.no_grad():
        ref = spelled(ids, use_cache=False).logits
    assert ((logits[1] - ref).norm() / ref.norm()).item() <= 0.05


def test_calibrate_records_linears_written_as_matmul():
    """``qpass.calibrate`` records a hand-written linear (a leaf module with a 2-D weight whose input
    width fits it) as it records nn.Linear: the matmul-spelled Llama gets the statistics of its
    nn.Linear twin, so smoothing and static scales need no twin."""
    from tests.models import token_batches

    model, spelled = _llama_and_matmul_twin()
    calib = qpass.calibrate(model, token_batches(2))
    spelled_calib = qpass.calibrate(spelled, token_batches(2))
    assert set(spelled_calib) == set(calib)  # 14 decoder linears and lm_head; not the embedding
    for path in calib:
        torch.testing.assert_close(spelled_calib[path].absmax, calib[path].absmax, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    backend = qpass.backend("w8a8_static", calibration=spelled_calib, inductor=False)
    with torch.no_grad():
        torch.compile(spelled, backend=backend, dynamic=False)(token_batches(1)[0], use_cache=False)
    rows = backend.report.rows
    assert all(not r.calibration for r in rows.values()), str(backend.report)
    assert sum(r.smoothing not in ("", "none") for r in rows.values()) == 14, str(backend.report)
