"""Quant/dequant insertion: error bounds per preset, reference op semantics, bad input."""

import re

import pytest
import torch

import qpass
from qpass import ops, qmath
from qpass.passes import quantize
from qpass.config import PerGroup, PerInputChannel, PerOutputChannel, PerTensor, PerToken, QuantSpec
from tests.models import tiny_model, token_batches

# Relative logit error bounds on the tiny 2-layer Llama (measured: 0.028, 0.080, 0.059, 0.084,
# 0.120, 0.023, 0.235 (asymmetric int4 groups; symmetric was 0.28), 0.025), with margin.
# Random tiny models are harder than real ones.
BOUNDS = {
    "w8a8_dynamic": 0.05,
    "w8a8_static": 0.12,
    "w8a8_tensor_dynamic": 0.09,
    "fp8_dynamic": 0.12,
    "fp8_static": 0.18,
    "w8a16": 0.04,
    "w4a16": 0.32,
    "llm_int8": 0.04,
}


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(4))
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    return model, calib, ids, ref


def _run(model, config, calib, ids):
    torch._dynamo.reset()
    backend = qpass.backend(config.replace(lower=False), calibration=calib, inductor=False)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
    return out, backend


def _rel(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_preset_error_bound(llama, name):
    model, calib, ids, ref = llama
    out, backend = _run(model, qpass.preset(name), calib, ids)
    err = _rel(out, ref)
    assert 0 < err <= BOUNDS[name], err  # > 0: it really quantized
    rows = backend.report.rows
    assert rows["lm_head"].weight == "fp32 (skipped)"
    assert rows["model.layers.0.mlp.down_proj"].weight.startswith(qpass.preset(name).weight.dtype)


def test_smoothing_rescues_static_per_tensor():
    """With 200x outlier channels, one per-tensor scale crushes the rest; smoothing rescues it."""
    model = tiny_model("llama", outliers=200.0)
    calib = qpass.calibrate(model, token_batches(4))
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    static = qpass.preset("w8a8_static")
    unsmoothed, _ = _run(model, static.replace(smoothing=None), calib, ids)
    fixed, _ = _run(model, static.replace(smoothing=qpass.Smoothing(0.5)), calib, ids)
    auto, _ = _run(model, static, calib, ids)
    # measured: unsmoothed 0.137, alpha 0.5 0.047, auto 0.087 (the per-layer search is myopic on
    # this random model; on SmolLM2 it is measured by bench/accuracy.py)
    assert _rel(fixed, ref) < 0.5 * _rel(unsmoothed, ref)
    assert _rel(auto, ref) < 0.75 * _rel(unsmoothed, ref)


def test_auto_alpha_minimises_group_error_and_is_reported(llama, monkeypatch):
    """alpha='auto' keeps, per pattern, the grid value whose quantized outputs are closest
    to fp32 on the calibration samples. (Whether that also wins on perplexity is measured
    on the real model by bench/accuracy.py.)"""
    import qpass.passes.smooth as smooth_pass

    model, calib, ids, ref = llama
    grid = (0.3, 0.5, 0.8)
    calls = []
    original = smooth_pass._smoothed_error

    def spy(config, problem, s):
        err = original(config, problem, s)
        calls.append((problem.consumer.site.path, err))
        return err

    monkeypatch.setattr(smooth_pass, "_smoothed_error", spy)
    auto, backend = _run(model, qpass.preset("w8a8_static", smoothing=qpass.Smoothing("auto", alpha_grid=grid)), calib, ids)
    assert _rel(auto, ref) <= BOUNDS["w8a8_static"]
    rows = backend.report.rows
    groups = {}
    for m in backend.report.matches.values():
        groups[m.consumers] = [0.0] * len(grid)
    per_layer = {}
    for path, err in calls:
        per_layer.setdefault(path, []).append(err)
    for consumers in groups:
        totals = [sum(per_layer[p][i] for p in consumers) for i in range(len(grid))]
        best = grid[min(range(len(grid)), key=totals.__getitem__)]
        assert all(rows[p].alpha == best for p in consumers), (consumers, totals)
    assert len(groups) == 8


def test_adadim_reports_choice(llama):
    model, calib, ids, ref = llama
    config = qpass.preset("w8a8_dynamic").replace(weight=QuantSpec("int8", qpass.AdaDim()))
    out, backend = _run(model, config, calib, ids)
    chosen = {r.weight for p, r in backend.report.rows.items() if p != "lm_head"}
    assert chosen <= {"int8 per-input-channel", "int8 per-output-channel"}
    assert all("adadim:" in r.reason for p, r in backend.report.rows.items() if p != "lm_head")
    assert _rel(out, ref) <= BOUNDS["w8a8_dynamic"]


def test_llm_int8_keeps_outlier_channels(llama):
    model, calib, ids, ref = llama
    out, backend = _run(model, qpass.preset("llm_int8"), calib, ids)
    notes = [r.activation for r in backend.report.rows.values()]
    assert any("fp32 outlier channels" in n for n in notes)
    plain, _ = _run(model, qpass.preset("llm_int8").replace(outliers=None), calib, ids)
    assert _rel(out, ref) < _rel(plain, ref)


def test_outlier_sets_take_their_roles_common_size():
    """``OutlierSplit.common_size`` (the default): every linear of a role keeps as many channels as the
    one the rule gives most (the tiny Llama's down_proj: 18, 21 and 25 channels by the ratio rule ->
    25 each), a superset of its own, and its report row says so; ``common_size=False`` keeps the
    rule's counts. The layers' paths differ only in the block number."""
    model = tiny_model("llama", layers=3)
    calib = qpass.calibrate(model, token_batches(4))
    ids = token_batches(1, seed=7)[0]
    counts = {}
    for common in (False, True):
        config = qpass.preset("llm_int8").replace(outliers=qpass.OutlierSplit(threshold=None, ratio=2.0, common_size=common))
        _, backend = _run(model, config, calib, ids)
        counts[common] = {p: r.outlier_channels for p, r in backend.report.rows.items() if p != "lm_head"}
        rows = backend.report.rows
    own = [counts[False][f"model.layers.{i}.mlp.down_proj"] for i in range(3)]
    assert len(set(own)) == 3, own  # no two alike: the case the common size is for
    roles = {quantize.role(p) for p in counts[True]}
    assert len(roles) == 7, roles
    for r in roles:
        layers = [p for p in counts[True] if quantize.role(p) == r]
        assert len(layers) == 3 and {counts[True][p] for p in layers} == {max(counts[False][p] for p in layers)}, r
    for i, n in enumerate(own):
        note = rows[f"model.layers.{i}.mlp.down_proj"].reason
        grew = f"outlier channels: {n} by the rule, {max(own)} as the most of its role (OutlierSplit.common_size)"
        assert (grew in note) == (n < max(own)), note


def test_static_activation_scale_uses_smoothed_range():
    """Static scale = per-tensor max of x / s from the calibrated per-channel ranges."""
    lo, hi = torch.tensor([-8.0, -1.0, 0.5]), torch.tensor([4.0, 2.0, 3.0])
    s = torch.tensor([4.0, 1.0, 1.0])
    scale, zp = qmath.static_act_qparams(lo / s, hi / s, QuantSpec("int8", PerTensor(), dynamic=False))
    assert scale.item() == pytest.approx(3.0 / 127) and zp.item() == 0
    scale, zp = qmath.static_act_qparams(lo / s, hi / s, QuantSpec("int8", PerTensor(), symmetric=False, dynamic=False))
    assert scale.item() == pytest.approx(5.0 / 255)
    assert zp.item() == -128 + round(2.0 / (5.0 / 255))


def test_reference_ops_integer_semantics():
    x = torch.tensor([[0.5, -1.26, 2.0, 0.0], [10.0, -10.0, 0.04, 3.0]])
    scale, zp = ops.choose_qparams(x, True, True, -128.0, 127.0)
    torch.testing.assert_close(scale, torch.tensor([[2.0 / 127], [10.0 / 127]]))
    q = ops.quantize(x, scale, None, -128.0, 127.0, torch.int8)
    assert q.dtype == torch.int8
    assert q.tolist() == [[32, -80, 127, 0], [127, -127, 1, 38]]
    torch.testing.assert_close(ops.dequantize(q, scale, None, 0, torch.float32), q.float() * scale)
    f8 = ops.quantize(x, torch.tensor(1.0), None, -448.0, 448.0, torch.float8_e4m3fn)
    assert f8.dtype == torch.float8_e4m3fn and f8.float()[0, 2] == 2.0


@pytest.mark.parametrize(
    "granularity,scale_shape",
    [(PerTensor(), (1, 1)), (PerOutputChannel(), (6, 1)), (PerInputChannel(), (1, 8)), (PerGroup(4), (6, 2))],
)
def test_weight_granularities(granularity, scale_shape):
    w = torch.randn(6, 8)
    qw = qmath.quantize_weight(w, QuantSpec("int8", granularity), granularity)
    assert qw.q.dtype == torch.int8 and tuple(qw.scale.shape) == scale_shape
    assert qw.q.abs().max() == 127  # each block's absmax maps to 127
    err = (qw.dequantize() - w).abs()
    assert err.max() <= qw.scale.max() / 2 + 1e-6


def test_int4_groups_stay_in_range():
    w = torch.randn(4, 64)
    qw = qmath.quantize_weight(w, QuantSpec("int4", PerGroup(32)))
    assert qw.q.min() >= -8 and qw.q.max() <= 7


def test_asymmetric_groups_beat_symmetric_on_skewed_weights():
    """A zero point per group spends all 16 int4 levels on the group's [min, max]; on a
    skewed (mostly positive) weight symmetric groups waste half of them."""
    torch.manual_seed(0)
    w = torch.randn(16, 128).abs() * 0.05 + 0.01 * torch.randn(16, 128)
    sym = qmath.quantize_weight(w, QuantSpec("int4", PerGroup(32)))
    asym = qmath.quantize_weight(w, QuantSpec("int4", PerGroup(32), symmetric=False))
    assert sym.zero_point is None and tuple(asym.zero_point.shape) == tuple(asym.scale.shape) == (16, 4)
    assert asym.q.min() >= -8 and asym.q.max() <= 7 and asym.q.dtype == torch.int8
    err = {k: ((qw.dequantize() - w).norm() / w.norm()).item() for k, qw in (("sym", sym), ("asym", asym))}
    assert err["asym"] < 0.6 * err["sym"], err
    # each group's extremes are on the grid and the error is at most half a step
    blocks = (asym.dequantize() - w).abs().reshape(16, 4, 32)
    assert (blocks.amax(-1) <= asym.scale / 2 + 1e-6).all()
    # a weight already on a per-group min-max grid of 16 levels (GGUF Q4_1) comes back exactly
    lo, step = torch.randn(16, 4, 1), torch.rand(16, 4, 1) + 0.1
    levels = torch.randint(0, 16, (16, 4, 32)).float()
    levels[..., 0], levels[..., 1] = 0, 15
    grid = (lo + step * levels).reshape(16, 128)
    back = qmath.fake_quant_weight(grid, QuantSpec("int4", PerGroup(32), symmetric=False))
    torch.testing.assert_close(back, grid, rtol=0, atol=1e-5)


def test_integer_zero_points_sit_on_the_grid():
    """``zero_point="int"``: the range widened to hold 0, an integer zero point in [-8, 7], and the
    integers of a grid that has one (step s, zero at level z) come back exactly."""
    step, zero = torch.rand(16, 4, 1) + 0.1, torch.randint(-8, 8, (16, 4, 1)).float()
    levels = torch.randint(-8, 8, (16, 4, 32)).float()
    levels[..., 0], levels[..., 1] = -8, 7
    grid = ((levels - zero) * step).reshape(16, 128)
    spec = QuantSpec("int4", PerGroup(32), symmetric=False, zero_point="int")
    qw = qmath.quantize_weight(grid, spec)
    assert torch.equal(qw.zero_point, qw.zero_point.round()) and qw.zero_point.min() >= -8 and qw.zero_point.max() <= 7
    torch.testing.assert_close(qw.zero_point, zero.squeeze(-1), rtol=0, atol=0)
    torch.testing.assert_close(qw.q.float().reshape(16, 4, 32), levels, rtol=0, atol=0)
    torch.testing.assert_close(qw.dequantize(), grid, rtol=0, atol=1e-5)
    positive = torch.rand(2, 32) + 1.0  # all above 0: the range still starts at 0
    qw = qmath.quantize_weight(positive, spec)
    assert qw.zero_point.tolist() == [[-8.0], [-8.0]]
    with pytest.raises(ValueError, match="QuantSpec.zero_point must be 'float' or 'int', got 'integer'"):
        QuantSpec("int4", PerGroup(32), symmetric=False, zero_point="integer")


def test_asymmetric_weights_through_the_graph(llama):
    model, calib, ids, ref = llama
    sym, _ = _run(model, qpass.preset("w4a16", weight=QuantSpec("int4", PerGroup(32))), calib, ids)
    asym, backend = _run(model, qpass.preset("w4a16"), calib, ids)
    assert backend.report.rows["model.layers.0.mlp.down_proj"].weight == "int4 per-group(32) asym int-zp"
    assert 0 < _rel(asym, ref) < _rel(sym, ref)
    float_zp, backend = _run(model, qpass.preset("w4a16", weight=QuantSpec("int4", PerGroup(32), symmetric=False,
                                                                           zero_point="float")), calib, ids)
    assert backend.report.rows["model.layers.0.mlp.down_proj"].weight == "int4 per-group(32) asym"
    assert 0 < _rel(float_zp, ref) < _rel(sym, ref)
    # per-channel int8 asymmetric weights work weight-only too
    out, backend = _run(model, qpass.preset("w8a16", weight=QuantSpec("int8", PerOutputChannel(), symmetric=False)), calib, ids)
    assert 0 < _rel(out, ref) <= BOUNDS["w8a16"]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="QuantConfig.activation: PerOutputChannel"):
        qpass.QuantConfig(activation=QuantSpec("int8", PerOutputChannel()))
    with pytest.raises(ValueError, match="QuantConfig.weight: PerToken"):
        qpass.QuantConfig(weight=QuantSpec("int8", PerToken()))
    with pytest.raises(ValueError, match="PerToken scales are computed at run time"):
        QuantSpec("int8", PerToken(), dynamic=False)
    with pytest.raises(ValueError, match="fp8_e4m3 has no zero point"):
        QuantSpec("fp8_e4m3", PerTensor(), symmetric=False)
    with pytest.raises(ValueError, match=r"asymmetric weights \(symmetric=False\) are weight-only"):
        qpass.QuantConfig(weight=QuantSpec("int8", PerOutputChannel(), symmetric=False))
    with pytest.raises(ValueError, match="uint8 weights are not supported"):
        qpass.QuantConfig(weight=QuantSpec("uint8", PerOutputChannel()), activation=None)
    with pytest.raises(ValueError, match="PerGroup.group_size"):
        PerGroup(0)
    with pytest.raises(ValueError, match="fp8_e4m3 activations need fp8_e4m3 weights"):
        qpass.QuantConfig(activation=QuantSpec("fp8_e4m3", PerToken()))
    with pytest.raises(ValueError, match="Smoothing.alpha"):
        qpass.Smoothing(alpha=1.5)
    with pytest.raises(KeyError, match="unknown qpass preset"):
        qpass.preset("w3a3")


