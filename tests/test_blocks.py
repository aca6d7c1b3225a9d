"""Prompt graphs compile one decoder block at a time (``qpass.blocks``): identical blocks share one
Inductor compile through its FX graph cache, and the pieces compute what the whole graph does."""

from __future__ import annotations

import importlib

import expecttest
import pytest
import torch
from torch import fx
from torch._dynamo.utils import counters

import qpass
from qpass import blocks
from tests.models import ARCHS, DENSE_ARCHS, MOE_ARCHS, tiny_model, token_batches

backend_module = importlib.import_module("qpass.backend")  # ``qpass.backend`` is also the function


def _node_in(path: str | None) -> fx.Node:
    node = fx.Graph().call_function(torch.relu, ())
    if path is not None:
        node.meta["nn_module_stack"] = {"a": ("L['self'].model", object), "b": (path, object)}
    return node


@pytest.mark.parametrize("path, block", [
    ("L['self'].model.layers.3.mlp.down_proj", ("L['self'].model.layers", 3)),
    ("L['self'].model.layers.12", ("L['self'].model.layers", 12)),
    ("L['self'].model.layers[3].self_attn", ("L['self'].model.layers", 3)),  # item access
    ("getattr(L['self'].transformer.h, '7').attn", ("L['self'].transformer.h", 7)),
    ("L['self'].model.layers.2.mlp.experts.5.w1", ("L['self'].model.layers", 2)),  # the shallowest list: the layer
    ("L['self'].model.layers2.norm", None),  # a digit in a name is no index
    ("L['self'].model.norm", None),
    (None, None),
])
def test_a_nodes_block_is_the_shallowest_module_list_item_on_its_stack(path, block):
    assert blocks.block_of(_node_in(path)) == block


def _dynamo_graph(model, ids) -> fx.GraphModule:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(ids, use_cache=False)
    (gm,) = graphs
    return gm


def test_pieces_follow_the_blocks_in_order_and_never_read_a_later_piece():
    model = tiny_model("llama", layers=3)
    gm = _dynamo_graph(model, token_batches(1)[0])
    pieces = blocks.partition(gm)
    for node, piece in pieces.items():
        assert all(pieces.get(a, 0) <= piece for a in node.all_input_nodes), node
        if (block := blocks.block_of(node)) is not None:
            assert piece == 2 * block[1] + 2, (node, block)
    used = sorted(set(pieces.values()))
    # embedding and rotary before the blocks, the final norm and lm_head after them
    assert used == [0, 2, 4, 6, 7], used
    lm_head = next(n for n in gm.graph.nodes if n.op == "call_function" and "lm_head" in str(n.meta.get("nn_module_stack")))
    assert pieces[lm_head] == 7


@pytest.mark.parametrize("arch", [*ARCHS, *DENSE_ARCHS, *MOE_ARCHS])
def test_every_architectures_layers_are_its_blocks(arch):
    """``model.layers.N``, ``transformer.h.N``, ``model.decoder.layers.N``; DeepSeek-V3's dense
    first layer and MoE layers alike: each layer one piece, in order, reading only earlier pieces."""
    gm = _dynamo_graph(tiny_model(arch, layers=3), token_batches(1)[0])
    pieces = blocks.partition(gm)
    assert pieces is not None
    layers = set()
    for node, piece in pieces.items():
        assert all(pieces.get(a, 0) <= piece for a in node.all_input_nodes), node
        if (block := blocks.block_of(node)) is not None:
            assert piece == 2 * block[1] + 2, (node, block)
            layers.add(block)
    assert sorted(i for _, i in layers) == [0, 1, 2] and len({path for path, _ in layers}) == 1, layers


def test_a_graph_of_one_block_is_not_split():
    gm = _dynamo_graph(tiny_model("llama", layers=1), token_batches(1)[0])
    assert blocks.partition(gm) is None
    assert blocks.compile_by_block(gm, lambda sub, inputs: pytest.fail("compiled a piece")) is None


def _compiled_logits(model, ids, calib, config="w8a8_dynamic", **backend_kwargs):
    torch._dynamo.reset()
    counters.clear()
    backend = qpass.backend(config, calibration=calib, inductor_config={"fx_graph_cache": True}, **backend_kwargs)
    with torch.no_grad():
        return torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ["gpt2", "qwen2_moe"])
