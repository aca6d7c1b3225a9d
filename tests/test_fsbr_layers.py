"""Smoothing factors learned from whole decoder-layer outputs (qpass.fsbr_layers)."""

import dataclasses
import logging
import math
import re

import pytest
import torch

import qpass
from qpass import fsbr, fsbr_layers, qmath
from qpass.config import PerToken
from qpass.passes import smooth
from qpass.passes.learned import fingerprint
from tests.models import tiny_model, token_batches
from tests.test_learned_smoothing import _compile

CONFIG = qpass.preset("w8a8_static", smoothing=qpass.Smoothing("learned", steps=15, lr=0.05, penalty=0.0))


def _setup(arch="llama"):
    model = tiny_model(arch)
    calib = qpass.calibrate(model, token_batches(3, seq=32))
    seqs = [b[i:i + 1] for b in token_batches(2, seq=32, seed=3) for i in range(2)]  # 4 sequences (1, 32)
    return model, calib, seqs


def _keys(calib, config):
    fp = fingerprint(config)
    return {k[len(fp) + 1:]: v for k, v in calib.learned.items() if k.startswith(fp + "/")}


def test_layer_learned_factors_fold_exactly_and_are_read_back(monkeypatch):
    """Learned from layer outputs, stored where Smoothing("learned") reads them: the compile folds
    them (no alpha search, no block learning) and, unquantized, the model computes the same function."""
    model, calib, seqs = _setup()
    results = fsbr_layers.learn_layers(model, CONFIG, calib, seqs, held_out=1)
    assert [r.layer for r in results] == ["model.layers.0", "model.layers.1"]
    # held-out layer-output error never worse than the auto-alpha start, and learning moved it
    assert all(r.loss_end <= r.loss_start for r in results)
    assert any(r.loss_end < 0.9 * r.loss_start and r.steps > 0 for r in results)
    learned, start = _keys(calib, CONFIG), _keys(calib, fsbr_layers.start_config(CONFIG))
    assert learned.keys() == start.keys() and len(learned) == 8  # 2 layers x (norm, v->o, norm, up->down)
    assert any(not torch.equal(learned[k], start[k]) for k in learned)

    def no_search(*args, **kwargs):
        raise AssertionError("alpha searched although every fold's factors are stored")

    monkeypatch.setattr(smooth, "_search_alpha", no_search)
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    be, out = _compile(model, CONFIG, calib, ids, monkeypatch, smooth_only=True)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    notes = {p: r.reason for p, r in be.report.rows.items() if p != "lm_head"}
    assert len(notes) == 14 and set(notes.values()) == {"learned (FSBR), read from the calibration"}


def test_zero_steps_start_is_auto_alpha_exactly():
    """The start factors (Smoothing("learned", steps=0)) fold into the same model as auto alpha,
    bit for bit: the benchmark's auto-alpha baseline."""
    model, calib, _ = _setup()
    ids = token_batches(1, seed=7)[0]
    _, auto = _compile(model, qpass.preset("w8a8_static"), calib, ids)
    _, start = _compile(model, fsbr_layers.start_config(CONFIG), calib, ids)
    assert torch.equal(auto, start)


def test_learning_that_only_hurts_keeps_the_start_exactly():
    model, calib, seqs = _setup()
    config = CONFIG.replace(smoothing=qpass.Smoothing("learned", steps=3, lr=100.0))
    results = fsbr_layers.learn_layers(model, config, calib, seqs, held_out=1)
    assert [r.steps for r in results] == [0, 0] and all(r.loss_end == r.loss_start for r in results)
    learned, start = _keys(calib, config), _keys(calib, fsbr_layers.start_config(config))
    assert all(torch.equal(learned[k], start[k]) for k in start)


def test_unknown_layer_structure_is_refused_by_name(caplog):
    """Phi-3's fused qkv_proj / gate_up_proj: no replay; each layer keeps its auto-alpha factors and
    one warning per layer names it and why."""
    model, calib, seqs = _setup("phi3")
    with caplog.at_level(logging.WARNING, logger="qpass.fsbr_layers"):
        results = fsbr_layers.learn_layers(model, CONFIG, calib, seqs, held_out=1)
    why = "it has no self_attn.q_proj (not a Llama-family decoder layer with separate q/k/v/o and gate/up/down)"
    assert [r.note for r in results] == [f"not learned: {why}"] * 2
    assert [r.getMessage() for r in caplog.records if r.name == "qpass.fsbr_layers"] == [
        f"qpass: model.layers.{i}: smoothing factors not learned from the layer output ({why}); auto alpha"
        for i in range(2)]
    learned, start = _keys(calib, CONFIG), _keys(calib, fsbr_layers.start_config(CONFIG))
    assert learned.keys() == start.keys() and all(torch.equal(learned[k], start[k]) for k in start)