def test_group_size_that_does_not_divide_names_the_layer(llama):
    model, calib, ids, _ = llama
    config = qpass.preset("w4a16").replace(weight=QuantSpec("int4", PerGroup(48)))  # 64 % 48 != 0
    with pytest.raises(Exception, match=r"model\.layers\.0\.self_attn\.q_proj: PerGroup\(48\) does not divide"):
        _run(model, config, calib, ids)


def test_static_activations_without_calibration_name_the_layer(llama):
    model, _, ids, _ = llama
    with pytest.raises(Exception, match=r"model\.layers\.0\.self_attn\.q_proj: static activation scales need calibration"):
        _run(model, qpass.preset("w8a8_static"), None, ids)


def test_reference_ops_decompose_to_plain_aten():
    """Inductor sees only aten ops (any device): the qpass ops are CompositeImplicitAutograd."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def fake_quant(x, w_q, w_s):
        s, z = ops.choose_qparams(x, True, False, -128.0, 127.0)
        xq = ops.quantize(x, s, z, -128.0, 127.0, torch.int8)
        return torch.nn.functional.linear(ops.dequantize(xq, s, z, 0, torch.float32), ops.dequantize(w_q, w_s, None, 0, torch.float32))

    gm = make_fx(fake_quant, pre_dispatch=False)(torch.randn(3, 8), torch.randint(-127, 127, (4, 8), dtype=torch.int8), torch.rand(4, 1))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert targets and all(t.namespace in ("aten", "prims") for t in targets), targets


def test_asymmetric_activations(llama):
    model, calib, ids, ref = llama
    for act in (QuantSpec("int8", PerToken(), symmetric=False), QuantSpec("int8", PerTensor(), symmetric=False, dynamic=False)):
        out, backend = _run(model, qpass.preset("w8a8_dynamic", activation=act), calib, ids)
        assert 0 < _rel(out, ref) <= BOUNDS["w8a8_static"]
        assert backend.report.rows["model.layers.0.mlp.down_proj"].activation.endswith("asym")


def test_outlier_rules_pick_channels():
    from qpass.passes.quantize import _outlier_channels

    absmax = torch.tensor([1.0, 1.2, 0.9, 10.0, 1.1, 5.0, 7.0])
    view = (-absmax, absmax, absmax, None)

    def picked(split):
        idx = _outlier_channels(qpass.QuantConfig(outliers=split), view)
        return [] if idx is None else idx.tolist()

    assert picked(qpass.OutlierSplit(6.0)) == [3, 6]
    assert picked(qpass.OutlierSplit(threshold=None, ratio=3.0)) == [3, 5, 6]  # median 1.1
    assert picked(qpass.OutlierSplit(threshold=None, top_k=1)) == [3]
    assert picked(qpass.OutlierSplit(threshold=None, ratio=20.0)) == []
    # a role's common size adds the next-largest channels to the rule's, never drops one
    common = _outlier_channels(qpass.QuantConfig(outliers=qpass.OutlierSplit(6.0)), view, common=3)
    assert common.tolist() == [3, 5, 6]
    assert _outlier_channels(qpass.QuantConfig(outliers=qpass.OutlierSplit(6.0)), view, common=1).tolist() == [3, 6]
    assert _outlier_channels(qpass.QuantConfig(outliers=qpass.OutlierSplit(20.0)), view, common=9).tolist() == list(range(7))
    with pytest.raises(ValueError, match="give exactly one of threshold, top_k and ratio"):
        qpass.OutlierSplit(ratio=3.0)  # threshold keeps its default
    with pytest.raises(ValueError, match="OutlierSplit.ratio must be > 1"):
        qpass.OutlierSplit(threshold=None, ratio=0.5)


def test_dynamic_fallback_picks_per_token_where_static_loses(llama, caplog):
    """Layers whose static per-tensor error on the calibration samples exceeds ``dynamic_fallback``
    times the per-token error run per-token dynamic, are logged by name and in the report; the
    rest stay static."""
    model, calib, ids, ref = llama
    static = qpass.preset("w8a8_static", smoothing=qpass.Smoothing(0.5), dynamic_fallback=None)
    plain, _ = _run(model, static, calib, ids)
    with caplog.at_level("WARNING", logger="qpass.passes.quantize"):
        mixed, backend = _run(model, static.replace(dynamic_fallback=20.0), calib, ids)
    rows = {p: r for p, r in backend.report.rows.items() if p != "lm_head"}
    fell = {p for p, r in rows.items() if r.activation == "int8 per-token dynamic"}
    kept = {p for p, r in rows.items() if r.activation == "int8 per-tensor static"}
    assert fell and kept and fell | kept == set(rows)
    own = {p for p in fell if "per-token dynamic activations: the static scale's error" in rows[p].reason}
    assert own and all(re.search(r"shares its input with \S+, which runs per-token", rows[p].reason) for p in fell - own)
    # the linears of one input (q/k/v, gate/up) run one activation kind: one quantization, one GEMM
    for group in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"):
        for layer in ("model.layers.0", "model.layers.1"):
            assert len({rows[f"{layer}.{name}"].activation for name in group}) == 1
    assert {p for p in fell if any(p in m for m in caplog.messages)} == fell
    assert _rel(mixed, ref) < _rel(plain, ref)
    # every layer falls back at ratio 1 (per-token is never worse than per-tensor on the samples
    # it is measured on); none at a huge ratio
    _, everywhere = _run(model, static.replace(dynamic_fallback=1.0), calib, ids)
    assert all(r.activation == "int8 per-token dynamic" for p, r in everywhere.report.rows.items() if p != "lm_head")
    _, nowhere = _run(model, static.replace(dynamic_fallback=1e9), calib, ids)
    assert all(r.activation == "int8 per-tensor static" for p, r in nowhere.report.rows.items() if p != "lm_head")


def test_dynamic_fallback_config_errors():
    with pytest.raises(ValueError, match="dynamic_fallback applies to static activations only"):
        qpass.preset("w8a8_dynamic", dynamic_fallback=8.0)
    with pytest.raises(ValueError, match="dynamic_fallback must be >= 1"):
        qpass.preset("w8a8_static", dynamic_fallback=0.5)


def test_auto_alpha_scores_static_layers_as_the_fallback_will_run_them():
    """With ``dynamic_fallback``, the alpha search scores a static layer with the activations the
    quantize pass will give it at that alpha: per-token dynamic where the static scale loses by more
    than the factor (here one token 300x the others makes every static scale useless), else static."""
    from types import SimpleNamespace

    import qpass.passes.smooth as smooth_pass
    from qpass.calibration import ChannelStats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    x[0] *= 300.0  # a massive-activation token
    w = torch.randn(16, 32, generator=g)
    stats = ChannelStats(x.abs().amax(0), x.amin(0), x.amax(0), tokens=64, samples=x)
    consumer = SimpleNamespace(site=SimpleNamespace(weight_t=False), walk=None)
    problem = smooth_pass._SmoothingProblem(consumer, w, stats)
    s = torch.linspace(0.5, 2.0, 32)

    static = qpass.preset("w8a8_static", dynamic_fallback=None)
    dynamic = static.replace(activation=QuantSpec("int8", qpass.PerToken()))
    err = {name: smooth_pass._smoothed_error(cfg, problem, s) for name, cfg in {
        "static": static, "dynamic": dynamic,
        "fallback 8": static.replace(dynamic_fallback=8.0), "fallback huge": static.replace(dynamic_fallback=1e9),
    }.items()}
    assert err["static"] > 8 * err["dynamic"], err
    assert err["fallback 8"] == err["dynamic"]
    assert err["fallback huge"] == err["static"]


META_CASES = {  # op, then its arguments as (shape, dtype) for tensors
    "quantize per token": (ops.quantize, ((2, 5, 8), torch.float32), ((2, 5, 1), torch.float32), None, -128.0, 127.0, torch.int8),
    "quantize static u8 zp": (ops.quantize, ((5, 8), torch.bfloat16), ((1,), torch.float32), ((), torch.float32), 0.0, 255.0, torch.uint8),
    "quantize fp8": (ops.quantize, ((3, 8), torch.float32), ((3, 1), torch.float32), None, -448.0, 448.0, torch.float8_e4m3fn),
    "dequantize weight": (ops.dequantize, ((6, 8), torch.int8), ((6, 1), torch.float32), None, 0, torch.float32),
    "dequantize act to half": (ops.dequantize, ((2, 5, 8), torch.int8), ((2, 5, 1), torch.float32), None, 0, torch.float16),
    "dequantize asym groups": (ops.dequantize, ((6, 8), torch.int8), ((6, 2), torch.float32), ((6, 2), torch.float32), 4, torch.float32),
    "dequantize row groups": (ops.dequantize, ((8, 6), torch.int8), ((2, 6), torch.float32), None, 4, torch.float32, -2),
    "dequantize experts": (ops.dequantize, ((3, 6, 8), torch.int8), ((3, 6, 1), torch.float32), None, 0, torch.bfloat16),
    "choose_qparams per token": (ops.choose_qparams, ((2, 5, 8), torch.float32), True, True, -128.0, 127.0),
    "choose_qparams per tensor": (ops.choose_qparams, ((5, 8), torch.bfloat16), False, False, 0.0, 255.0),
}


def _example(arg):
    """A (shape, dtype) pair -> a tensor of small integers (integer dtypes) or of values in [0.5, 1.5)."""
    if not (isinstance(arg, tuple) and len(arg) == 2 and isinstance(arg[1], torch.dtype)):
        return arg
    shape, dtype = arg
    return torch.randint(-3, 4, shape).to(dtype) if not dtype.is_floating_point else torch.rand(shape).add(0.5).to(dtype)


@pytest.mark.parametrize("case", list(META_CASES))
def test_op_metadata_rules_match_the_ops(case):
    """``ops.META`` (the ``meta['val']`` of inserted nodes without running the ops on fake tensors)
    gives each op's own output shapes, dtypes, strides and devices."""
    from torch._subclasses import FakeTensorMode

    op, *spec = META_CASES[case]
    args = [_example(a) for a in spec]
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        ruled = ops.META[op](*fake_args)
    outs = real if isinstance(real, tuple) else (real,)
    ruled = ruled if isinstance(ruled, tuple) else (ruled,)
    assert len(ruled) == len(outs)
    for r, o in zip(ruled, outs):
        assert (r.shape, r.dtype, r.stride(), r.device) == (o.shape, o.dtype, o.stride(), o.device), case
