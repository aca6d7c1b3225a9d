"""The backend's contract: entry points, no global side effects, user model untouched."""

import pytest
import torch

import qpass
from qpass import patterns
from tests.models import tiny_model, token_batches


def _config_snapshot():
    return (
        dict(torch._inductor.config.get_config_copy()),
        dict(torch._dynamo.config.get_config_copy()),
        torch._functorch.config.get_config_copy(),
    )


def test_registered_backend_and_default_function():
    from qpass import qpass as default_backend

    model = tiny_model("llama", layers=1)
    ids = token_batches(1)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out_named = torch.compile(model, backend="qpass", dynamic=False)(ids, use_cache=False).logits
        torch._dynamo.reset()
        out_fn = torch.compile(model, backend=default_backend, dynamic=False)(ids, use_cache=False).logits
    # default: w8a8 per-token dynamic, no smoothing without calibration
    for out in (out_named, out_fn):
        assert 0 < ((out - ref).norm() / ref.norm()).item() < 0.05
    torch.testing.assert_close(out_named, out_fn)


def test_no_global_config_change_and_model_untouched():
    before = _config_snapshot()
    model = tiny_model("llama", layers=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: v.data_ptr() for k, v in model.named_parameters()}
    calib = qpass.calibrate(model, token_batches(2))
    backend = qpass.backend(qpass.preset("w8a8_static"), calibration=calib)
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(token_batches(1)[0], use_cache=False)
    assert _config_snapshot() == before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {k: v.data_ptr() for k, v in model.named_parameters()} == params


def test_eager_model_still_works_after_compile():
    model = tiny_model("llama", layers=1)
    ids = token_batches(1)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.clone()
        calib = qpass.calibrate(model, token_batches(2))
        torch.compile(model, backend=qpass.backend(qpass.preset("w8a8_dynamic"), calibration=calib))(ids, use_cache=False)
        torch.testing.assert_close(model(ids, use_cache=False).logits, ref, rtol=0, atol=0)


def test_report_prints_a_row_per_linear():
    model = tiny_model("opt", layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    backend = qpass.backend(qpass.preset("w8a8_dynamic"), calibration=calib, inductor=False)
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(token_batches(1)[0], use_cache=False)
    text = str(backend.report)
    fc2 = next(line for line in text.splitlines() if line.startswith("model.decoder.layers.0.fc2 "))
    assert fc2.split()[1:3] == ["relu-act", "model.decoder.layers.0.fc1"], fc2
    assert "folded patterns: linear-linear: 1, linear-norm: 2, relu-act: 1" in text
    assert len(backend.report.rows) == 7


class _Renamed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 8)

    def forward(this, x):  # noqa: N805 - the root argument's name must not matter
        return this.proj(x)


def test_module_paths_do_not_depend_on_the_root_argument_name():
    """Dynamo names the root ``L['this']`` here; the calibration calls the layer ``proj``."""
    torch.manual_seed(0)
    model = _Renamed().eval()
    x = torch.randn(2, 5, 16)
    calib = qpass.calibrate(model, [x])
    config = qpass.preset("w8a8_static", smoothing=None, dynamic_fallback=None)  # the static scale needs the path
    backend = qpass.backend(config, calibration=calib, inductor=False)
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(x)
    assert list(backend.report.rows) == ["proj"]
    assert backend.report.rows["proj"].activation.startswith("int8 per-tensor static")


def test_graph_break_compiles_each_graph():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def forward(self, x):
            y = self.a(self.norm(x))
            torch._dynamo.graph_break()
            return self.b(self.norm(y))

    torch.manual_seed(0)
    model = Broken().eval()
    x = torch.randn(2, 5, 16)
    calib = qpass.calibrate(model, [x])
    backend = qpass.backend(qpass.QuantConfig(weight=None, activation=None, skip=()), calibration=calib, inductor=False)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert backend.report.graphs == 2
    # the norm is shared across the break: in each graph it feeds one linear and is folded there
    assert backend.report.rows["a"].smoothing == "linear-norm"


def test_pattern_examples_fold_exactly():
    """Each pattern module's Example exhibits its pattern; the fold keeps the function."""
    kinds = {"linear_norm": "linear-norm", "linear_linear": "linear-linear", "gated_act": "gated-act",
             "relu_act": "relu-act", "experts": "gated-act"}
    for module in patterns.PATTERNS:
        torch._dynamo.reset()
        torch.manual_seed(0)
        example = module.Example().eval()
        first = next(getattr(example, n) for n in ("q", "fc1", "gate") if hasattr(example, n))
        x = torch.randn(2, 6, first.in_features)
        x[..., 0] *= 30  # an outlier channel
        calib = qpass.calibrate(example, [x])
        backend = qpass.backend(qpass.QuantConfig(weight=None, activation=None, skip=()), calibration=calib, inductor=False)
        with torch.no_grad():
            out = torch.compile(example, backend=backend, dynamic=False)(x)
            torch.testing.assert_close(out, example(x), rtol=1e-5, atol=1e-5)
        name = module.__name__.rsplit(".", 1)[1]
        assert backend.report.counts()[kinds[name]] >= 1, (name, backend.report.counts())


