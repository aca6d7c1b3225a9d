"""Smoothing("learned"): FSBR's block reconstruction of the smoothing factors (qpass.fsbr,
qpass.passes.learned)."""

import importlib
import re

import pytest
import torch
import torch.nn.functional as F

import qpass
from qpass import fsbr, qmath
from qpass.config import PerGroup, PerInputChannel, PerOutputChannel, PerTensor, PerToken, QuantSpec
from qpass.passes.smooth import smoothing_scales
from tests.models import tiny_model, token_batches

backend_module = importlib.import_module("qpass.backend")  # ``qpass.backend`` is also the function
LEARNED = qpass.Smoothing("learned", steps=30, lr=0.02)
STATIC = qpass.preset("w8a8_static", smoothing=LEARNED)


def _compile(model, config, calib, ids, monkeypatch=None, smooth_only=False):
    if smooth_only:
        monkeypatch.setattr(backend_module, "PIPELINE", backend_module.PIPELINE[:1])  # the smooth pass alone
    torch._dynamo.reset()
    be = qpass.backend(config, calibration=calib, inductor=False)
    with torch.no_grad():
        out = torch.compile(model, backend=be, dynamic=False)(ids, use_cache=False).logits
    torch._dynamo.reset()
    return be, out


def _block_errors(report) -> list[tuple[float, float]]:
    notes = {r.reason for r in report.rows.values() if r.reason.startswith("learned (FSBR): block error")}
    return [tuple(map(float, re.search(r"block error (\S+) -> (\S+) ", n).groups())) for n in notes]


def test_learned_factors_fold_exactly(monkeypatch):
    """The learned factors (learned for w8a8_static) folded without quantizing: the same function."""
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(3))
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    be, out = _compile(model, STATIC, calib, ids, monkeypatch, smooth_only=True)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    assert dict(be.report.counts()) == {"linear-norm": 4, "linear-linear": 2, "gated-act": 2}
    # both blocks of both layers learned, and moved off the auto-alpha start (lower held-out error)
    errors = _block_errors(be.report)
    assert len(errors) == 4 and all(end <= start for start, end in errors)
    assert any(end < 0.95 * start for start, end in errors)
    assert len(calib.learned) == 8  # one factor vector per fold: 2 layers x (norm, v->o, norm, up->down)


def test_learning_that_only_hurts_keeps_auto_alpha_exactly(caplog):
    """A learning rate so large that every step is worse on the held-out rows: each block keeps its
    auto-alpha start, and the compiled model is auto alpha's, bit for bit. Few rows: one warning."""
    model = tiny_model("llama", layers=1)
    calib = qpass.calibrate(model, token_batches(3))
    ids = token_batches(1, seed=7)[0]
    _, auto = _compile(model, qpass.preset("w8a8_static"), calib, ids)
    be, learned = _compile(model, qpass.preset("w8a8_static", smoothing=qpass.Smoothing("learned", steps=3, lr=100.0)),
                           calib, ids)
    assert torch.equal(learned, auto)
    notes = {p: r.reason for p, r in be.report.rows.items() if r.reason.startswith("learned (FSBR)")}
    assert len(notes) == 7 and all("(step 0 of 3; 72 training rows, 24 held out)" in n for n in notes.values())
    warned = [r.getMessage() for r in caplog.records if "learned smoothing trained" in r.getMessage()]
    assert warned == ["qpass: learned smoothing trained 2 blocks on fewer than 256 calibration rows each (fewest: 72, "
                      "model.layers.0.self_attn.q_proj): the factors may fit the calibration text only; calibrate with "
                      "more samples (qpass.calibrate(..., samples=512))"]
    assert all(start == end for start, end in _block_errors(be.report))


def test_unquantized_config_learns_nothing():
    """Nothing quantized: nothing to reconstruct, the auto-alpha factors fold (and are exact)."""
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(2))
    ids = token_batches(1, seed=7)[0]
    config = qpass.QuantConfig(weight=None, activation=None, smoothing=qpass.Smoothing("learned"))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    be, out = _compile(model, config, calib, ids)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    assert not calib.learned


