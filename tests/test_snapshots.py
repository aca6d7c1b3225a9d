"""Snapshots of rewritten graphs, printed by qpass.format_graph (positions, module paths,
dtypes and shapes; no PyTorch node names). Accept changes with EXPECTTEST_ACCEPT=1,
read the diff, and commit it with the change that caused it. Each snapshot has a
numerical twin in test_smoothing.py / test_quantize.py (the lowering snapshots: test_int_mm.py,
test_decode.py)."""

import os
from pathlib import Path
from unittest import mock

import expecttest
import pytest
import torch
from torch import nn

import qpass
from qpass.passes import decode
from qpass.passes import lower as lowering
from tests.linears import Proj, inputs
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
%103 = scaled_dot_product_attention(%89, %99, %102, attn_mask=%52, dropout_p=0.0, scale=0.25, is_causal=False) : f32[1,4,8,16]
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
%56 = scaled_dot_product_attention(%49, %53, %55, attn_mask=None, dropout_p=0.0, scale=1.0, is_causal=True) : f32[1,4,8,16]
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
%76 = scaled_dot_product_attention(%75, %71, %73, attn_mask=%60, dropout_p=0.0, scale=0.25, is_causal=False) : f32[1,4,8,16]
%83 = addmm(param h.0.attn.c_proj.bias, %82, const h.0.attn.c_proj.weight) : f32[8,64]
%87 = layer_norm(%86, (64,), const h.0.ln_2.weight, const h.0.ln_2.bias, 1e-05) : f32[1,8,64]
%89 = addmm(param h.0.mlp.c_fc.bias, %88, const h.0.mlp.c_fc.weight) : f32[8,256]
%100 = mul(%99, const h.0.mlp.c_proj.smooth_inv_scale) : f32[8,256]
%101 = addmm(param h.0.mlp.c_proj.bias, %100, const h.0.mlp.c_proj.weight) : f32[8,64]
%105 = layer_norm(%104, (64,), param ln_f.weight, param ln_f.bias, 1e-05) : f32[1,8,64]
%108 = linear(%107, param wte.weight, None) : f32[1,8,128]
""")


SNAPSHOTS = Path(__file__).parent / "snapshots"


#: A CPU where ``torch._int_mm`` is exact (VNNI / AMX), forced so that the graphs are the same on every CPU
#: (they are only printed here; test_int_mm.py runs them where the real probe finds the kernel exact).
INT_MM_CPU = lowering.Target("cpu", onednn=True, fbgemm=True, int_mm=True)
W8A8 = qpass.preset("w8a8_dynamic", smoothing=None)


def _lowered(model: nn.Module, x: torch.Tensor, *, inductor: bool, config: qpass.QuantConfig = W8A8) -> str:
    """``model(x)`` through the backend with ``config`` on ``INT_MM_CPU``, its one rewritten graph printed whole."""
    torch._dynamo.reset()
    calib = qpass.calibrate(model, [inputs(16, x.shape[-1], seed=99, worst_case=False).to(x.dtype)])
    backend = qpass.backend(config, calibration=calib, inductor=inductor)
    with mock.patch.object(lowering.Target, "detect", staticmethod(lambda device: INT_MM_CPU)), torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(x)
    assert len(backend.graphs) == 1
    return qpass.format_graph(backend.graphs[0], focus=False)


class _Head(nn.Module):
    """A decoder's last int8 linear and its float ``lm_head`` (which the presets skip)."""

    def __init__(self, dim: int = 32, vocab: int = 64):
        super().__init__()
        self.proj, self.lm_head = nn.Linear(dim, dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, x):
        return self.lm_head(self.proj(x))


