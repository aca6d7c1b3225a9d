"""qpass's constants are constants of the compiled graph, not inputs passed on every call, and
Inductor's cache binds each model's own constants (``backend.compile_inductor``)."""

import pickle

import pytest
import torch
from torch._dynamo.utils import counters

import qpass
from qpass.graph import constants
from tests.models import tiny_model, token_batches


def _spy_inner(monkeypatch) -> list[tuple[int, int]]:
    """(placeholders, tensor constants) of each graph AOTAutograd hands to Inductor."""
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
def test_constants_are_not_graph_inputs(monkeypatch, preset):
    seen = _spy_inner(monkeypatch)
    model = tiny_model("llama", layers=2)
    calib = qpass.calibrate(model, token_batches(2), progress=False)
    backend = qpass.backend(preset, calibration=calib)
    ids = token_batches(1)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    (gm,) = backend.graphs
    consts = constants(gm)
    assert len(consts) >= 14  # 7 linears' integers and scales at least
    assert all(t.is_mkldnn for t in gm.buffers())  # oneDNN's packed weights stay inputs (not picklable)
    assert all(isinstance(t, torch.Tensor) for t in consts.values())
    dynamo_inputs = sum(n.op == "placeholder" for n in gm.graph.nodes)
    # the compiled graph takes Dynamo's inputs (and oneDNN's packed weights) only: qpass's other
    # tensors are its constants
    ((inputs, traced_consts),) = seen
    assert inputs == dynamo_inputs + len(list(gm.buffers())) and traced_consts >= 14


def test_cache_hit_binds_each_models_own_constants(monkeypatch, tmp_path):
    """Two models of the same shapes compile to the same code: the second compile is an FX graph
    cache hit, and it must run the second model's weights, not the first one's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    seen = _spy_inner(monkeypatch)
    ids = token_batches(1)[0]
    outs, refs = [], []
    counters.clear()
    for seed in (0, 1):
        torch._dynamo.reset()
        model = tiny_model("llama", layers=1, seed=seed)
        backend = qpass.backend("w8a8_dynamic", inductor_config={"fx_graph_cache": True})
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
