"""Snapshots of rewritten graphs, printed by qpass.format_graph (positions, module paths,
dtypes and shapes; no PyTorch node names). Accept changes with EXPECTTEST_ACCEPT=1,
read the diff, and commit it with the change that caused it. Each snapshot has a
numerical twin in test_smoothing.py / test_quantize.py."""

import os
from pathlib import Path

import expecttest
import pytest
import torch

import qpass
from tests.models import TINY_PRESETS, tiny_model, token_batches


def _graph(arch: str, config: qpass.QuantConfig) -> str:
    torch._dynamo.reset()
    model = tiny_model(arch, layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    backend = qpass.backend(config.replace(lower=False), calibration=calib, inductor=False)
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(token_batches(1, batch=1, seq=8)[0], use_cache=False)
    assert len(backend.graphs) == 1
    return qpass.format_graph(backend.graphs[0])


SMOOTH = qpass.QuantConfig(weight=None, activation=None)


class TestSmoothingSnapshots(expecttest.TestCase):
    def test_llama(self):
        self.assertExpectedInline(_graph("llama", SMOOTH), """\
const layers.0.input_layernorm.weight : f32[64]
const layers.0.self_attn.q_proj.weight : f32[64,64]
const layers.0.self_attn.k_proj.weight : f32[32,64]
const layers.0.self_attn.v_proj.weight : f32[32,64]
const layers.0.self_attn.o_proj.weight : f32[64,64]
const layers.0.post_attention_layernorm.weight : f32[64]
const layers.0.mlp.gate_proj.weight : f32[96,64]
const layers.0.mlp.up_proj.weight : f32[96,64]
const layers.0.mlp.down_proj.weight : f32[64,96]
%23 = embedding(%0, param embed_tokens.weight, None, None, 2.0, False, False) : f32[1,8,64]
%55 = .to(param rotary_emb.inv_freq, device=device(type='cpu'), dtype=f32) : f32[8]
%71 = mul(const layers.0.input_layernorm.weight, %70) : f32[1,8,64]
%72 = linear(%71, const layers.0.self_attn.q_proj.weight, None) : f32[1,8,64]
%75 = linear(%71, const layers.0.self_attn.k_proj.weight, None) : f32[1,8,32]
%78 = linear(%71, const layers.0.self_attn.v_proj.weight, None) : f32[1,8,32]
%109 = linear(%108, const layers.0.self_attn.o_proj.weight, None) : f32[1,8,64]
%118 = mul(const layers.0.post_attention_layernorm.weight, %117) : f32[1,8,64]
%119 = linear(%118, const layers.0.mlp.gate_proj.weight, None) : f32[1,8,96]
%121 = linear(%118, const layers.0.mlp.up_proj.weight, None) : f32[1,8,96]
%123 = linear(%122, const layers.0.mlp.down_proj.weight, None) : f32[1,8,64]
%132 = mul(param norm.weight, %131) : f32[1,8,64]
%134 = linear(%133, param lm_head.weight, None) : f32[1,8,128]
""")

    def test_opt(self):
        self.assertExpectedInline(_graph("opt", SMOOTH), """\
const layers.0.self_attn_layer_norm.weight : f32[64]
const layers.0.self_attn_layer_norm.bias : f32[64]
const layers.0.self_attn.q_proj.weight : f32[64,64]
const layers.0.self_attn.k_proj.weight : f32[64,64]
const layers.0.self_attn.v_proj.weight : f32[64,64]
const layers.0.self_attn.v_proj.bias : f32[64]
const layers.0.self_attn.out_proj.weight : f32[64,64]
const layers.0.final_layer_norm.weight : f32[64]
const layers.0.final_layer_norm.bias : f32[64]
const layers.0.fc1.weight : f32[96,64]
const layers.0.fc1.bias : f32[96]
const layers.0.fc2.weight : f32[64,96]
%34 = embedding(%33, param embed_tokens.weight, 0, None, 2.0, False, False) : f32[1,8,64]
%42 = embedding(%41, param embed_positions.weight, None, None, 2.0, False, False) : f32[1,8,64]
%45 = layer_norm(%44, (64,), const layers.0.self_attn_layer_norm.weight, const layers.0.self_attn_layer_norm.bias, 1e-05) : f32[1,8,64]
%46 = linear(%45, const layers.0.self_attn.q_proj.weight, param layers.0.self_attn.q_proj.bias) : f32[1,8,64]
%50 = linear(%45, const layers.0.self_attn.k_proj.weight, param layers.0.self_attn.k_proj.bias) : f32[1,8,64]
%51 = linear(%45, const layers.0.self_attn.v_proj.weight, const layers.0.self_attn.v_proj.bias) : f32[1,8,64]
%62 = linear(%61, const layers.0.self_attn.out_proj.weight, param layers.0.self_attn.out_proj.bias) : f32[1,8,64]
%66 = layer_norm(%65, (64,), const layers.0.final_layer_norm.weight, const layers.0.final_layer_norm.bias, 1e-05) : f32[8,64]
%67 = linear(%66, const layers.0.fc1.weight, const layers.0.fc1.bias) : f32[8,96]
%69 = linear(%68, const layers.0.fc2.weight, param layers.0.fc2.bias) : f32[8,64]
%73 = layer_norm(%72, (64,), param final_layer_norm.weight, param final_layer_norm.bias, 1e-05) : f32[1,8,64]
%75 = linear(%74, param embed_tokens.weight, None) : f32[1,8,128]
""")

    def test_gpt2(self):
        self.assertExpectedInline(_graph("gpt2", SMOOTH), """\
const h.0.mlp.c_proj.smooth_inv_scale : f32[256]
const h.0.ln_1.weight : f32[64]
const h.0.ln_1.bias : f32[64]
const h.0.attn.c_attn.weight : f32[64,192]
const h.0.attn.c_attn.bias : f32[192]
const h.0.attn.c_proj.weight : f32[64,64]
const h.0.ln_2.weight : f32[64]
const h.0.ln_2.bias : f32[64]
const h.0.mlp.c_fc.weight : f32[64,256]
const h.0.mlp.c_proj.weight : f32[256,64]
%28 = embedding(%27, param wte.weight, None, None, 2.0, False, False) : f32[1,8,64]
%32 = embedding(%31, param wpe.weight, None, None, 2.0, False, False) : f32[1,8,64]
%62 = layer_norm(%61, (64,), const h.0.ln_1.weight, const h.0.ln_1.bias, 1e-05) : f32[1,8,64]
%64 = addmm(const h.0.attn.c_attn.bias, %63, const h.0.attn.c_attn.weight) : f32[8,192]
%83 = addmm(param h.0.attn.c_proj.bias, %82, const h.0.attn.c_proj.weight) : f32[8,64]
%87 = layer_norm(%86, (64,), const h.0.ln_2.weight, const h.0.ln_2.bias, 1e-05) : f32[1,8,64]
%89 = addmm(param h.0.mlp.c_fc.bias, %88, const h.0.mlp.c_fc.weight) : f32[8,256]
%100 = mul(%99, const h.0.mlp.c_proj.smooth_inv_scale) : f32[8,256]
%101 = addmm(param h.0.mlp.c_proj.bias, %100, const h.0.mlp.c_proj.weight) : f32[8,64]
%105 = layer_norm(%104, (64,), param ln_f.weight, param ln_f.bias, 1e-05) : f32[1,8,64]
%108 = linear(%107, param wte.weight, None) : f32[1,8,128]
""")


SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.mark.parametrize("arch, preset", [(arch, p) for p in sorted(TINY_PRESETS) for arch in ("llama", "opt")]
                         + [("llama_wide", p) for p in sorted(qpass.PRESETS) if p not in TINY_PRESETS])
def test_preset_graph_snapshot(arch, preset):
    """Every preset's quant/dequant graph on a 1-layer Llama and OPT (the low-bit AdaDim presets'
    groups of 128: a 1-layer Llama of hidden 128), one file each (tests/snapshots/);
    EXPECTTEST_ACCEPT=1 rewrites them. The integer-only preset covers Llama-family decoders only
    (OPT's ReLU raises; tests/test_integer.py)."""
    if arch == "opt" and qpass.preset(preset).integer_only is not None:
        pytest.skip("integer_only covers Llama-family decoders; OPT raises (test_integer.py)")
    text = _graph(arch, qpass.preset(preset))
    path = SNAPSHOTS / f"{arch}_{preset}.txt"
    if os.environ.get("EXPECTTEST_ACCEPT") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no snapshot {path.name}; run with EXPECTTEST_ACCEPT=1"
    assert text == path.read_text(), f"{path.name} changed; run with EXPECTTEST_ACCEPT=1 and read the diff"