def _outlier_mlp(rows: int, seed: int):
    """A SwiGLU MLP block's inputs with three outlier channels (60x), and its weights."""
    g = torch.Generator().manual_seed(seed)
    k, n = 32, 48
    x = torch.randn(rows, k, generator=g)
    x[:, :3] *= 60
    w = [torch.randn(n, k, generator=torch.Generator().manual_seed(100 + i)) * 0.2 for i in range(2)]
    wd = torch.randn(k, n, generator=torch.Generator().manual_seed(102)) * 0.2
    return x, w[0], w[1], wd


def _mlp_block(x, wg, wu, wd, lo, hi, init):
    lin = {
        "gate": fsbr.BlockLinear("gate", wg, x, col=(0, torch.arange(x.shape[1])), lo=lo[0], hi=hi[0]),
        "up": fsbr.BlockLinear("up", wu, x, col=(0, torch.arange(x.shape[1])), row=(1, torch.arange(wu.shape[0])),
                               lo=lo[0], hi=hi[0]),
        "down": fsbr.BlockLinear("down", wd, None, col=(1, torch.arange(wd.shape[1])), lo=lo[1], hi=hi[1]),
    }
    return fsbr.Block(lin, [fsbr.GatedProduct("gate", "up", "down", F.silu)], init, QuantSpec("int8", PerOutputChannel()))


@pytest.mark.parametrize("spec,bound", [
    (QuantSpec("int8", PerTensor(), dynamic=False), 0.7),  # measured 0.57
    (QuantSpec("int8", PerToken()), 0.9),  # measured 0.79
])
def test_learned_factors_beat_auto_alpha_on_outlier_channels(spec, bound):
    """On an MLP block with outlier channels, learning from the best closed-form alpha lowers the
    quantized block's output error on rows it never saw (the static range is the calibrated one,
    over both sets of rows)."""
    x, wg, wu, wd = _outlier_mlp(512, seed=0)
    fresh_x = _outlier_mlp(1024, seed=1)[0]
    h, fresh_h = (F.silu(t @ wg.T) * (t @ wu.T) for t in (x, fresh_x))
    lo = (torch.minimum(x.amin(0), fresh_x.amin(0)), torch.minimum(h.amin(0), fresh_h.amin(0)))
    hi = (torch.maximum(x.amax(0), fresh_x.amax(0)), torch.maximum(h.amax(0), fresh_h.amax(0)))

    def auto_init(alpha):
        s1 = smoothing_scales(x.abs().amax(0), torch.maximum(wg.abs().amax(0), wu.abs().amax(0)), alpha)
        s2 = smoothing_scales(h.abs().amax(0), wd.abs().amax(0), alpha)
        return [s1, s2]

    def error(block, factors):
        return float(fsbr.block_loss(block, [f.log() for f in factors]))

    blocks = {a: _mlp_block(x, wg, wu, wd, lo, hi, auto_init(a)) for a in (0.3, 0.5, 0.7, 0.9)}
    for b in blocks.values():
        fsbr.decide_activations(b, spec, None)
    block = blocks[min(blocks, key=lambda a: error(blocks[a], blocks[a].init))]
    result = fsbr.learn(block, steps=100, lr=0.01)
    assert result.loss_end < bound * result.loss_start
    fresh = _mlp_block(fresh_x, wg, wu, wd, lo, hi, block.init)
    fsbr.decide_activations(fresh, spec, None)
    assert error(fresh, result.factors) < bound * error(fresh, block.init)


def _rows(n: int, seed: int, outliers: list[int]) -> torch.Tensor:
    x = torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))
    x[:, outliers] *= 60
    return x


