"""Static activation scales by output-error search over clipped ranges (``QuantConfig.static_clip``)."""

import pytest
import torch

import qpass
from qpass import qmath
from qpass.config import PerTensor, QuantSpec
from tests.models import tiny_model, token_batches

STATIC = QuantSpec("int8", PerTensor(), dynamic=False)
FRACTIONS = (0.9, 0.8, 0.6, 0.4, 0.2, 0.1)


def test_clipping_search_lowers_output_error_when_the_range_is_set_by_a_rare_token():
    """The calibrated range (+-50, from one rare token) is 15x what the sampled rows reach: the absmax
    scale wastes most of the grid, and the search finds a fraction that keeps the samples' resolution."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    w = torch.randn(16, 32, generator=g)
    lo, hi = torch.full((32,), -50.0), torch.full((32,), 50.0)
    ref = x @ w.T
    absmax = qmath.static_act_qparams(lo, hi, STATIC)
    err_absmax = qmath.token_error(qmath.fake_quant_act(x, STATIC, *absmax) @ w.T, ref)
    scale, zp, fraction = qmath.clipped_act_qparams(x, w, lo, hi, STATIC, FRACTIONS)
    err = qmath.token_error(qmath.fake_quant_act(x, STATIC, scale, zp) @ w.T, ref)
    assert fraction == 0.1  # +-5 covers N(0, 1) samples; 0.2 leaves twice the step
    assert scale.item() == pytest.approx(5.0 / 127)
    assert err < 0.05 * err_absmax, (err, err_absmax)


def test_clipping_search_keeps_the_absmax_where_clipping_hurts():
    """Samples that fill their range (uniform on [-1, 1]): every clipped range loses more to the
    clipped values than it gains in resolution, so the absmax (1.0) stays."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 32, generator=g) * 2 - 1
    x[0, 0], x[1, 1] = -1.0, 1.0
    w = torch.randn(16, 32, generator=g)
    lo, hi = x.amin(0), x.amax(0)
    scale, zp, fraction = qmath.clipped_act_qparams(x, w, lo, hi, STATIC, (0.5, 0.3))
    assert fraction == 1.0
    torch.testing.assert_close(scale, qmath.static_act_qparams(lo, hi, STATIC)[0])


def test_static_clip_reaches_the_graph_and_the_report():
    """On a tiny Llama whose inputs carry outlier channels, some layers clip; the constants in the graph
    are the searched scales (no larger than the absmax ones), and the report names the fraction."""
    model = tiny_model("llama", outliers=50.0)
    calib = qpass.calibrate(model, token_batches(2), samples=32)
    ids = token_batches(1, seed=7)[0]
    base = qpass.preset("w8a8_static", smoothing=None, dynamic_fallback=None, lower=False)
    scales, reports = {}, {}
    for name, config in (("absmax", base), ("clip", base.replace(static_clip=FRACTIONS))):
        torch._dynamo.reset()
        backend = qpass.backend(config, calibration=calib, inductor=False)
        with torch.no_grad():
            torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False)
        (gm,) = backend.graphs
        scales[name] = {k: v.item() for k, v in gm.named_buffers() if "input_scale" in k}
        reports[name] = backend.report
    # Without smoothing, the absmax scale of a layer is its calibrated range's absmax / 127. The absmax
    # config shares one input scale between q / k / v (one input); searched scales are per layer.
    expect = {}
    for path in reports["clip"].rows:
        if path != "lm_head":
            stats = calib.get(path)
            expect[path] = max(-stats.min.min().item(), stats.max.max().item()) / 127
    assert all(any(abs(v - e) <= 1e-6 * e for e in expect.values()) for v in scales["absmax"].values())
    # a searched scale is named after the first layer that reads it (layers with the same input and
    # the same fraction share it, like q / k / v under the absmax)
    owner = {p.replace(".", "_"): p for p in expect}
    got = {owner[k.rsplit("_input_scale", 1)[0]]: v for k, v in scales["clip"].items()}
    assert all(got[p] <= expect[p] * (1 + 1e-6) for p in got)
    clipped = [p for p in got if got[p] < expect[p] * (1 - 1e-6)]
    notes = {p: r.reason for p, r in reports["clip"].rows.items() if "clipped to" in r.reason}
    assert clipped and set(clipped) <= set(notes), (clipped, notes)
    assert not any("clipped to" in r.reason for r in reports["absmax"].rows.values())


@pytest.mark.parametrize("bad", [(0.0,), (1.5,), [0.5], ("x",)])
def test_static_clip_rejects_bad_fractions(bad):
    with pytest.raises(ValueError, match="static_clip must be a tuple of fractions in"):
        qpass.preset("w8a8_static", static_clip=bad)


def test_static_clip_needs_static_activations():
    with pytest.raises(ValueError, match="static_clip applies to static activations only"):
        qpass.preset("w8a8_dynamic", static_clip=(0.9,))
