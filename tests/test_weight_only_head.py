"""``QuantConfig.weight_only``: a W8A8 model's ``lm_head`` (which the presets skip) stored as int8
weights with float activations, run at one token as a reduction over the stored integers, saved and
reloaded, its embedding's tie included."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch

import qpass
from qpass import qmath
from qpass.graph import constants
from qpass.passes import lower as lowering
from tests.models import token_batches

RED = lowering.KERNELS["cpu_wo_reduction"].label
CONFIG = qpass.preset("w8a8_dynamic", weight_only=("lm_head",))
needs_ct = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                              reason="pip install compressed-tensors (the checkpoint format)")


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tied():
    """A one-layer Llama whose lm_head is its embedding (as SmolLM2's)."""
    import transformers

    from tests.models import _config

    config = _config("llama", 1)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, qpass.calibrate(model, token_batches(2))


def _logits(model, config, calib, ids, *, inductor=False):
    torch._dynamo.reset()
    backend = qpass.backend(config, calibration=calib, inductor=inductor)
    with torch.no_grad():
        return torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits, backend


def test_config_weight_only_wins_over_skip_and_is_validated():
    assert CONFIG.skip == ("lm_head",) and not CONFIG.skips("lm_head") and CONFIG.quantizes_weight_only("lm_head")
    assert CONFIG.skips("model.layers.0.mlp.down_proj") is False and not CONFIG.quantizes_weight_only("model.norm")
    with pytest.raises(TypeError, match="QuantConfig.weight_only must be a tuple of module paths, got 'lm_head'"):
        qpass.preset("w8a8_dynamic", weight_only="lm_head")
    with pytest.raises(ValueError, match="QuantConfig.weight_only: the config quantizes no weights"):
        qpass.QuantConfig(weight=None, activation=None, weight_only=("lm_head",))
    with pytest.raises(ValueError, match="integer-only region has no float activations"):
        qpass.preset("illm_w8a8", weight_only=("lm_head",))


def test_lm_head_weight_only_int8_at_decode_is_a_reduction(tied):
    """One token: the lm_head reads int8 weights inside Inductor's reduction, the decoder's linears
    keep their int8 kernels; the logits are those of the model whose lm_head weight is the int8
    weight dequantized (fp32 activations: only the weight's rounding), to summation order. At 8
    tokens the reference path (dequantize, then the float linear) gives the same."""
    model, calib = tied
    ids = token_batches(1, batch=1, seq=8, seed=3)[0]
    w = model.lm_head.weight.detach().clone()
    qw = qmath.quantize_weight(w, CONFIG.weight)
    plain = qpass.preset("w8a8_dynamic")
    for seq, kernel in ((1, RED), (8, "reference (weight-only with float32 activations")):
        x = ids[:, :seq]
        ours, backend = _logits(model, CONFIG, calib, x, inductor=True)
        theirs, base = _logits(model, plain, calib, x, inductor=True)
        row = backend.report.rows["lm_head"]
        assert (row.weight, row.activation, row.smoothing) == ("int8 per-output-channel", "fp32", "none")
        assert row.kernel.startswith(kernel) and "weight-only (QuantConfig.weight_only)" in row.reason
        for path, r in base.report.rows.items():  # the decoder as without the option
            if path != "lm_head":
                assert backend.report.rows[path].kernel == r.kernel and backend.report.rows[path].alpha == r.alpha
        # the same decoder output through the fp32 lm_head and through the int8 one, in float64
        hidden = {}
        handle = model.lm_head.register_forward_hook(lambda m, a, out: hidden.setdefault("x", a[0]))
        try:
            with torch.no_grad():
                model(x, use_cache=False)
        finally:
            handle.remove()
        assert _rel(ours, theirs) < 0.05  # the decoder's quantization is the same; the head's weight moved
        with torch.no_grad():
            exact = hidden["x"].double() @ qw.dequantize().double().T
            fp32_head = hidden["x"].double() @ w.double().T
        # ours - theirs is the head's weight rounding alone: compare it with what it must be
        assert _rel((ours - theirs).double(), (exact - fp32_head)) < 0.2
    assert model.lm_head.weight is model.model.embed_tokens.weight and torch.equal(model.lm_head.weight, w)


@needs_ct
def test_saved_weight_only_lm_head_reloads_and_loads_in_transformers(tied, tmp_path, caplog):
    """The tied lm_head saved as int8 weights without input activations (its own config group), the
    tie dropped in config.json; ``qpass.load`` gives the original compiled model's logits; transformers
    loads it too."""
    import transformers
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    model, calib = tied
    ids = token_batches(1, batch=1, seq=8, seed=3)[0]
    with caplog.at_level(logging.INFO, logger="qpass.save"):
        qpass.save(model, CONFIG, tmp_path, calibration=calib)
    assert any("lm_head quantized apart from the embedding" in r.getMessage() for r in caplog.records)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    qc = cfg["quantization_config"]
    QuantizationConfig.model_validate(qc)
    head = [g for g in qc["config_groups"].values() if "lm_head" in g["targets"]]
    assert len(head) == 1 and head[0]["input_activations"] is None and head[0]["weights"]["num_bits"] == 8
    assert qc["ignore"] == []
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.int8
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32

    ours, _ = _logits(model, CONFIG, calib, ids)
    torch._dynamo.reset()
    reloaded, backend = qpass.load(tmp_path, inductor=False, dynamic=False)
    assert backend.config.weight_only == ("lm_head",) and backend.config.activation is not None
    with torch.no_grad():
        again = reloaded(ids, use_cache=False).logits
    assert _rel(again, ours) <= 1e-6
    assert backend.report.rows["lm_head"].activation == "fp32"
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)(ids, use_cache=False).logits
    assert _rel(theirs, ours) < 1e-3


def test_prefill_and_decode_graphs_share_the_heads_integers(tied):
    """The prompt's graph (reference path) and the one-token graph (reduction) read one int8 copy of
    the head's weight: it is quantized once per backend, not once per graph."""
    model, calib = tied
    torch._dynamo.reset()
    backend = qpass.backend(CONFIG, calibration=calib, inductor=False)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        for seq in (8, 1):
            compiled(token_batches(1, batch=1, seq=seq, seed=3)[0], use_cache=False)
    assert len(backend.graphs) == 2
    heads = [[t for name, t in constants(gm).items() if t.dtype == torch.int8 and gm.qpass_names.get(name) == "lm_head.weight_q"]
             for gm in backend.graphs]
    assert [len(h) for h in heads] == [1, 1] and heads[0][0].untyped_storage().data_ptr() == heads[1][0].untyped_storage().data_ptr()
    assert backend.report.rows["lm_head"].kernels == ("reference (weight-only with float32 activations (its kernels are fast "
                                                      "with bfloat16 only))", RED)