def test_the_pieces_compute_the_whole_graph_on_other_architectures(arch, monkeypatch, tmp_path):
    """GPT-2 (Conv1D, ``transformer.h``) and a mixture of experts (routed and shared experts). The
    whole rewritten graph runs eagerly here (the same ops; the Llama test above compares the two
    Inductor compiles exactly), so the bound is Inductor's float summation order."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = tiny_model(arch, layers=2)
    ids, calib = token_batches(1)[0], qpass.calibrate(model, token_batches(2))
    split = _compiled_logits(model, ids, calib)
    # four pieces: before the blocks, layers.0, layers.1 (layers.0's entry), after the blocks
    assert (counters["inductor"]["fxgraph_cache_miss"], counters["inductor"]["fxgraph_cache_hit"]) == (3, 1)
    torch.testing.assert_close(split, _compiled_logits(model, ids, calib, inductor=False), rtol=1e-5, atol=1e-5)


def test_identical_blocks_share_one_compile_and_the_pieces_compute_the_whole_graph(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama", layers=3)
    ids, calib = token_batches(1)[0], qpass.calibrate(model, token_batches(2))
    whole = _compiled_logits(model, ids, calib, by_block=False)
    assert counters["inductor"]["fxgraph_cache_miss"] == 1
    split = _compiled_logits(model, ids, calib)
    # before the blocks, layers.0 and after the blocks compile; layers.1 and 2 are layers.0's entry
    assert counters["inductor"]["fxgraph_cache_miss"] == 3, dict(counters["inductor"])
    assert counters["inductor"]["fxgraph_cache_hit"] == 2, dict(counters["inductor"])
    # each piece applies its own block's weights and scales: the values are the whole graph's
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


def test_outlier_splits_of_a_common_size_share_one_block_compile(monkeypatch, tmp_path):
    """llm_int8's ratio rule keeps 18, 21 and 25 of the tiny Llama's down_proj input channels in
    float (``test_quantize``: no two blocks alike, so each would compile its own graph). The role's
    common size (the default) gives every block 25: one block compiles, the other two are its cache
    entry."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama", layers=3)
    ids, calib = token_batches(1)[0], qpass.calibrate(model, token_batches(4))
    _compiled_logits(model, ids, calib, "llm_int8")
    assert (counters["inductor"]["fxgraph_cache_miss"], counters["inductor"]["fxgraph_cache_hit"]) == (3, 2)


def test_decode_steps_compile_whole_and_generation_matches_the_unsplit_backend(monkeypatch):
    """Generation through the split backend (prompts of two lengths: the second prompt graph has
    dynamic shapes) gives the tokens of the same rewritten graphs run whole and eagerly, and the
    scores up to Inductor's float summation order; only prompt graphs are split."""
    calls = []
    real = backend_module.compile_by_block
    monkeypatch.setattr(backend_module, "compile_by_block",
                        lambda gm, compile_piece: calls.append(gm) or real(gm, compile_piece))
    model = tiny_model("llama", layers=2)
    calib = qpass.calibrate(model, token_batches(2))
    config = qpass.preset("w8a8_dynamic", smoothing=qpass.Smoothing(alpha=0.5))
    outs = []
    for inductor in (True, False):
        torch._dynamo.reset()
        backend = qpass.backend(config, calibration=calib, inductor=inductor).bind(model)
        model.forward = torch.compile(type(model).forward.__get__(model), backend=backend)
        with torch.no_grad():
            outs.append([model.generate(token_batches(1, batch=1, seq=seq)[0], max_new_tokens=2, do_sample=False,
                                        cache_implementation="static", output_scores=True,
                                        return_dict_in_generate=True) for seq in (7, 11)])
        del model.forward
    # the prompt graphs of the Inductor backend, not its decode steps
    assert len(calls) == 2, len(calls)
    assert any(isinstance(n.meta.get("example_value"), torch.SymInt) for n in calls[1].graph.nodes if n.op == "placeholder")
    for split, whole in zip(*outs):
        assert torch.equal(split.sequences, whole.sequences)
        for a, b in zip(split.scores, whole.scores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_by_block_must_be_a_bool():
    with pytest.raises(TypeError, match="by_block must be a bool, got str"):
        qpass.backend("w8a8_dynamic", by_block="yes")


class PiecesSnapshot(expecttest.TestCase):
    def test_tiny_llama_pieces(self):
        """Which modules each piece of a 2-layer Llama's graph holds (module paths as qpass reports them)."""
        gm = _dynamo_graph(tiny_model("llama", layers=2), token_batches(1)[0])
        modules: dict[int, set[str]] = {}
        for node, piece in blocks.partition(gm).items():
            block = blocks.block_of(node)
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            path = f"{block[0]}.{block[1]}" if block else (str(stack[-1][0]) if stack else "(the model's forward)")
            modules.setdefault(piece, set()).add(path.replace("L['self'].", ""))
        self.assertExpectedInline("\n".join(f"{p}: {', '.join(sorted(m))}" for p, m in sorted(modules.items())), """\
0: model, model.embed_tokens, model.rotary_emb
2: model.layers.0
4: model.layers.1
5: (the model's forward), lm_head, model.norm""")


def test_a_weight_only_heads_dequantization_runs_in_the_heads_piece():
    """What is computed from constants alone (the int8 ``lm_head``'s dequantization, fused into its
    reduction) runs in the piece that reads it: from an earlier piece the whole float weight would
    be materialised and handed on at every call."""
    model = tiny_model("llama", layers=2)
    config = qpass.preset("w8a8_dynamic").replace(weight_only=("lm_head",))
    backend = qpass.backend(config, calibration=qpass.calibrate(model, token_batches(2), progress=False), inductor=False)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(token_batches(1, batch=1)[0], use_cache=False, logits_to_keep=1)
    gm = backend.graphs[0]
    pieces = blocks.partition(gm)
    head = [n for n in gm.graph.nodes if n.op == "get_attr" and gm.qpass_names.get(n.target, "").startswith("lm_head")]
    assert len(head) >= 2  # the int8 weight and its scales
    readers = {pieces[u] for n in head for u in n.users}
    assert readers == {max(pieces.values())}