def _shifted_blocks(spec):
    """Training rows with outliers in channels 0-2, held-out rows (the last quarter) in channels 3-5:
    the block on all rows, on the training kind only, and on the held-out kind only."""
    _, wg, wu, wd = _outlier_mlp(8, seed=0)
    a, b = _rows(96, 0, [0, 1, 2]), _rows(32, 10, [3, 4, 5])
    x = torch.cat([a, b])
    h = F.silu(x @ wg.T) * (x @ wu.T)
    lo, hi = (x.amin(0), h.amin(0)), (x.amax(0), h.amax(0))
    init = [smoothing_scales(x.abs().amax(0), torch.maximum(wg.abs().amax(0), wu.abs().amax(0)), 0.5),
            smoothing_scales(h.abs().amax(0), wd.abs().amax(0), 0.5)]
    blocks = [_mlp_block(rows, wg, wu, wd, lo, hi, init) for rows in (x, a, b)]
    for block in blocks:
        fsbr.decide_activations(block, spec, None)
    return blocks


def test_held_out_rows_keep_the_start_when_learning_would_hurt():
    """The held-out rows (the last quarter: whole calibration sequences) differ from the training
    rows, and every step learned from the training rows is worse on them than the auto-alpha start:
    the start is kept, exactly, and the report says step 0."""
    spec = QuantSpec("int8", PerToken())
    mixed, train_kind, held_kind = _shifted_blocks(spec)
    assert fsbr.split_rows(128) == (slice(0, 96), slice(96, 128))
    # learning from the training kind alone helps on its own held-out rows and hurts the other kind
    alone = fsbr.learn(train_kind, steps=15, lr=0.1, penalty=0.0)
    assert alone.steps > 0 and alone.loss_end < 0.8 * alone.loss_start  # measured 0.57
    start_error = float(fsbr.block_loss(held_kind, [s.log() for s in held_kind.init]))
    assert float(fsbr.block_loss(held_kind, [s.log() for s in alone.factors])) > 2 * start_error  # measured 3.8x
    # held out, that damage is seen and no step is taken
    result = fsbr.learn(mixed, steps=15, lr=0.1, penalty=0.0)
    assert (result.steps, result.rows) == (0, (96, 32))
    assert result.loss_end == result.loss_start
    assert all(f is s for f, s in zip(result.factors, mixed.init))


def test_penalty_keeps_factors_near_the_start():
    """The penalty on ``log s``'s distance from the auto-alpha start: the learned factors move less
    with it, and the held-out error still never ends above the start's."""
    x, wg, wu, wd = _outlier_mlp(128, seed=0)
    h = F.silu(x @ wg.T) * (x @ wu.T)
    init = [smoothing_scales(x.abs().amax(0), torch.maximum(wg.abs().amax(0), wu.abs().amax(0)), 0.5),
            smoothing_scales(h.abs().amax(0), wd.abs().amax(0), 0.5)]
    block = _mlp_block(x, wg, wu, wd, (x.amin(0), h.amin(0)), (x.amax(0), h.amax(0)), init)
    fsbr.decide_activations(block, QuantSpec("int8", PerTensor(), dynamic=False), None)

    def moved(result) -> float:
        return float(sum((f.log() - s.log()).pow(2).sum() for f, s in zip(result.factors, init)))

    free, held = fsbr.learn(block, 10, 0.02, penalty=0.0), fsbr.learn(block, 10, 0.02, penalty=100.0)
    assert free.steps > 0 and held.steps > 0
    assert moved(held) < 0.2 * moved(free)  # measured 0.02
    assert held.loss_end <= held.loss_start and free.loss_end <= free.loss_start


@pytest.mark.parametrize("spec,granularity", [
    (QuantSpec("int8", PerOutputChannel()), PerOutputChannel()),
    (QuantSpec("int8", PerTensor()), PerTensor()),
    (QuantSpec("int8", PerInputChannel()), PerInputChannel()),
    (QuantSpec("int4", PerGroup(8), symmetric=False), PerGroup(8)),
    (QuantSpec("fp8_e4m3", PerOutputChannel()), PerOutputChannel()),
])
def test_straight_through_weight_quant_matches_qmath(spec, granularity):
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fsbr.fake_quant_weight(w, spec, granularity), qmath.fake_quant_weight(w, spec, granularity),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", [
    QuantSpec("int8", PerToken()), QuantSpec("int8", PerToken(), symmetric=False), QuantSpec("int8", PerTensor()),
    QuantSpec("fp8_e4m3", PerToken()),
])
def test_straight_through_act_quant_matches_qmath(spec):
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)) + 0.3
    torch.testing.assert_close(fsbr.fake_quant_act(x, spec), qmath.fake_quant_act(x, spec), rtol=1e-6, atol=1e-6)


