"""In decode graphs qpass's tensors are constants of the compiled graph, not inputs passed on every
call, and Inductor's cache binds each model's own constants (``backend.compile_inductor``)."""

import copy
import pickle

import pytest
import torch
from torch._dynamo.utils import counters

import qpass
from qpass.graph import constants
from tests.models import tiny_model, token_batches


def _spy_inner(monkeypatch) -> list[tuple[int, int]]:
    """(placeholders, tensor constants) of each decode graph AOTAutograd hands to Inductor."""
    from torch._inductor import compile_fx as inductor_compile_fx

    seen, real = [], inductor_compile_fx.compile_fx_inner

    def spy(gm, inputs, **kwargs):
        nodes = gm.graph.nodes
        seen.append((sum(n.op == "placeholder" for n in nodes),
                     sum(n.op == "get_attr" and isinstance(getattr(gm, n.target), torch.Tensor) for n in nodes)))
        return real(gm, inputs, **kwargs)

    monkeypatch.setattr(inductor_compile_fx, "compile_fx_inner", spy)
    return seen


@pytest.mark.parametrize("preset", ["w8a8_dynamic", "w8a8_static"])
def test_decode_graph_takes_its_constants_as_constants(monkeypatch, preset):
    seen = _spy_inner(monkeypatch)
    model = tiny_model("llama", layers=1)
    calib = qpass.calibrate(model, token_batches(2), progress=False)
    backend = qpass.backend(preset, calibration=calib)
    prompt = token_batches(1)[0][:1, :4]  # a short prompt: fewer tokens than the decode kernels take
    fn = torch.compile(model.forward, backend=backend, dynamic=False)
    with torch.no_grad():
        for ids in (prompt, prompt[:, :1]):
            ref = model(ids, use_cache=False).logits
            out = fn(ids, use_cache=False).logits
            assert ((out - ref).norm() / ref.norm()).item() < 0.05
    prefill, decode = backend.graphs
    # a prompt's graph: qpass's tensors are buffers, which AOTAutograd lifts to inputs (and its cache keeps)
    # (one layer of 7 linears: at least 6 constants in every graph, measured 6 for w8a8_static)
    assert len(constants(prefill)) >= 6 and set(constants(prefill)) == {n for n, _ in prefill.named_buffers()}
    # one token per sequence: plain attributes but oneDNN's packed weights (Inductor's cache cannot pickle those)
    consts = constants(decode)
    assert len(consts) >= 6 and all(t.is_mkldnn for t in decode.buffers())
    # so the compiled decode graph takes Dynamo's inputs (and oneDNN's packed weights) only
    ((inputs, traced_consts),) = seen
    assert inputs == sum(n.op == "placeholder" for n in decode.graph.nodes) + len(list(decode.buffers()))
    assert traced_consts >= 6


def test_cache_hit_binds_each_models_own_constants(monkeypatch, tmp_path):
    """Two models with the same scales compile to the same decode code (the second one's linear
    weights are the first one's negated): the second compile is an FX graph cache hit, and it must
    run the second model's weights, not the first one's. The reference path, whose graph holds
    nothing but tensors on every CPU kind (FBGEMM's packed-weight handles differ per model, so
    they never share an entry)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    seen = _spy_inner(monkeypatch)
    ids = token_batches(1)[0][:1, :1]
    outs, refs = [], []
    counters.clear()
    model = tiny_model("llama", layers=1)
    negated = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in negated.model.layers.named_parameters():
            if p.dim() == 2:
                p.neg_()
    for model in (model, negated):
        torch._dynamo.reset()
        backend = qpass.backend(qpass.preset("w8a8_dynamic", lower=False), inductor_config={"fx_graph_cache": True})
        with torch.no_grad():
            refs.append(model(ids, use_cache=False).logits)
            outs.append(torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits)
    assert len(seen) == 2 and counters["inductor"]["fxgraph_cache_miss"] == 1
    assert counters["inductor"]["fxgraph_cache_hit"] == 1
    for out, ref, other in zip(outs, refs, refs[::-1]):
        assert ((out - ref).norm() / ref.norm()).item() < 0.05
        assert ((out - other).norm() / other.norm()).item() > 0.5
    # the entry holds no copy of the weights, only their names: a hit binds the graph's own tensors
    (entry,) = [f for f in (tmp_path / "fxgraph").rglob("*") if f.is_file()]
    with open(entry, "rb") as f:
        graph = pickle.load(f)
    assert not graph.constants and len(graph.frozen_param_names) >= 7


def test_graph_constants_off_keeps_decode_tensors_inputs(monkeypatch):
    seen = _spy_inner(monkeypatch)
    model = tiny_model("llama", layers=1)
    backend = qpass.backend("w8a8_dynamic", graph_constants=False)
    ids = token_batches(1)[0][:1, :1]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    (gm,) = backend.graphs
    assert len(constants(gm)) >= 7 and set(constants(gm)) == {n for n, _ in gm.named_buffers()}
    assert seen == []  # Inductor's own compile path, not the constants one
