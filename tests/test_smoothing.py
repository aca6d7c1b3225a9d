"""Smoothing without quantization computes the same function, on every architecture."""

import pytest
import torch

import qpass
from tests.models import ARCHS, tiny_model, token_batches

SMOOTH_ONLY = qpass.QuantConfig(weight=None, activation=None)

# Folded patterns per 2-layer model (use_cache=False, lm_head skipped).
EXPECTED = {
    "llama": {"linear-norm": 4, "linear-linear": 2, "gated-act": 2},
    "mistral": {"linear-norm": 4, "linear-linear": 2, "gated-act": 2},
    "qwen2": {"linear-norm": 4, "linear-linear": 2, "gated-act": 2},
    "phi3": {"linear-norm": 4, "linear-linear": 2, "gated-act": 2},  # fused qkv_proj and gate_up_proj
    "gemma": {"linear-norm": 4, "linear-linear": 2, "gated-act": 2},  # (1 + w) RMSNorm, GELU-tanh
    "opt": {"linear-norm": 4, "linear-linear": 2, "relu-act": 2},  # fc1 -> relu -> fc2: fc1's rows take 1/s
    "gpt2": {"linear-norm": 4, "linear-linear": 2, "multiply": 2},  # Conv1D as addmm, fused c_attn, gelu
}


def _rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("arch", ARCHS)
def test_smoothed_model_equals_fp32(arch):
    model = tiny_model(arch)
    calib = qpass.calibrate(model, token_batches(3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    backend = qpass.backend(SMOOTH_ONLY, calibration=calib)
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
    assert _rel_err(out, ref) <= 1e-5
    assert dict(backend.report.counts()) == EXPECTED[arch]
    # every linear but lm_head was smoothed, with real scales (not all ones)
    smoothed = [r for r in backend.report.rows.values() if r.smoothing not in ("", "none")]
    assert len(smoothed) == len(backend.report.rows) - 1
    assert backend.report.rows["lm_head"].reason == "skipped by config"
    # the user's weights are untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_smoothing_reduces_outliers():
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(3))
    backend = qpass.backend(SMOOTH_ONLY, calibration=calib, inductor=False)
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(token_batches(1)[0], use_cache=False)
    row = backend.report.rows["model.layers.0.self_attn.q_proj"]
    before, after = row.outlier_ratio
    assert before > 5 and after < before / 2


def test_kv_cache_output_blocks_v_to_o_fold():
    """With use_cache=True the values leave the graph: folding into v_proj would change
    the returned cache, so o_proj is smoothed by an inserted multiply instead."""
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(2))
    backend = qpass.backend(SMOOTH_ONLY, calibration=calib)
    ids = token_batches(1, seed=3)[0]
    with torch.no_grad():
        ref = model(ids)
        out = torch.compile(model, backend=backend, dynamic=False)(ids)
    assert _rel_err(out.logits, ref.logits) <= 1e-5
    for layer_ref, layer_out in zip(ref.past_key_values.layers, out.past_key_values.layers):
        torch.testing.assert_close(layer_out.values, layer_ref.values)
    counts = backend.report.counts()
    assert counts["linear-linear"] == 0 and counts["multiply"] == 2
    assert "graph output" in backend.report.rows["model.layers.0.self_attn.o_proj"].reason


def test_fallback_skip_leaves_unabsorbable_linears_alone():
    model = tiny_model("gpt_bigcode")  # c_fc -> gelu -> c_proj: gelu(x / s) != gelu(x) / s
    calib = qpass.calibrate(model, token_batches(2))
    config = SMOOTH_ONLY.replace(smoothing=qpass.Smoothing(fallback="skip"))
    backend = qpass.backend(config, calibration=calib, inductor=False)
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(token_batches(1)[0], use_cache=False)
    row = backend.report.rows["transformer.h.0.mlp.c_proj"]
    assert row.smoothing == "none" and "it reads gelu" in row.reason
    assert "multiply" not in backend.report.counts()


def test_skipped_consumer_blocks_shared_fold():
    """If one reader of a norm is skipped, the norm cannot take 1/s; the others get a multiply."""
    model = tiny_model("llama", layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    config = SMOOTH_ONLY.replace(skip=("lm_head", "*.k_proj"))
    backend = qpass.backend(config, calibration=calib)
    ids = token_batches(1)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
    assert _rel_err(out, ref) <= 1e-5
    rows = backend.report.rows
    assert rows["model.layers.0.self_attn.k_proj"].smoothing == "none"
    assert rows["model.layers.0.self_attn.q_proj"].smoothing == "multiply"
    assert "also read by linear" in rows["model.layers.0.self_attn.q_proj"].reason


def test_missing_statistics_fall_back_with_warning(caplog):
    model = tiny_model("llama", layers=1)
    calib = qpass.calibrate(model, token_batches(1))
    partial = qpass.Calibration({k: v for k, v in calib.items() if not k.endswith("down_proj")})
    backend = qpass.backend(SMOOTH_ONLY, calibration=partial, inductor=False)
    with torch.no_grad(), caplog.at_level("WARNING"):
        torch.compile(model, backend=backend, dynamic=False)(token_batches(1)[0], use_cache=False)
    assert (
        "qpass: 1 of 7 linears have unusable calibration statistics (not smoothed): no calibration statistics "
        "(the layer did not run during calibration): model.layers.0.mlp.down_proj"
    ) in caplog.text
    assert backend.report.rows["model.layers.0.mlp.down_proj"].smoothing == "none"
    assert backend.report.counts()["gated-act"] == 0


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_smoothing_scales_formula(alpha):
    from qpass.passes.smooth import smoothing_scales

    a = torch.tensor([4.0, 1.0, 0.0, float("inf"), 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 1.0, 0.0])
    s = smoothing_scales(a, w, alpha)
    assert s[0] == pytest.approx(4.0**alpha / 1.0 ** (1 - alpha))
    assert s[1] == pytest.approx(1.0 / 4.0 ** (1 - alpha))
    assert s[2:].tolist() == [1.0, 1.0, 1.0]  # zero activation, inf activation, zero weight: no scaling


def test_dynamic_shapes_recompile_and_stay_exact():
    """A second sequence length recompiles with symbolic shapes; the passes still apply (eagerly:
    ``tests/test_blocks.py`` compiles a dynamic-shape prompt graph through Inductor)."""
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(2))
    backend = qpass.backend(qpass.preset("w8a8_dynamic", lower=False), calibration=calib, inductor=False)
    smooth_only = qpass.backend(SMOOTH_ONLY, calibration=calib, inductor=False)
    compiled = torch.compile(model, backend=smooth_only)
    with torch.no_grad():
        for seq in (8, 13, 21):
            ids = token_batches(1, seq=seq, seed=seq)[0]
            ref = model(ids, use_cache=False).logits
            assert _rel_err(compiled(ids, use_cache=False).logits, ref) <= 1e-5
    assert smooth_only.report.graphs == 2  # static first, then one dynamic graph
    assert smooth_only.report.counts()["linear-linear"] == 2
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for seq in (8, 13):
            ids = token_batches(1, seq=seq, seed=seq)[0]
            ref = model(ids, use_cache=False).logits
            assert _rel_err(compiled(ids, use_cache=False).logits, ref) <= 0.05
