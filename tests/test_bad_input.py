"""Ordinary mistakes and ordinary models: every case gives a right result or a clear error or
warning naming the layer (calibration files: tests/test_bad_calibration.py)."""

from __future__ import annotations

import copy
import logging
import types

import pytest
import torch

import qpass
from tests.models import TINY_PRESETS, tiny_model, token_batches

# integer_only is not here: its region runs from the embedding to lm_head in one graph, so a graph break
# inside the decoder, or a skipped down_proj, raises (tests/test_integer.py)
# and the low-bit AdaDim presets' groups of 128 do not tile the tiny models
PRESETS_UNDER_TEST = tuple(n for n in TINY_PRESETS if qpass.PRESETS[n].integer_only is None)
# every preset with a break inside a norm (Dynamo then compiles each layer's frames on their own);
# breaks inside a layer and an activation with the presets that depend most on calibration
BREAK_CASES = [("norm", name) for name in PRESETS_UNDER_TEST] + [
    (where, name) for where in ("layer", "activation") for name in ("w8a8_static", "llm_int8")
]


def _preset(name: str) -> qpass.QuantConfig:
    """The preset with ``down_proj`` skipped too, and a fixed alpha (the search is not the point here
    and would run once per graph)."""
    config = qpass.preset(name, skip=("lm_head", "*.mlp.down_proj"))
    return config if config.smoothing is None else config.replace(smoothing=qpass.Smoothing(alpha=0.5))


def _compile(model, backend, ids):
    with torch.no_grad():
        return torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- graph breaks inside submodules ------------------------------------------------------------

def _break_inside(module: torch.nn.Module) -> None:
    """Make Dynamo break the graph inside ``module.forward`` (as a print or ``.item()`` would)."""
    forward = module.forward

    def broken(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return forward(*args, **kwargs)

    module.forward = types.MethodType(broken, module)


BREAKS = {
    "layer": lambda m: m.model.layers[1],
    "norm": lambda m: m.model.layers[0].post_attention_layernorm,
    "activation": lambda m: m.model.layers[1].mlp.act_fn,
}


@pytest.fixture(scope="module")
def reference_rows():
    """Report rows of each preset on the unbroken model: what every broken compile must match."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(2))
    rows, errors = {}, {}
    ids = token_batches(1)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    for name in PRESETS_UNDER_TEST:
        backend = qpass.backend(_preset(name), calibration=calib, inductor=False)
        errors[name] = _rel(_compile(model, backend, ids), ref)
        rows[name] = {p: (r.weight, r.activation) for p, r in backend.report.rows.items()}
    return rows, errors


@pytest.mark.parametrize("where, name", BREAK_CASES)
def test_graph_break_inside_a_submodule_keeps_full_paths(where, name, reference_rows, caplog):
    reference_rows, reference_error = reference_rows[0], reference_rows[1][name]
    torch._dynamo.reset()
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(2))
    _break_inside(BREAKS[where](model))
    config = _preset(name)
    ids = token_batches(1)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    with caplog.at_level(logging.WARNING, logger="qpass"):
        backend = qpass.compile(model, config, calib, inductor=False)
        with torch.no_grad():
            out = model(ids, use_cache=False).logits
    assert backend.report.graphs > 1  # the break happened
    rows = backend.report.rows
    assert set(rows) == set(reference_rows[name]), sorted(rows)  # 15 rows, full paths
    assert all(not r.calibration for r in rows.values()), str(backend.report)  # every lookup found its stats
    for path in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        assert rows[path].weight in ("fp32 (skipped)", "fp32 (ran eagerly)"), path
    assert "unusable calibration" not in caplog.text and "match no linear" not in caplog.text
    assert not [p for p, r in rows.items() if r.weight == "fp32 (ran eagerly)"]
    if config.smoothing is not None:
        assert backend.report.counts(), str(backend.report)  # smoothing still folds
    # as accurate as without the break (which folds some scales into a multiply instead)
    assert _rel(out, ref) < 1.5 * reference_error + 0.01, reference_error


def test_graph_for_one_layer_is_not_reused_for_another():
    """After a break inside a norm, Dynamo skips the decoder's layer loop and compiles each layer's
    frames on their own, with one graph for every layer (parameters are inputs it guards only by
    shape). qpass bakes weights into its graphs, so each layer must get its own."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    _break_inside(BREAKS["norm"](model))
    ids = token_batches(1)[0]
    config = qpass.QuantConfig(activation=None, smoothing=None)  # weight-only: nearly exact
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend=qpass.backend(config, inductor=False))(ids, use_cache=False).logits
    assert _rel(out, ref) < 0.03  # layer 0's weights in layer 1 gave 78%