def test_release_weights_keeps_compiled_model_and_guards_the_rest():
    """``release_weights`` frees the fp32 weights the compiled graph no longer reads; the compiled
    model still computes the same logits, the module itself and a recompile raise naming the layer."""
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(2))
    backend = qpass.backend(qpass.preset("w8a8_dynamic"), calibration=calib)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    ids = token_batches(1, batch=1, seq=24, seed=3)[0]
    down = model.model.layers[0].mlp.down_proj.weight
    embed = model.model.embed_tokens.weight
    with torch.no_grad():
        before = compiled(ids, use_cache=False).logits
        freed = backend.release_weights(model)
        after = compiled(ids, use_cache=False).logits
    quantized = [n for n, p in model.named_parameters() if n.endswith("proj.weight")]
    assert len(quantized) == 14 and set(quantized) <= set(model.qpass_released)
    assert "model.embed_tokens.weight" not in model.qpass_released  # still read (and tied to lm_head)
    assert freed >= sum(p.numel() * 4 for n, p in model.named_parameters() if n in quantized)
    # the fp32 storage is gone: the tensor now maps NaN pages (nothing resident until read), which
    # only a read past its class sees (a plain read raises, tests/test_bad_input.py)
    with torch._C.DisableTorchFunctionSubclass():
        assert torch.isnan(down).all() and down.qpass_released and torch.isfinite(embed).all()
    assert torch.equal(before, after) and backend.report.graphs == 1
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.\S+ were released"):
        model(ids, use_cache=False)
    with pytest.raises(Exception, match="released by QPassBackend.release_weights"):
        with torch.no_grad():
            compiled(token_batches(1, batch=1, seq=9)[0], use_cache=False)
    assert backend.release_weights(model) == 0  # nothing left to release


def test_static_cache_decode_keeps_cache_writes():
    """A decode step with transformers' StaticCache writes the new K/V into the cache in place
    (``index_copy_``, result unused): the rewritten graph must keep those writes. Smoothing only,
    so the logits and the cache must equal eager's."""
    import transformers

    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(2))
    prompt, token = token_batches(1, batch=1, seq=12, seed=4)[0], token_batches(1, batch=1, seq=1, seed=5)[0]

    def step(fn):
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(12))
            logits = fn(token, past_key_values=cache, use_cache=True, cache_position=torch.tensor([12])).logits
        return logits, [layer.keys.clone() for layer in cache.layers] + [layer.values.clone() for layer in cache.layers]

    ref, ref_cache = step(model)
    backend = qpass.backend(qpass.QuantConfig(weight=None, activation=None), calibration=calib)
    out, out_cache = step(torch.compile(model, backend=backend, dynamic=False))
    assert sum(backend.report.counts().values()) > 0  # something was folded
    assert ((out - ref).abs().max() / ref.abs().max()) < 1e-5
    for a, b in zip(out_cache, ref_cache):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _seen_at_compile(monkeypatch, read) -> list:
    """``read(torch._inductor.config)`` at each of Inductor's ``compile_fx`` calls, in order."""
    from torch._inductor import compile_fx as inductor_compile_fx

    seen, real = [], inductor_compile_fx.compile_fx

    def spy(*args, **kwargs):
        seen.append(read(torch._inductor.config))
        return real(*args, **kwargs)

    monkeypatch.setattr(inductor_compile_fx, "compile_fx", spy)
    return seen


def test_inductor_config_compiles_with_the_cpp_wrapper(monkeypatch):
    """``inductor_config`` is patched around each compile of the backend's graphs (and only there):
    Inductor's C++ wrapper around the int8 kernel ops (oneDNN at prefill, FBGEMM at decode here),
    prefill and a decode step, gives the logits of the same lowered graphs run eagerly."""
    from qpass.passes import lower

    seen = _seen_at_compile(monkeypatch, lambda config: config.cpp_wrapper)
    model = tiny_model("llama", layers=1)
    calib = qpass.calibrate(model, token_batches(2), progress=False)
    prompt = token_batches(1, batch=1, seq=lower.DECODE_M + 4, seed=3)[0]  # oneDNN at prefill
    runs = []
    for settings in (None, {"cpp_wrapper": True}):
        torch._dynamo.reset()
        backend = qpass.backend("w8a8_dynamic", calibration=calib, inductor_config=settings, inductor=bool(settings))
        fn = torch.compile(model.forward, backend=backend, dynamic=False)
        with torch.no_grad():
            out = fn(prompt, use_cache=True)
            step = fn(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        runs.append((out.logits, step.logits, {k for r in backend.report.rows.values() for k in r.kernels}))
    assert seen == [True, True] and not torch._inductor.config.cpp_wrapper
    assert {k.split(" (")[0] for k in runs[1][2]} == {"onednn", "fbgemm"}  # a grid note without VNNI
    assert runs[1][2] == runs[0][2]
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-5)


def test_qpass_graphs_compile_without_masked_tail_vectorization(monkeypatch):
    """``INDUCTOR_DEFAULTS`` hold while qpass's graphs compile, the user's ``inductor_config`` wins
    over them, and the global setting is left as it was."""
    seen = _seen_at_compile(monkeypatch, lambda config: config.cpp.enable_loop_tail_vec)
    model = tiny_model("llama", layers=1)
    ids = token_batches(1)[0]
    before = torch._inductor.config.cpp.enable_loop_tail_vec
    for settings in (None, {"cpp.enable_loop_tail_vec": True}):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=qpass.backend(inductor_config=settings), dynamic=False)(ids, use_cache=False)
    assert seen == [False, True] and torch._inductor.config.cpp.enable_loop_tail_vec == before