def test_replay_that_does_not_reproduce_the_layer_is_refused(monkeypatch, caplog):
    """A wrong fold map (down's factors taken out of gate_proj's rows instead of up_proj's) is caught
    by the fp32 check with random factors folded, before any learning."""
    folds = dict(fsbr_layers._FOLDS)
    folds[("mlp.down_proj",)] = ("mlp.gate_proj", "identity")
    monkeypatch.setattr(fsbr_layers, "_FOLDS", folds)
    model, calib, seqs = _setup()
    with caplog.at_level(logging.WARNING, logger="qpass.fsbr_layers"):
        results = fsbr_layers.learn_layers(model, CONFIG, calib, seqs, held_out=1)
    refused = r"not learned: its folds with random factors do not reproduce the layer \(error \S+\)"
    assert all(re.fullmatch(refused, r.note) for r in results)
    warned = [r.getMessage() for r in caplog.records if r.name == "qpass.fsbr_layers"]
    assert len(warned) == 2 and "qpass: model.layers.1: smoothing factors not learned" in warned[1]


def test_wrong_grouped_query_index_is_refused(monkeypatch):
    """o_proj's columns mapped to the wrong value rows (heads not grouped): caught the same way."""
    monkeypatch.setattr(fsbr_layers, "_gqa_index", lambda c, hd, groups: torch.arange(c) % (c // groups))
    model, calib, seqs = _setup()
    results = fsbr_layers.learn_layers(model, CONFIG, calib, seqs, held_out=1)
    refused = "not learned: its folds with random factors do not reproduce the layer"
    assert all(r.note.startswith(refused) for r in results)


def test_own_target_learns_each_layers_own_error():
    """target="own": each layer's quantized output against the fp32 layer on the same (quantized)
    inputs; the start is that layer's own quantization error, and learning lowers it held out."""
    model, calib, seqs = _setup()
    own = fsbr_layers.learn_layers(model, CONFIG, calib, seqs, held_out=1, target="own")
    fp32 = fsbr_layers.learn_layers(model, CONFIG, calib, seqs, held_out=1)
    assert all(r.loss_end <= r.loss_start for r in own) and any(r.loss_end < 0.9 * r.loss_start for r in own)
    assert own[0].loss_start == pytest.approx(fp32[0].loss_start, rel=1e-5)  # layer 0: the same inputs
    assert own[1].loss_start < fp32[1].loss_start  # later: without the error inherited from layer 0


def test_logits_target_learns_all_layers_together_on_the_models_divergence(monkeypatch):
    """target="logits": every layer's factors in one copy of the model, on the KL divergence of its
    next-token distributions from fp32's; the kept step's held-out divergence is never above the
    start's, the factors land where Smoothing("learned") reads them, and they fold exactly."""
    model, calib, seqs = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = fsbr_layers.learn_layers(model, CONFIG, calib, seqs, held_out=1, target="logits")
    assert [r.layer for r in results] == ["model.layers"]
    (r,) = results
    assert 0 < r.loss_end < r.loss_start and r.steps > 0, r.note
    assert "next-token KL divergence from fp32" in r.note and "2 layers" in r.note
    learned, start = _keys(calib, CONFIG), _keys(calib, fsbr_layers.start_config(CONFIG))
    assert learned.keys() == start.keys() and len(learned) == 8
    assert all(not torch.equal(learned[k], start[k]) for k in learned)  # all layers learn together
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    _, out = _compile(model, CONFIG, calib, ids, monkeypatch, smooth_only=True)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def test_logits_target_has_no_layer_screening():
    model, calib, seqs = _setup()
    with pytest.raises(ValueError, match=re.escape("learn_layers: layers applies to the layer-output targets, "
                                                   "not to 'logits'")):
        fsbr_layers.learn_layers(model, CONFIG, calib, seqs, target="logits", layers=1)


@pytest.mark.parametrize("config,held,message", [
    (qpass.preset("w8a8_static"), 1, "learn_layers: config.smoothing must be Smoothing('learned'), got alpha='auto'"),
    (CONFIG, 0, "learn_layers: held_out must be in [1, 3] for 4 sequences, got 0"),
    (CONFIG, 4, "learn_layers: held_out must be in [1, 3] for 4 sequences, got 4"),
    (CONFIG, "own?", "learn_layers: target must be 'fp32', 'own' or 'logits', got 'own?'"),
])
def test_bad_arguments(config, held, message):
    model, calib, seqs = _setup()
    target = "fp32"
    if isinstance(held, str):
        target, held = held, 1
    with pytest.raises(ValueError, match=re.escape(message)):
        fsbr_layers.learn_layers(model, config, calib, seqs, held_out=held, target=target)


def test_half_model_is_refused():
    model, calib, seqs = _setup()
    with pytest.raises(ValueError, match=re.escape("learn_layers: the model must be float32 (its fp32 layer outputs "
                                                   "are the targets), got torch.bfloat16")):
        fsbr_layers.learn_layers(model.to(torch.bfloat16), CONFIG, calib, seqs)


def _scripted_fallback(monkeypatch, per_token_shape):
    """``qmath.static_or_per_token`` as a script: per-token for weights of ``per_token_shape`` alone,
    static for every other linear; the same rule for learning and for the quantize pass."""
    real = qmath.static_or_per_token

    def scripted(x, w, spec, lo, hi, factor):
        static = real(x, w, spec, lo, hi, math.inf)
        if tuple(w.shape) != per_token_shape:
            return static
        dynamic = dataclasses.replace(spec, granularity=PerToken(), dynamic=True)
        return qmath.FallbackChoice(dynamic, static.y, 1.0, 0.0)

    monkeypatch.setattr(qmath, "static_or_per_token", scripted)


@pytest.mark.parametrize("target", ["logits", "fp32"])
def test_learning_scores_the_activation_choices_the_compile_makes(monkeypatch, target):
    """k_proj and v_proj (32 x 64) choose per-token activations and q_proj (64 x 64) static; the quantize
    pass then runs q_proj per-token too, since the three read one input (``_per_token_together``).
    Learning scores its factors under those choices, not under each linear's own: the choices of the
    last step it scored are the compiled model's."""
    _scripted_fallback(monkeypatch, (32, 64))
    model, calib, seqs = _setup()
    config = CONFIG.replace(smoothing=qpass.Smoothing("learned", steps=2, lr=0.05))
    scored = {}
    decide = fsbr_layers._Replay.decide

    def recording(self):
        changed = decide(self)
        scored.update({name: lin.act.dynamic for name, lin in self.block.linears.items()})
        return changed

    monkeypatch.setattr(fsbr_layers._Replay, "decide", recording)
    fsbr_layers.learn_layers(model, config, calib, seqs, held_out=1, target=target)
    ids = token_batches(1, seed=7)[0]
    be, _ = _compile(model, config, calib, ids)
    compiled = {p: r.per_token_fallback for p, r in be.report.rows.items() if p != "lm_head"}
    assert len(scored) == 14 and scored == compiled
    assert {p.removeprefix("model.layers.") for p, dynamic in scored.items() if dynamic} == {
        f"{i}.self_attn.{n}_proj" for i in (0, 1) for n in "qkv"}


def test_decide_activations_takes_the_folds_members_per_token_together():
    """One fold's linears read one input: where one of them loses too much with the static scale, all go
    per-token. Another fold's linear keeps its own choice. The choice follows the factors it is given."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    spec, fallback = CONFIG.activation, 8.0
    tight = x.abs().amax(0)
    wide = tight.clone()
    wide[0] = 40.0  # one channel's calibrated range 10x its data's: the static scale is poisoned
    lin = {name: fsbr.BlockLinear(name, torch.randn(4, 8), x.clone(), col=(fold, torch.arange(8)), lo=-hi, hi=hi)
           for name, fold, hi in [("a", 0, wide), ("b", 0, tight), ("c", 1, tight)]}
    block = fsbr.Block(lin, [], [torch.ones(8), torch.ones(8)], None)
    assert fsbr.decide_activations(block, spec, fallback) == 3  # none was decided before
    assert [lin[n].act.dynamic for n in "abc"] == [True, True, False]
    assert lin["a"].act == lin["b"].act == dataclasses.replace(spec, granularity=PerToken(), dynamic=True)
    assert lin["c"].act == spec
    assert fsbr.decide_activations(block, spec, fallback) == 0
    # a factor that divides channel 0 by 40 / its range leaves a's static range the data's: the fold is static
    log_s = [torch.zeros(8).index_fill(0, torch.tensor([0]), float((wide[0] / tight[0]).log())), torch.zeros(8)]
    assert fsbr.decide_activations(block, spec, fallback, log_s) == 2
    assert [lin[n].act.dynamic for n in "abc"] == [False, False, False]
    assert fsbr.decide_activations(block, spec, None) == 0  # no fallback: the configured spec everywhere