def test_linears_that_run_eagerly_are_named(caplog):
    torch._dynamo.reset()
    model = tiny_model("llama")
    mlp = model.model.layers[1].mlp
    mlp.forward = torch.compiler.disable(mlp.forward)  # as some libraries do to parts of a model
    with caplog.at_level(logging.WARNING, logger="qpass"):
        backend = qpass.compile(model, "w8a8_dynamic", inductor=False)
        with torch.no_grad():
            model(token_batches(1)[0], use_cache=False)
            model(token_batches(1)[0], use_cache=False)  # warned once
    eager = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert [r.getMessage() for r in caplog.records if "run eagerly" in r.getMessage()] == [
        "qpass: 3 linears are in no compiled graph and run eagerly in full precision (Dynamo skipped their "
        "frames, e.g. after a graph break inside a loop; TORCH_LOGS=graph_breaks says where): " + ", ".join(eager)
    ]
    assert [p for p, r in backend.report.rows.items() if r.weight == "fp32 (ran eagerly)"] == eager


def test_graph_break_smoothing_only_is_exact():
    torch._dynamo.reset()
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(2))
    for where in BREAKS.values():
        _break_inside(where(model))
    backend = qpass.backend(qpass.QuantConfig(weight=None, activation=None), calibration=calib, inductor=False)
    ids = token_batches(1)[0]
    out = _compile(model, backend, ids)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    assert sum(r.smoothing not in ("", "none") for r in backend.report.rows.values()) == 14, str(backend.report)
    assert (out - ref).abs().max().item() / ref.abs().max().item() < 1e-5


def test_graph_break_with_a_loaded_calibration_needs_bind(tmp_path):
    torch._dynamo.reset()
    model = tiny_model("llama")
    qpass.calibrate(model, token_batches(2)).save(tmp_path / "calib.safetensors")
    calib = qpass.Calibration.load(tmp_path / "calib.safetensors")
    _break_inside(model.model.layers[1])
    ids = token_batches(1)[0]
    backend = qpass.backend(_preset("w8a8_static"), calibration=calib, inductor=False)
    with pytest.raises(Exception, match=r"relative to a submodule \('self_attn.q_proj'.*backend.bind\(model\)"):
        _compile(model, backend, ids)
    torch._dynamo.reset()
    backend = qpass.backend(_preset("w8a8_static"), calibration=calib, inductor=False).bind(model)
    _compile(model, backend, ids)
    assert len(backend.report.rows) == 15 and backend.report.rows["model.layers.1.mlp.up_proj"].smoothing != "none"


# -- unusable calibration statistics -----------------------------------------------------------

def _nan_calibration():
    """Calibrated on a copy whose layer-1 o_proj input is NaN (a NaN weight in v_proj)."""
    model = tiny_model("llama")
    poisoned = copy.deepcopy(model)
    with torch.no_grad():
        poisoned.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    return model, qpass.calibrate(poisoned, token_batches(2))


def test_non_finite_statistics_fall_back_per_token_with_one_warning(caplog):
    torch._dynamo.reset()
    model, calib = _nan_calibration()
    assert calib["model.layers.1.self_attn.o_proj"].nonfinite > 0
    config = qpass.preset("w8a8_static", smoothing=qpass.Smoothing(alpha=0.5))
    backend = qpass.backend(config, calibration=calib, inductor=False)
    ids = token_batches(1)[0]
    with caplog.at_level(logging.WARNING, logger="qpass"):
        out = _compile(model, backend, ids)
    unusable = [r for r in caplog.records if "unusable calibration statistics" in r.getMessage()]
    assert len(unusable) == 1 and "model.layers.1.self_attn.o_proj" in unusable[0].getMessage()
    row = backend.report.rows["model.layers.1.self_attn.o_proj"]
    assert "non-finite" in row.calibration and row.per_token_fallback and "dynamic" in row.activation
    assert row.smoothing == "none"
    assert "calibration unusable: " in str(backend.report)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    assert _rel(out, ref) < 0.05  # not the 96% of a 1e-12 static scale


def test_missing_layer_statistics_fall_back(caplog):
    torch._dynamo.reset()
    model = tiny_model("llama")
    full = qpass.calibrate(model, token_batches(2))
    calib = qpass.Calibration({p: st for p, st in full.items() if p != "model.layers.0.mlp.down_proj"})
    backend = qpass.backend("llm_int8", calibration=calib, inductor=False)
    with caplog.at_level(logging.WARNING, logger="qpass"):
        _compile(model, backend, token_batches(1)[0])
    row = backend.report.rows["model.layers.0.mlp.down_proj"]
    assert row.calibration and row.outlier_channels == 0 and "no outlier split" in row.reason
    assert "model.layers.0.mlp.down_proj" in caplog.text