def test_straight_through_static_act_matches_qmath():
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec("int8", PerTensor(), dynamic=False, symmetric=False)
    lo, hi = x.amin(0) * 1.5, x.amax(0) * 1.5
    expected = qmath.fake_quant_act(x, spec, *qmath.static_act_qparams(lo, hi, spec))
    torch.testing.assert_close(fsbr.fake_quant_act(x, spec, lo, hi), expected, rtol=1e-6, atol=1e-6)


def test_learned_factors_saved_with_the_calibration(tmp_path, caplog):
    """A second compile reads the factors from the calibration (here: saved and loaded) instead of
    learning again, and gives the same model."""
    model = tiny_model("llama", layers=1)
    calib = qpass.calibrate(model, token_batches(3))
    ids = token_batches(1, seed=7)[0]
    config = qpass.preset("w8a8_tensor_dynamic", smoothing=LEARNED)
    _, first = _compile(model, config, calib, ids)
    assert len(calib.learned) == 4
    calib.save(tmp_path / "calib.safetensors")
    loaded = qpass.Calibration.load(tmp_path / "calib.safetensors")
    assert loaded.learned.keys() == calib.learned.keys()
    for key, s in calib.learned.items():
        assert torch.equal(loaded.learned[key], s)
    be, second = _compile(model, config, loaded, ids)
    assert torch.equal(first, second)
    assert {r.reason.split("; one GEMM with")[0].split("; kernel grid")[0].split("; 8-bit products saturate")[0]
            for p, r in be.report.rows.items() if p != "lm_head"} == {
        "learned (FSBR), read from the calibration"}
    # another config (other steps) is another key: learned afresh, both kept
    _compile(model, config.replace(smoothing=qpass.Smoothing("learned", steps=5)), loaded, ids)
    assert len(loaded.learned) == 8


def test_tampered_learned_factors_are_refused(tmp_path):
    model = tiny_model("llama", layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    calib.learned["k/x"] = torch.ones(4)
    path = tmp_path / "calib.safetensors"
    calib.save(path)
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\x80\x40"  # the last factor: 1.0 -> 4.0
    path.write_bytes(bytes(data))
    with pytest.raises(qpass.CalibrationFileError, match="checksum mismatch"):
        qpass.Calibration.load(path)


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha="learnt"), "Smoothing.alpha must be in [0, 1], 'auto' or 'learned', got 'learnt'"),
    (dict(alpha="learned", steps=-1), "Smoothing.steps must be an int >= 0, got -1"),
    (dict(alpha="learned", steps=2.5), "Smoothing.steps must be an int >= 0, got 2.5"),
    (dict(alpha="learned", steps=True), "Smoothing.steps must be an int >= 0, got True"),
    (dict(alpha="learned", lr=0.0), "Smoothing.lr must be a finite number > 0, got 0.0"),
    (dict(alpha="learned", lr=float("inf")), "Smoothing.lr must be a finite number > 0, got inf"),
    (dict(alpha="learned", penalty=-0.5), "Smoothing.penalty must be a finite number >= 0, got -0.5"),
    (dict(alpha="learned", penalty=float("nan")), "Smoothing.penalty must be a finite number >= 0, got nan"),
    (dict(alpha="learned", penalty="1"), "Smoothing.penalty must be a finite number >= 0, got '1'"),
    (dict(alpha="auto", steps=100), "Smoothing: steps, lr and penalty apply to alpha='learned' only, got alpha='auto'"),
    (dict(alpha=0.5, lr=0.01), "Smoothing: steps, lr and penalty apply to alpha='learned' only, got alpha=0.5"),
    (dict(alpha="auto", penalty=1.0), "Smoothing: steps, lr and penalty apply to alpha='learned' only, got alpha='auto'"),
])
def test_bad_learning_parameters(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        qpass.Smoothing(**kwargs)
