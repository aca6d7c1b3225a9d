"""The report's summary: how many parameters, and what share of the parameter bytes, each stage
touched, and why each large parameter left in full precision stays there; and the one warning for
a graph that holds parameters but no linear."""

import logging

import torch
from torch import nn

import qpass
from tests.models import tiny_model, token_batches


def _compile(model, config, calib, *args, **kwargs):
    backend = qpass.backend(config, calibration=calib, inductor=False)
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(*args, **kwargs)
    return backend


def _line(stage, n, b, total):
    return f"  {stage + ':':<16}{n:>14,} parameters, {100 * b / total:5.1f}% of parameter bytes"


def test_summary_counts_parameters_per_stage():
    model = tiny_model("llama", layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    backend = _compile(model, qpass.preset("w8a8_dynamic"), calib, token_batches(1)[0], use_cache=False)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    layer = model.model.layers[0]
    decoder = [m.weight for m in layer.modules() if isinstance(m, nn.Linear)]  # q k v o gate up down
    norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]  # they took 1/s
    n_lin, n_norm = sum(w.numel() for w in decoder), sum(w.numel() for w in norms)
    assert (n_lin, n_norm, total) == (30_720, 128, 47_296)
    stages = backend.report.stages()
    assert sorted(stages["quantized"]) == sorted(n for n, p in params.items() if any(p is w for w in decoder))
    assert stages["lowered"] == stages["quantized"]
    assert len(stages["smoothed"]) == 9 and len(stages["full precision"]) == 5
    emb = params["model.embed_tokens.weight"].numel()
    assert backend.report.summary() == [
        "parameters of LlamaForCausalLM: 47,296 (0.18 MiB)",
        _line("smoothed", n_lin + n_norm, 4 * (n_lin + n_norm), 4 * total),
        _line("quantized", n_lin, 4 * n_lin, 4 * total),
        _line("lowered", n_lin, 4 * n_lin, 4 * total),
        _line("full precision", total - n_lin, 4 * (total - n_lin), 4 * total),
        "left in full precision (2-D and larger):",
        f"  model.embed_tokens.weight         8,192   {100 * emb / total:4.1f}%  embedding (a lookup, no matmul)",
        f"  lm_head.weight                    8,192   {100 * emb / total:4.1f}%  lm_head: skipped by config",
        "  and 3 vectors and scalars (norm weights, biases): 192 parameters, 0.4%",
    ]
    assert str(backend.report).endswith("\n".join(backend.report.summary()))


def test_summary_of_smoothing_alone_and_tied_embedding():
    """Smoothing only: nothing quantized; the tied embedding is one parameter with both readers."""
    model = tiny_model("cohere", layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    backend = _compile(model, qpass.QuantConfig(weight=None, activation=None), calib, token_batches(1)[0], use_cache=False)
    report = backend.report
    stages = report.stages()
    assert stages["quantized"] == stages["lowered"] == []
    assert len(stages["smoothed"]) == 8  # 7 linears and the one input_layernorm (parallel block)
    assert report.full_precision_reason("model.embed_tokens.weight") == (
        "embedding (a lookup, no matmul); lm_head: skipped by config")
    assert "lm_head.weight" not in report.params
    assert report.summary()[4] == _line("full precision", 39_040, 1, 1)


class _Experts(nn.Module):
    """A norm and experts stored as one 3-D parameter, run with bmm: no linear qpass can quantize."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.experts = nn.Parameter(torch.randn(4, 16, 16))

    def forward(self, x):  # x: (4, tokens, 16), one row of tokens per expert
        return torch.bmm(self.norm(x), self.experts)


def test_graph_without_linear_warns_once_naming_the_model(caplog):
    module, x = _Experts().eval(), torch.randn(4, 3, 16)
    backend = qpass.backend("w8a8_dynamic", inductor=False).bind(module)
    compiled = torch.compile(module, backend=backend, dynamic=False)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="qpass"):
        compiled(x)
        compiled(torch.randn(4, 5, 16))  # a recompile: no second warning
    warnings = [r.getMessage() for r in caplog.records if "no linear" in r.getMessage()]
    assert warnings == [
        "qpass: a compiled graph of _Experts holds 3 parameters (1,056 values) but no linear qpass can quantize "
        "(nn.Linear, F.linear, x @ W.T, addmm, fused experts' grouped matmuls); they stay in full precision: "
        "experts, norm.bias, norm.weight"
    ]
    report = backend.report
    assert report.full_precision_reason("experts") == "read by bmm (not a linear qpass quantizes)"
    assert report.summary()[-2:] == [
        "  experts         1,024   97.0%  read by bmm (not a linear qpass quantizes)",
        "  and 2 vectors and scalars (norm weights, biases): 32 parameters, 3.0%",
    ]


class _GroupedExperts(nn.Module):
    """Fused experts alone, run as transformers runs them (a grouped matmul over (E, N, K))."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 8, 16) / 4)

    def forward(self, x, offs):
        from transformers.integrations.moe import _grouped_mm

        return _grouped_mm(x, self.gate_up_proj.transpose(-2, -1), offs=offs)


def test_graph_with_fused_experts_alone_does_not_warn(caplog):
    """A graph whose only weight is a fused expert weight quantizes it: no 'no linear' warning."""
    torch.manual_seed(0)
    module, x = _GroupedExperts().eval(), torch.randn(6, 16)
    offs = torch.tensor([2, 2, 5, 6], dtype=torch.int32)
    backend = qpass.backend(qpass.preset("w8a8_dynamic", smoothing=None), inductor=False)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="qpass"):
        torch.compile(module, backend=backend, dynamic=False)(x, offs)
    assert [r.getMessage() for r in caplog.records if "no linear" in r.getMessage()] == []
    assert backend.report.stages()["quantized"] == ["gate_up_proj"]


class _EagerTail(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.tail = nn.Linear(16, 16)

    @torch.compiler.disable
    def run_tail(self, y):
        return self.tail(y)

    def forward(self, x):
        return self.run_tail(self.fc(x))


def test_parameters_in_no_graph_are_reported_as_eager():
    module, x = _EagerTail().eval(), torch.randn(2, 16)
    calib = qpass.calibrate(module, [x])
    backend = _compile(module, qpass.preset("w8a8_dynamic", skip=()), calib, x)
    report = backend.report
    assert report.stages()["quantized"] == ["fc.weight"]
    assert report.full_precision_reason("tail.weight") == (
        "in no compiled graph (Dynamo ran it eagerly, or it did not run)")
    assert report.summary()[0] == "parameters of _EagerTail: 544 (0.00 MiB)"
    assert "  tail.weight           256   47.1%  in no compiled graph (Dynamo ran it eagerly, or it did not run)" \
        in report.summary()


def test_summary_of_a_mixture_of_experts_model():
    """Fused expert weights count as quantized and lowered (oneDNN, one int8 GEMM per expert), the
    routers as full precision with why."""
    model = tiny_model("qwen2_moe")
    backend = _compile(model, "w8a8_dynamic", qpass.calibrate(model, token_batches(2)), token_batches(1)[0])
    stages = backend.report.stages()
    experts = sorted(p for p, _ in model.named_parameters() if ".experts." in p)
    assert len(experts) == 4 and set(experts) <= set(stages["quantized"]) and set(experts) <= set(stages["lowered"])
    routers = sorted(p for p, _ in model.named_parameters() if p.endswith("mlp.gate.weight"))
    assert routers and set(routers) <= set(stages["full precision"])
    assert all("router: kept in full precision" in backend.report.full_precision_reason(p) for p in routers)