@pytest.mark.parametrize("name", ["w8a8_static", "w8a8_dynamic", "llm_int8"])
def test_calibration_of_another_model_is_one_clear_error(name):
    torch._dynamo.reset()
    other = transformers_llama(hidden=96)
    calib = qpass.calibrate(other, token_batches(2))
    model = tiny_model("llama")
    backend = qpass.backend(name, calibration=calib, inductor=False)
    with pytest.raises(
        Exception,
        match=r"calibration does not fit this model: model\.layers\.0\.self_attn\.q_proj: "
        r"calibrated for 96 input channels, the layer has 64",
    ):
        _compile(model, backend, token_batches(1)[0])
    assert not backend.graphs  # refused before any pass ran


def transformers_llama(hidden: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_static_preset_without_any_calibration_is_a_config_error():
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"static activation scales need calibration statistics \(pass calibration="):
        _compile(tiny_model("llama", layers=1), qpass.backend("w8a8_static", inductor=False), token_batches(1)[0])


# -- release_weights ---------------------------------------------------------------------------

def test_released_weights_raise_instead_of_crashing(tmp_path):
    torch._dynamo.reset()
    model = tiny_model("llama", layers=1)
    ids = token_batches(1)[0]
    backend = qpass.backend("w8a8_dynamic")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        ref = compiled(ids, use_cache=False).logits
    assert backend.release_weights(model) > 0
    layer = model.model.layers[0].mlp.down_proj
    message = r"model\.layers\.0\.\S+ were released by QPassBackend\.release_weights\(\); {} needs them"
    cases = {
        "calling the module": lambda: layer(torch.zeros(1, 96)),
        r"state_dict\(\)": lambda: torch.save(model.state_dict(), tmp_path / "sd.pt"),
        "deepcopy": lambda: copy.deepcopy(model),
        r"moving or casting the module \(\.to\(\), \.float\(\), \.cuda\(\)\)": lambda: model.to(torch.float64),
    }
    for what, fn in cases.items():
        with pytest.raises(RuntimeError, match=message.format(what)):
            fn()
    with pytest.raises(RuntimeError, match=message.format("deepcopy")):
        copy.deepcopy(layer.weight)
    for obj, name in [(layer.weight, "w.pt"), (model, "model.pt"), ({"w": layer.weight}, "dict.pt")]:
        with pytest.raises(RuntimeError, match=message.format(r"pickling \(torch\.save\)")):
            torch.save(obj, tmp_path / name)
    assert sorted(tmp_path.iterdir()) == []  # no file, not a truncated one (torch.save creates it first)
    # a direct read of a released tensor raises too: hooks on the model lend the parameters their
    # class back for each call through the compiled wrapper, whose guards check it
    assert layer.weight.qpass_released == "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(RuntimeError, match=r"down_proj\.weight were released .*; reading its values \(sum\)"):
        layer.weight.sum()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # .to() refused before touching anything
    with torch.no_grad():  # and the compiled model runs on, without a recompile
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, ref, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match=message.format("calling the module")):
            model(ids, use_cache=False)  # the model itself, not compiled
    assert backend.report.graphs == 1 and isinstance(layer.weight, qpass.ReleasedParameter)


def test_released_weights_of_a_qpass_compile_model_raise_on_every_read(tmp_path):
    """Through ``qpass.compile`` a released parameter changes class between calls: every read of
    its values raises, its metadata still answers, and the compiled model runs on unchanged."""
    torch._dynamo.reset()
    model = tiny_model("llama", layers=1)
    ids = token_batches(1)[0]
    backend = qpass.compile(model, "w8a8_dynamic", dynamic=False)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    n_params = sum(p.numel() for p in model.parameters())
    assert backend.release_weights(model) > 0
    w = model.model.layers[0].mlp.down_proj.weight
    assert isinstance(w, qpass.ReleasedParameter) and isinstance(w, torch.nn.Parameter)
    assert (w.shape, w.dtype, w.numel(), w.device.type) == ((64, 96), torch.float32, 64 * 96, "cpu")
    assert sum(p.numel() for p in model.parameters()) == n_params and model.dtype == torch.float32
    message = (r"the fp32 weights of model\.layers\.0\.mlp\.down_proj\.weight were released by "
               r"QPassBackend\.release_weights\(\); reading its values \({}\) needs them")
    reads = {
        "sum": lambda: w.sum(), "__repr__": lambda: print(w), "__format__": lambda: f"{w}",
        "__float__": lambda: float(w), "add": lambda: w + 1,
        "mul": lambda: torch.mul(torch.ones(1), w), "numpy": lambda: w.numpy(), "tolist": lambda: w.tolist(),
        "data": lambda: w.data, "detach": lambda: w.detach(), "__getitem__": lambda: w[0], "__eq__": lambda: w == 0,
        "linear": lambda: torch.nn.functional.linear(torch.zeros(1, 96), w), "isnan": lambda: torch.isnan(w),
    }
    for what, read in reads.items():
        with pytest.raises(RuntimeError, match=message.format(what)):
            read()
    with pytest.raises(RuntimeError, match=r"pickling \(torch\.save\)"):
        torch.save(w, tmp_path / "w.pt")
    with torch.no_grad():  # the compiled model runs on, without a recompile
        torch.testing.assert_close(model(ids, use_cache=False).logits, ref, rtol=0, atol=0)
    assert backend.report.graphs == 1 and isinstance(w, qpass.ReleasedParameter)