class TestLoweringSnapshots(expecttest.TestCase):
    def test_int_mm_one_token(self):
        """One linear on ``torch._int_mm`` at one token: the (1, K) activation through an explicit
        ``as_strided`` (torch's CPU ``_int_mm`` misreads a one-row operand whose row stride is not K)."""
        torch.manual_seed(0)
        self.assertExpectedInline(_lowered(Proj(32, 16, True).eval(), inputs(1, 32, seed=1, worst_case=False),
                                           inductor=False), """\
param proj.weight : f32[16,32]
param proj.bias : f32[16]
%2 = input : f32[1,1,32]
const proj.weight_int8 : i8[16,32]
const proj.weight_scale : f32[16]
const proj.weight_colsum : f32[16]
%6 = qpass.choose_qparams(%2, True, False, -128, 127) : (f32[1,1,1], f32[1,1,1])
%7 = getitem(%6, 0) : f32[1,1,1]
%8 = getitem(%6, 1) : f32[1,1,1]
%9 = qpass.quantize(%2, %7, %8, -128, 127, i8) : i8[1,1,32]
%10 = reshape(%9, (-1, 32)) : i8[1,32]
%11 = as_strided(%10, (1, 32), (32, 1)) : i8[1,32]
%12 = t(const proj.weight_int8) : i8[32,16]
%13 = _int_mm(%11, %12) : i32[1,16]
%14 = prims.convert_element_type(%13, f32) : f32[1,16]
%15 = reshape(%7, (-1, 1)) : f32[1,1]
%16 = mul(%15, const proj.weight_scale) : f32[1,16]
%17 = mul(%14, %16) : f32[1,16]
%18 = reshape(%8, (-1, 1)) : f32[1,1]
%19 = mul(%18, %15) : f32[1,1]
%20 = mul(%19, const proj.weight_colsum) : f32[1,16]
%21 = sub(%17, %20) : f32[1,16]
%22 = reshape(%21, (1, 1, 16)) : f32[1,1,16]
%23 = add(%22, param proj.bias) : f32[1,1,16]
""")

    def test_int_mm_four_tokens(self):
        """The same linear at four tokens: no ``as_strided``."""
        torch.manual_seed(0)
        self.assertExpectedInline(_lowered(Proj(32, 16, True).eval(), inputs(4, 32, seed=1, worst_case=False),
                                           inductor=False), """\
param proj.weight : f32[16,32]
param proj.bias : f32[16]
%2 = input : f32[1,4,32]
const proj.weight_int8 : i8[16,32]
const proj.weight_scale : f32[16]
const proj.weight_colsum : f32[16]
%6 = qpass.choose_qparams(%2, True, False, -128, 127) : (f32[1,4,1], f32[1,4,1])
%7 = getitem(%6, 0) : f32[1,4,1]
%8 = getitem(%6, 1) : f32[1,4,1]
%9 = qpass.quantize(%2, %7, %8, -128, 127, i8) : i8[1,4,32]
%10 = reshape(%9, (-1, 32)) : i8[4,32]
%11 = t(const proj.weight_int8) : i8[32,16]
%12 = _int_mm(%10, %11) : i32[4,16]
%13 = prims.convert_element_type(%12, f32) : f32[4,16]
%14 = reshape(%7, (-1, 1)) : f32[4,1]
%15 = mul(%14, const proj.weight_scale) : f32[4,16]
%16 = mul(%13, %15) : f32[4,16]
%17 = reshape(%8, (-1, 1)) : f32[4,1]
%18 = mul(%17, %14) : f32[4,1]
%19 = mul(%18, const proj.weight_colsum) : f32[4,16]
%20 = sub(%16, %19) : f32[4,16]
%21 = reshape(%20, (1, 4, 16)) : f32[1,4,16]
%22 = add(%21, param proj.bias) : f32[1,4,16]
""")

    def test_decode_lm_head_as_reduction(self):
        """At one token under Inductor the float ``lm_head`` becomes ``sum(unsqueeze(x, -2) * W, -1)``
        (``qpass.passes.decode``); the int8 linear before it keeps its ``_int_mm``."""
        torch.manual_seed(0)
        with mock.patch.object(decode, "FLOAT_DECODE_MIN_NUMEL", 0):  # the tiny lm_head is 64 x 32
            text = _lowered(_Head().eval(), inputs(1, 32, seed=1, worst_case=False), inductor=True)
        self.assertExpectedInline(text, """\
param proj.weight : f32[32,32]
param proj.bias : f32[32]
%2 = input : f32[1,1,32]
param lm_head.weight : f32[64,32]
const proj.weight_int8 : i8[32,32]
const proj.weight_scale : f32[32]
const proj.weight_colsum : f32[32]
%7 = qpass.choose_qparams(%2, True, False, -128, 127) : (f32[1,1,1], f32[1,1,1])
%8 = getitem(%7, 0) : f32[1,1,1]
%9 = getitem(%7, 1) : f32[1,1,1]
%10 = qpass.quantize(%2, %8, %9, -128, 127, i8) : i8[1,1,32]
%11 = reshape(%10, (-1, 32)) : i8[1,32]
%12 = as_strided(%11, (1, 32), (32, 1)) : i8[1,32]
%13 = t(const proj.weight_int8) : i8[32,32]
%14 = _int_mm(%12, %13) : i32[1,32]
%15 = prims.convert_element_type(%14, f32) : f32[1,32]
%16 = reshape(%8, (-1, 1)) : f32[1,1]
%17 = mul(%16, const proj.weight_scale) : f32[1,32]
%18 = mul(%15, %17) : f32[1,32]
%19 = reshape(%9, (-1, 1)) : f32[1,1]
%20 = mul(%19, %16) : f32[1,1]
%21 = mul(%20, const proj.weight_colsum) : f32[1,32]
%22 = sub(%18, %21) : f32[1,32]
%23 = reshape(%22, (1, 1, 32)) : f32[1,1,32]
%24 = add(%23, param proj.bias) : f32[1,1,32]
%25 = reshape(%24, (1, 32)) : f32[1,32]
%26 = aten.clone(%25, memory_format=torch.contiguous_format) : f32[1,32]
%27 = as_strided(%26, (1, 1, 32), (32, 32, 1)) : f32[1,1,32]
%28 = mul(%27, param lm_head.weight) : f32[1,64,32]
%29 = sum(%28, -1) : f32[1,64]
%30 = reshape(%29, (1, 1, 64)) : f32[1,1,64]
""")

    def test_decode_bf16_lm_head_as_float32_reduction(self):
        """A bf16 model's float ``lm_head`` at one token: the same reduction over float32 upcasts of its
        row and weight (Inductor fuses them into the sum's loads), rounded to bf16 at the end."""
        torch.manual_seed(0)
        with mock.patch.object(decode, "FLOAT_DECODE_MIN_NUMEL", 0):  # the tiny lm_head is 64 x 32
            text = _lowered(_Head().eval().to(torch.bfloat16), inputs(1, 32, seed=1, worst_case=False).to(torch.bfloat16),
                            inductor=True)
        self.assertExpectedInline(text, """\
param proj.weight : bf16[32,32]
param proj.bias : bf16[32]
%2 = input : bf16[1,1,32]
param lm_head.weight : bf16[64,32]
const proj.weight_int8 : i8[32,32]
const proj.weight_scale : f32[32]
const proj.weight_colsum : f32[32]
%7 = qpass.choose_qparams(%2, True, False, -128, 127) : (f32[1,1,1], f32[1,1,1])
%8 = getitem(%7, 0) : f32[1,1,1]
%9 = getitem(%7, 1) : f32[1,1,1]
%10 = qpass.quantize(%2, %8, %9, -128, 127, i8) : i8[1,1,32]
%11 = reshape(%10, (-1, 32)) : i8[1,32]
%12 = as_strided(%11, (1, 32), (32, 1)) : i8[1,32]
%13 = t(const proj.weight_int8) : i8[32,32]
%14 = _int_mm(%12, %13) : i32[1,32]
%15 = prims.convert_element_type(%14, f32) : f32[1,32]
%16 = reshape(%8, (-1, 1)) : f32[1,1]
%17 = mul(%16, const proj.weight_scale) : f32[1,32]
%18 = mul(%15, %17) : f32[1,32]
%19 = reshape(%9, (-1, 1)) : f32[1,1]
%20 = mul(%19, %16) : f32[1,1]
%21 = mul(%20, const proj.weight_colsum) : f32[1,32]
%22 = sub(%18, %21) : f32[1,32]
%23 = reshape(%22, (1, 1, 32)) : f32[1,1,32]
%24 = add(%23, param proj.bias) : f32[1,1,32]
%25 = prims.convert_element_type(%24, bf16) : bf16[1,1,32]
%26 = prims.convert_element_type(%25, f32) : f32[1,1,32]
%27 = prims.convert_element_type(param lm_head.weight, f32) : f32[64,32]
%28 = reshape(%26, (1, 32)) : f32[1,32]
%29 = aten.clone(%28, memory_format=torch.contiguous_format) : f32[1,32]
%30 = as_strided(%29, (1, 1, 32), (32, 32, 1)) : f32[1,1,32]
%31 = mul(%30, %27) : f32[1,64,32]
%32 = sum(%31, -1) : f32[1,64]
%33 = reshape(%32, (1, 1, 64)) : f32[1,1,64]
%34 = prims.convert_element_type(%33, bf16) : bf16[1,1,64]
""")

    def test_weight_only_lm_head_at_one_token(self):
        """``weight_only=("lm_head",)``: the head's int8 weight dequantized inside the one-token
        reduction over a realized row (``decode.reduction_linear``); the int8 linear before it keeps
        its ``_int_mm``."""
        torch.manual_seed(0)
        text = _lowered(_Head().eval(), inputs(1, 32, seed=1, worst_case=False), inductor=False,
                        config=W8A8.replace(weight_only=("lm_head",)))
        self.assertExpectedInline(text, """\
param proj.weight : f32[32,32]
param proj.bias : f32[32]
%2 = input : f32[1,1,32]
param lm_head.weight : f32[64,32]
const lm_head.weight_q : i8[64,32]
const lm_head.weight_scale : f32[64,1]
const proj.weight_int8 : i8[32,32]
const proj.weight_scale : f32[32]
const proj.weight_colsum : f32[32]
%9 = qpass.choose_qparams(%2, True, False, -128, 127) : (f32[1,1,1], f32[1,1,1])
%10 = getitem(%9, 0) : f32[1,1,1]
%11 = getitem(%9, 1) : f32[1,1,1]
%12 = qpass.quantize(%2, %10, %11, -128, 127, i8) : i8[1,1,32]
%13 = reshape(%12, (-1, 32)) : i8[1,32]
%14 = as_strided(%13, (1, 32), (32, 1)) : i8[1,32]
%15 = t(const proj.weight_int8) : i8[32,32]
%16 = _int_mm(%14, %15) : i32[1,32]
%17 = prims.convert_element_type(%16, f32) : f32[1,32]
%18 = reshape(%10, (-1, 1)) : f32[1,1]
%19 = mul(%18, const proj.weight_scale) : f32[1,32]
%20 = mul(%17, %19) : f32[1,32]
%21 = reshape(%11, (-1, 1)) : f32[1,1]
%22 = mul(%21, %18) : f32[1,1]
%23 = mul(%22, const proj.weight_colsum) : f32[1,32]
%24 = sub(%20, %23) : f32[1,32]
%25 = reshape(%24, (1, 1, 32)) : f32[1,1,32]
%26 = add(%25, param proj.bias) : f32[1,1,32]
%27 = qpass.dequantize(const lm_head.weight_q, const lm_head.weight_scale, None, 0, f32) : f32[64,32]
%28 = reshape(%26, (1, 32)) : f32[1,32]
%29 = aten.clone(%28, memory_format=torch.contiguous_format) : f32[1,32]
%30 = as_strided(%29, (1, 1, 32), (32, 32, 1)) : f32[1,1,32]
%31 = mul(%30, %27) : f32[1,64,32]
%32 = sum(%31, -1) : f32[1,64]
%33 = reshape(%32, (1, 1, 64)) : f32[1,1,64]
""")


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