# -- grad mode ---------------------------------------------------------------------------------

def test_compiling_with_grad_enabled_is_refused():
    torch._dynamo.reset()
    model = tiny_model("llama", layers=1)
    compiled = torch.compile(model, backend=qpass.backend("w8a8_dynamic", inductor=False), dynamic=False)
    with pytest.raises(Exception, match=r"inference only .* torch\.no_grad\(\) or torch\.inference_mode\(\)"):
        compiled(token_batches(1)[0], use_cache=False)
    torch._dynamo.reset()
    with torch.inference_mode():
        compiled(token_batches(1)[0], use_cache=False)


# -- arguments ---------------------------------------------------------------------------------

def test_backend_takes_a_preset_name():
    assert qpass.backend("w8a8_static").config == qpass.preset("w8a8_static")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: qpass.backend(42), r"config must be a qpass.QuantConfig or a preset name, got int"),
        (lambda: qpass.backend(qpass.QuantConfig(), calibration={}), r"calibration must be a qpass.Calibration, got dict"),
        (lambda: qpass.backend(inductor="yes"), r"inductor must be a bool, got str"),
        (lambda: qpass.backend(inductor_config=["cpp_wrapper"]), r"inductor_config must be a mapping of Inductor settings, got list"),
        (lambda: qpass.backend(graph_constants=1), r"graph_constants must be a bool, got int"),
        (lambda: qpass.backend().bind("model"), r"bind: expected an nn.Module, got str"),
        (lambda: qpass.QuantConfig(weight="int8"), r"QuantConfig.weight must be a qpass.QuantSpec or None, got 'int8'"),
        (lambda: qpass.QuantConfig(skip="lm_head"), r"QuantConfig.skip must be a tuple of module paths"),
        (lambda: qpass.QuantConfig(lower=1), r"QuantConfig.lower must be a bool"),
        (lambda: qpass.QuantSpec("int8", qpass.PerToken(), symmetric=0), r"QuantSpec.symmetric must be a bool"),
        (lambda: qpass.OutlierSplit(common_size=1), r"OutlierSplit.common_size must be a bool, got 1"),
    ],
)
def test_wrong_argument_types_raise_type_error(call, message):
    with pytest.raises(TypeError, match=message):
        call()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: qpass.Smoothing(alpha=True), r"Smoothing.alpha must be in \[0, 1\], 'auto' or 'learned', got True"),
        (lambda: qpass.Smoothing(alpha=float("nan")), r"Smoothing.alpha must be in \[0, 1\]"),
        (lambda: qpass.PerGroup(True), r"PerGroup.group_size must be a positive int, got True"),
        (lambda: qpass.OutlierSplit(threshold=None, top_k=True), r"OutlierSplit.top_k must be a positive int"),
    ],
)
def test_bools_are_not_numbers(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_unknown_inductor_setting_raises_at_construction():
    with pytest.raises(ValueError, match=r"inductor_config names no Inductor setting: 'cpp_wraper'"):
        qpass.backend(inductor_config={"cpp_wraper": True})


def test_skip_pattern_matching_nothing_warns_once(caplog):
    torch._dynamo.reset()
    model = tiny_model("llama", layers=1)
    backend = qpass.backend(qpass.preset("w8a8_dynamic", skip=("lm_heaad", "*.mlp.down_proj")), inductor=False)
    with caplog.at_level(logging.WARNING, logger="qpass"):
        _compile(model, backend, token_batches(1)[0])
        _compile(model, backend, token_batches(1, seq=8)[0])  # a second graph: no second warning
    warnings = [r.getMessage() for r in caplog.records if "match no linear" in r.getMessage()]
    assert warnings == [
        "qpass: skip pattern(s) 'lm_heaad' match no linear of the compiled graph (8 linears, e.g. "
        "model.layers.0.self_attn.q_proj); check the spelling"
    ]
    assert backend.report.rows["lm_head"].weight.startswith("int8")  # what the typo cost, visible in the report
