"""``qpass.save``: compressed-tensors checkpoints that transformers loads."""

from __future__ import annotations

import importlib.util
import json
import types

import pytest
import safetensors.torch
import torch

import qpass
from qpass import kernels
from qpass.graph import constants
from tests.models import tiny_model, token_batches

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("compressed_tensors") is None, reason="pip install compressed-tensors (the checkpoint format)"
)

# logits of the checkpoint loaded by transformers against the same preset compiled by qpass
# (measured on the tiny Llama: w8a8_dynamic 7e-5, fp8_dynamic 0, w8a8_static 1.6e-2: transformers
# rounds the static layers' inputs its own way; qpass itself is 1.8e-2 from fp32 there)
AGREEMENT = {"w8a8_dynamic": 1e-3, "fp8_dynamic": 1e-5, "w8a8_static": 0.03}
# The configs saved: the presets, w8a8_static with its per-token budget at 8x so that the tiny model keeps
# a mix of static and per-token linears (at the preset's 1.5x every one of them runs per-token).
CONFIGS = {name: qpass.preset(name) for name in AGREEMENT} | {"w8a8_static": qpass.preset("w8a8_static", dynamic_fallback=8.0)}


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, qpass.calibrate(model, token_batches(2))


@pytest.mark.parametrize("name", list(AGREEMENT))
def test_saved_checkpoint_loads_in_transformers(name, llama, tmp_path, caplog):
    import transformers
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    model, calib = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level("WARNING", logger="qpass.save"):
        qpass.save(model, CONFIGS[name], tmp_path, calibration=calib)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the user's model is untouched
    assert not any("2-D" in r.getMessage() for r in caplog.records)  # Llama's linears take (batch, seq, hidden)

    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qc)  # the package parses what we wrote
    assert qc["ignore"] == ["lm_head"]
    targets = sorted(t for g in qc["config_groups"].values() for t in g["targets"])
    assert len(targets) == 14 and all(t.startswith("model.layers.") for t in targets)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert q.dtype == (torch.float8_e4m3fn if name.startswith("fp8") else torch.int8)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").shape == (64, 1)
        # gate and up share one static input scale in the graph; each gets its own in the file
        assert ("model.layers.1.mlp.up_proj.input_scale" in f.keys()) == (name == "w8a8_static")

    ids = token_batches(1)[0]
    torch._dynamo.reset()
    with torch.no_grad():
        ours = torch.compile(model, backend=qpass.backend(CONFIGS[name], calibration=calib, inductor=False), dynamic=False)(
            ids, use_cache=False
        ).logits
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        theirs = loaded(ids, use_cache=False).logits
    assert _rel(theirs, ours) < AGREEMENT[name]


def test_relu_mlp_fold_saves_and_loads(tmp_path, caplog):
    """OPT's fc1 -> relu -> fc2 folds 1/s into fc1's rows (no multiply before fc2), so the format
    holds it: the reloaded checkpoint computes the logits qpass computed before saving. (Compared
    through ``qpass.load``: transformers' own loader quantizes OPT's fc1/fc2 inputs per tensor, not
    per token: compressed-tensors 0.20's "token" strategy keeps dims 0 and 1, which for OPT's
    (tokens, hidden) 2-D inputs reduces over the whole tensor; 1.6% apart with or without smoothing.)"""
    model = tiny_model("opt", layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    ids = token_batches(1)[0]
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="qpass.save"):
        saved = qpass.save(model, "w8a8_dynamic", tmp_path, calibration=calib)
    assert saved.report.rows["model.decoder.layers.0.fc2"].smoothing == "relu-act"
    # OPT flattens to (tokens, hidden) before fc1 / fc2: the one warning names them and no other linear
    [warning] = [r.getMessage() for r in caplog.records if "2-D" in r.getMessage()]
    assert warning.startswith("qpass.save: 2 linears take 2-D (tokens, hidden) inputs with per-token activation "
                              "scales: model.decoder.layers.0.fc1, model.decoder.layers.0.fc2. "), warning
    torch._dynamo.reset()
    backend = qpass.backend("w8a8_dynamic", calibration=calib, inductor=False)
    with torch.no_grad():
        ours = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
    reloaded, backend = qpass.load(tmp_path, inductor=False, dynamic=False)
    backend
    with torch.no_grad():
        theirs = reloaded(ids, use_cache=False).logits
    assert _rel(theirs, ours) <= 1e-6


@pytest.mark.parametrize(
    "arch, name, message",
    [
        ("llama", "llm_int8", r"outlier split \(LLM.int8\(\)\) has no compressed-tensors form"),
        ("llama", qpass.preset("w4a16", weight=qpass.QuantSpec("int4", qpass.PerGroup(32), symmetric=False)),
         r"the weights have float zero points; the compressed-tensors format stores integer ones"),
        ("llama", qpass.preset("w4a16", weight=qpass.QuantSpec("int4", qpass.PerInputChannel())),
         r"int4 PerInputChannel weights are not written yet"),
        ("gpt2", "w8a8_dynamic", r"transformer\.h\.0\.mlp\.c_proj: its smoothing is a multiply inserted before it"),
        ("gemma", "w8a8_dynamic", r"model\.layers\.0\.input_layernorm: smoothing folded into a scale computed from"),
    ],
)
def test_what_the_format_cannot_hold_is_refused(arch, name, message, tmp_path):
    model = tiny_model(arch, layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=message):
        qpass.save(model, name, tmp_path, calibration=calib)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("name", list(AGREEMENT))
def test_load_reproduces_the_saved_quantization(name, llama, tmp_path):
    """Reloaded (in this process: the directory is all it reads) and compiled, the checkpoint gives
    the logits of the model qpass quantized before saving: measured bit-equal for all three."""
    model, calib = llama
    ids = token_batches(1)[0]
    torch._dynamo.reset()
    qpass.save(model, CONFIGS[name], tmp_path, calibration=calib)
    torch._dynamo.reset()
    with torch.no_grad():
        ours = torch.compile(model, backend=qpass.backend(CONFIGS[name], calibration=calib, inductor=False), dynamic=False)(
            ids, use_cache=False
        ).logits
    reloaded, backend = qpass.load(tmp_path, inductor=False, dynamic=False)
    backend
    with torch.no_grad():
        theirs = reloaded(ids, use_cache=False).logits
    assert _rel(theirs, ours) <= 1e-6
    rows = backend.report.rows
    assert sum(1 for r in rows.values() if r.weight and not r.weight.startswith("fp32")) == 14
    assert rows["lm_head"].weight == "fp32 (skipped)"
    assert all(r.smoothing in ("", "none") for r in rows.values())  # folded into the weights already: no search
    if name == "w8a8_static":  # the per-token fallbacks come back as such
        fallbacks = [p for p, r in rows.items() if r.per_token_fallback]
        assert fallbacks and all("dynamic_layers" in rows[p].reason for p in fallbacks)


def test_load_ties_the_embeddings_of_a_tied_model(tmp_path):
    """A model whose lm_head shares the input embedding (SmolLM2) stores no ``lm_head.weight``:
    ``qpass.load`` ties them again (building the model without initialising it skips the tying)
    and the reloaded logits equal the saved model's."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    calib = qpass.calibrate(model, token_batches(2))
    qpass.save(model, "w8a8_dynamic", tmp_path, calibration=calib)
    assert "lm_head.weight" not in safetensors.torch.load_file(tmp_path / "model.safetensors")
    ids = token_batches(1)[0]
    torch._dynamo.reset()
    with torch.no_grad():
        ours = torch.compile(model, backend=qpass.backend("w8a8_dynamic", calibration=calib, inductor=False),
                             dynamic=False)(ids, use_cache=False).logits
    reloaded, _ = qpass.load(tmp_path, inductor=False, dynamic=False)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        theirs = reloaded(ids, use_cache=False).logits
    assert _rel(theirs, ours) <= 1e-6  # the stored integers on every CPU (split weights where 8-bit products saturate)


def test_load_checks_each_stored_weight_once_for_every_graph(llama, tmp_path, monkeypatch):
    """Whether a layer still holds the checkpoint's weight is decided once per backend: a second
    graph (another prompt length) reuses the answer. The parameters ``qpass.load`` itself wrote,
    unchanged since, are not dequantized and compared at all (the startup of a checkpoint)."""
    import qpass.passes.quantize as quantize_pass

    calls = []
    checked = quantize_pass._checked_stored_weight
    monkeypatch.setattr(quantize_pass, "_checked_stored_weight",
                        lambda path, *a: calls.append((path, a[-1])) or checked(path, *a))
    model, calib = llama
    torch._dynamo.reset()
    qpass.save(model, "w8a8_dynamic", tmp_path, calibration=calib)
    reloaded, backend = qpass.load(tmp_path, inductor=False, dynamic=False)
    assert len(backend.stored_params) == 14
    for path, qw in backend.stored_weights.items():  # what it trusts is the stored weight dequantized, exactly
        assert torch.equal(reloaded.get_submodule(path).weight, qw.dequantize())
    compared = []
    dequantize = qpass.qmath.QuantizedWeight.dequantize
    monkeypatch.setattr(qpass.qmath.QuantizedWeight, "dequantize", lambda self, *a: compared.append(1) or dequantize(self, *a))
    with torch.no_grad():
        reloaded(token_batches(1, seq=16)[0], use_cache=False)
        reloaded(token_batches(1, seq=8)[0], use_cache=False)
    assert backend.report.graphs == 2
    assert len(calls) == len({p for p, _ in calls}) == 14  # the tiny Llama's quantized linears, once each
    assert all(written for _, written in calls) and not compared


@pytest.mark.int_mm
@pytest.mark.skipif(not kernels.int_mm_exact(), reason="torch._int_mm saturates int16 pair sums here (no VNNI / AMX)")
def test_load_concatenates_shared_input_weights_once_for_every_graph(llama, tmp_path, monkeypatch):
    """q / k / v and gate / up run as one ``_int_mm`` over their concatenated weights: for a loaded
    model (the same stored integers in every graph) each member's weight is read and concatenated
    once per backend, not again for the second graph; both graphs still lower every linear.
    (oneDNN keeps only its packed weight, so the concatenation is not alive to be reused there.)"""
    from qpass.passes import lower as lower_pass

    read = []
    weight = lower_pass._Emit.weight
    monkeypatch.setattr(lower_pass._Emit, "weight", lambda self, q, grid: read.append(q.path) or weight(self, q, grid))
    model, calib = llama
    torch._dynamo.reset()
    qpass.save(model, "w8a8_dynamic", tmp_path, calibration=calib)
    reloaded, backend = qpass.load(tmp_path, inductor=False, dynamic=False)
    with torch.no_grad():
        reloaded(token_batches(1, seq=16)[0], use_cache=False)
        reloaded(token_batches(1, seq=8)[0], use_cache=False)
    assert backend.report.graphs == 2
    members = [p for p in read if p.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
    assert len(members) == len(set(members)) == 10  # 2 layers x 5, once each
    rows = backend.report.rows
    assert all("one GEMM with" in rows[p].reason for p in members)
    assert all(rows[p].kernels == ("int8 (_int_mm)",) for p in rows if "proj" in p)


def test_a_weight_replaced_after_loading_is_compared(tmp_path, caplog, monkeypatch):
    """A parameter ``qpass.load`` did not write (a new tensor in its place, equal or not) is compared
    with the stored weight: equal values keep the stored integers, others are quantized again."""
    import qpass.passes.quantize as quantize_pass

    decided = {}
    checked = quantize_pass._checked_stored_weight
    monkeypatch.setattr(quantize_pass, "_checked_stored_weight",
                        lambda path, *a: decided.setdefault(path, (a[-1], checked(path, *a)))[1])
    model = tiny_model("llama", layers=1)
    qpass.save(model, "w8a8_dynamic", tmp_path, calibration=qpass.calibrate(model, token_batches(2)))
    torch._dynamo.reset()
    reloaded, backend = qpass.load(tmp_path, inductor=False, dynamic=False)
    mlp = reloaded.model.layers[0].mlp
    mlp.gate_proj.weight.data = mlp.gate_proj.weight.detach().clone()  # same values, another storage
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach() * 2, requires_grad=False)
    with torch.no_grad(), caplog.at_level("WARNING", logger="qpass"):
        reloaded(token_batches(1)[0], use_cache=False)
    changed = [r.getMessage() for r in caplog.records if "no longer the checkpoint's" in r.getMessage()]
    assert changed == [
        "qpass: model.layers.0.mlp.up_proj: its weight is no longer the checkpoint's (changed after loading); quantizing it again"
    ]
    written, kept = decided["model.layers.0.mlp.gate_proj"]  # compared, and equal: the stored integers
    assert not written and kept.q is backend.stored_weights["model.layers.0.mlp.gate_proj"].q
    assert decided["model.layers.0.mlp.up_proj"] == (False, None)
    assert decided["model.layers.0.mlp.down_proj"][0]  # untouched: trusted


def test_w4a16_groups_round_trip_packed(llama, tmp_path):
    """4-bit groups with integer zero points are written packed as the format defines (the same
    tensors compressed-tensors' own compressor writes for these integers), reload bit-equal, and
    load in transformers when it decompresses them."""
    import transformers
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model, calib = llama
    ids = token_batches(1)[0]
    torch._dynamo.reset()
    backend = qpass.save(model, "w4a16", tmp_path, calibration=calib)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["format"] == "pack-quantized" and qc["format"] == "pack-quantized"
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == dict(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    path = "model.layers.0.mlp.down_proj"  # (64, 96): 3 groups per row
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f"{path}.weight" not in f.keys()
        packed, shape = f.get_tensor(f"{path}.weight_packed"), f.get_tensor(f"{path}.weight_shape")
        scale, zp = f.get_tensor(f"{path}.weight_scale"), f.get_tensor(f"{path}.weight_zero_point")
    assert (packed.dtype, tuple(packed.shape), shape.tolist()) == (torch.int32, (64, 12), [64, 96])
    assert tuple(scale.shape) == (64, 3) and (zp.dtype, tuple(zp.shape)) == (torch.int32, (8, 3))
    q, z = unpack_from_int32(packed, 4, torch.Size([64, 96])), unpack_from_int32(zp, 4, torch.Size([64, 3]), packed_dim=0)
    assert q.min() >= -8 and q.max() <= 7 and z.min() >= -8 and z.max() <= 7
    w = (q.float().reshape(64, 3, 32) - z.float()[..., None]) * scale[..., None]
    # weight-only, so no smoothing: the stored groups are the layer's own weight within half a step
    torch.testing.assert_close(w.reshape(64, 96), model.get_submodule(path).weight, rtol=0, atol=scale.max().item() / 2 + 1e-6)

    torch._dynamo.reset()
    with torch.no_grad():
        ours = torch.compile(model, backend=qpass.backend("w4a16", calibration=calib, inductor=False), dynamic=False)(
            ids, use_cache=False).logits
    reloaded, backend = qpass.load(tmp_path, inductor=False, dynamic=False)
    with torch.no_grad():
        assert _rel(reloaded(ids, use_cache=False).logits, ours) <= 1e-6
    assert backend.report.rows[path].weight == "int4 per-group(32) asym int-zp"
    # transformers' compressed route re-initialises packed zero points at the unpacked shape and
    # refuses the checkpoint; decompressing on load reads it exactly
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        assert _rel(loaded(ids, use_cache=False).logits, ours) <= 1e-6


def test_load_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        qpass.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="is not a compressed-tensors checkpoint"):
        qpass.load(tmp_path)


def test_load_in_another_process(llama, tmp_path):
    """The directory is all a new process needs: its logits equal this process's compiled model."""
    import subprocess
    import sys

    model, calib = llama
    ids = token_batches(1)[0]
    torch._dynamo.reset()
    qpass.save(model, "w8a8_static", tmp_path / "ckpt", calibration=calib)
    torch._dynamo.reset()
    with torch.no_grad():
        ours = torch.compile(model, backend=qpass.backend("w8a8_static", calibration=calib, inductor=False),
                             dynamic=False)(ids, use_cache=False).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch, qpass\n"
        "model, backend = qpass.load(sys.argv[1], inductor=False, dynamic=False)\n"
        "with torch.no_grad():\n"
        "    out = model(torch.load(sys.argv[2]), use_cache=False).logits\n"
        "torch.save(out, sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, capture_output=True, timeout=300)
    assert _rel(torch.load(tmp_path / "out.pt"), ours) <= 1e-6


def _write_with_compressed_tensors(model, directory, weights: dict, activations: dict, fmt: str, calib=None) -> None:
    """A checkpoint written by the compressed-tensors package itself (as llm-compressor does), with
    weight scales of another observer than qpass's: ``absmax / 120`` (fp8: ``/ 400``), so the
    largest integer is 120, not 127, and qpass quantizing the dequantized weight again would choose
    other integers."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization import apply_quantization_config

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights),
                                input_activations=QuantizationArgs(**activations))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format=fmt))
    qmax = 400.0 if weights["type"] == "float" else 120.0
    with torch.no_grad():
        for path, module in model.named_modules():
            if hasattr(module, "weight_scale"):
                module.weight_scale.copy_(module.weight.abs().amax(1, keepdim=True) / qmax)
            if hasattr(module, "input_scale"):
                module.input_scale.copy_(calib[path].absmax.max() / 127)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)


# transformers simulates what compressed-tensors describes; its symmetric int8 scale is absmax / 127.5
# where qpass's kernels (and vLLM's) use absmax / 127: 0.7% per linear on these inputs, 2.2% on the
# tiny model's logits for dynamic per-token activations; static scales are the file's in both
CT_SCHEMES = {
    "int8 channel, dynamic token": (dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
                                    dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True),
                                    "int-quantized", 0.03),
    "int8 channel, static tensor": (dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
                                    dict(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False),
                                    "int-quantized", 0.03),
    "fp8 channel, dynamic token": (dict(num_bits=8, type="float", symmetric=True, strategy="channel"),
                                   dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True),
                                   "float-quantized", 1e-3),
}


@pytest.mark.parametrize("scheme", list(CT_SCHEMES))
def test_load_a_checkpoint_the_compressed_tensors_package_wrote(scheme, tmp_path):
    """qpass runs another tool's checkpoint with the stored integers as they are: the quantized
    weights in the compiled graph are the file's (not the dequantized weights quantized again, which
    gives other integers for these scales), and the logits agree with transformers' own (simulated)
    loading of the same directory."""
    import transformers
    from safetensors.torch import load_file

    weights, activations, fmt, agreement = CT_SCHEMES[scheme]
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(2))
    _write_with_compressed_tensors(model, tmp_path, weights, activations, fmt, calib)
    stored = load_file(tmp_path / "model.safetensors")
    ids = token_batches(1)[0]
    torch._dynamo.reset()
    reloaded, backend = qpass.load(tmp_path, inductor=False, dynamic=False)
    backend
    with torch.no_grad():
        ours = reloaded(ids, use_cache=False).logits
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)(ids, use_cache=False).logits
    assert sum(1 for r in backend.report.rows.values() if r.weight and not r.weight.startswith("fp32")) == 14
    assert _rel(ours, theirs) < agreement, _rel(ours, theirs)

    # the reference path of the same backend holds the quantized weights as graph constants
    del reloaded.forward
    torch._dynamo.reset()
    reference = qpass.backend(backend.config.replace(lower=False), backend.calibration, inductor=False)
    reference.stored_weights.update(backend.stored_weights)
    with torch.no_grad():
        torch.compile(reloaded, backend=reference, dynamic=False)(ids, use_cache=False)
    gm = reference.graphs[0]
    low = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    low = [t for t in low if t.dtype in (torch.int8, torch.float8_e4m3fn) and t.dim() == 2]
    files = [t for k, t in stored.items() if k.endswith("proj.weight")]
    assert len(low) == len(files) == 14
    assert all(any(torch.equal(t.float(), f.float()) for f in files) for t in low)
    requantized = qpass.qmath.quantize_weight(reloaded.model.layers[0].mlp.down_proj.weight, backend.config.weight).q
    assert not torch.equal(requantized, stored["model.layers.0.mlp.down_proj.weight"])  # the test can fail


def test_load_a_w4a16_checkpoint_the_compressed_tensors_package_wrote(tmp_path):
    """4-bit asymmetric groups packed by the package's own compressor (its observer: the range
    widened to 0 over 14 levels, not qpass's 15), read back with their integers as they are."""
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization import apply_quantization_config
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = tiny_model("llama")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=False, strategy="group", group_size=32))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                                        format="pack-quantized"))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                g = module.weight.reshape(module.weight.shape[0], -1, 32)
                lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
                module.weight_scale.copy_((hi - lo) / 14)
                module.weight_zero_point.copy_((-7 - torch.round(lo / module.weight_scale)).to(module.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(tmp_path)
    compressor.update_config(tmp_path)

    ids = token_batches(1)[0]
    torch._dynamo.reset()
    reloaded, backend = qpass.load(tmp_path, inductor=False, dynamic=False)
    with torch.no_grad():
        ours = reloaded(ids, use_cache=False).logits
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))(ids, use_cache=False).logits
    assert _rel(ours, theirs) < 1e-5
    stored = backend.stored_weights["model.layers.0.mlp.down_proj"]
    assert stored.q.min() >= -8 and stored.q.max() <= 7 and stored.group_size == 32
    requantized = qpass.qmath.quantize_weight(reloaded.model.layers[0].mlp.down_proj.weight, backend.config.weight)
    assert not torch.equal(requantized.q, stored.q)  # the file's integers, not qpass's own choice: the test can fail


def test_a_weight_changed_after_loading_is_quantized_again(tmp_path, caplog):
    model = tiny_model("llama", layers=1)
    qpass.save(model, "w8a8_dynamic", tmp_path, calibration=qpass.calibrate(model, token_batches(2)))
    torch._dynamo.reset()
    reloaded, backend = qpass.load(tmp_path, inductor=False, dynamic=False)
    with torch.no_grad():
        reloaded.model.layers[0].mlp.up_proj.weight.mul_(2)
        with caplog.at_level("WARNING", logger="qpass"):
            reloaded(token_batches(1)[0], use_cache=False)
    changed = [r.getMessage() for r in caplog.records if "no longer the checkpoint's" in r.getMessage()]
    assert changed == [
        "qpass: model.layers.0.mlp.up_proj: its weight is no longer the checkpoint's (changed after loading); quantizing it again"
    ]


@pytest.fixture(scope="module")
def saved_one_layer(tmp_path_factory):
    """A one-layer tiny Llama saved with w8a8_dynamic, once for the tests that only load it."""
    out = tmp_path_factory.mktemp("w8a8_dynamic_one_layer")
    model = tiny_model("llama", layers=1)
    qpass.save(model, "w8a8_dynamic", out, calibration=qpass.calibrate(model, token_batches(2)))
    return out


def _deferred_and_written(directory):
    """The checkpoint loaded twice: weights deferred (the default) and written."""
    torch._dynamo.reset()
    written, _ = qpass.load(directory, defer_weights=False, inductor=False, dynamic=False)
    deferred, backend = qpass.load(directory, inductor=False, dynamic=False)
    return deferred, backend, written


def test_load_defers_the_quantized_weights_until_read(saved_one_layer):
    """``qpass.load`` leaves the quantized linears' fp32 weights unwritten (the compiled graphs read
    only the stored integers): the compiled model gives the logits of the model whose weights were
    written, without writing them; the first read of a weight (its values, ``state_dict()``, an eager
    call of its layer) gives exactly the stored weight dequantized, and it is a plain parameter again."""
    deferred, backend, written = _deferred_and_written(saved_one_layer)
    up = deferred.model.layers[0].mlp.up_proj.weight
    assert isinstance(up, qpass.DeferredParameter) and len(backend._deferred) == 7
    assert up.shape == (96, 64) and up.dtype == torch.float32 and up.requires_grad  # metadata answers as it is
    ids = token_batches(1)[0]
    with torch.no_grad():
        ours = deferred(ids, use_cache=False).logits
        assert torch.equal(ours, written(ids, use_cache=False).logits)
    assert backend.report.graphs == 1 and len(backend._deferred) == 7  # compiled and run, no weight written
    stored = backend.stored_weights["model.layers.0.mlp.up_proj"]
    assert torch.equal(up * 1, stored.dequantize()) and type(up) is torch.nn.Parameter and len(backend._deferred) == 6
    attn = deferred.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 4, 64)
    with torch.no_grad():  # an eager call of a layer: its weight written on the way
        assert torch.equal(attn(x), written.model.layers[0].self_attn.q_proj(x))
    assert len(backend._deferred) == 5
    state = deferred.state_dict()
    assert all(torch.equal(state[k], v) for k, v in written.state_dict().items()) and not backend._deferred
    with torch.no_grad():  # written as the stored weights: still trusted, the same logits
        assert torch.equal(deferred(ids, use_cache=False).logits, ours)


def test_a_deferred_weight_read_outside_the_compiled_graphs_raises_once(saved_one_layer):
    """A layer Dynamo runs eagerly inside a compiled call reads its deferred weight's unwritten (NaN)
    pages: the call raises naming the layers, which hold their values from then on."""
    deferred, backend, written = _deferred_and_written(saved_one_layer)
    _eager_mlp_raises_once(deferred, written)
    assert len(backend._deferred) == 4


def _eager_mlp_raises_once(deferred, written):
    """Layer 0's MLP run eagerly (``torch.compiler.disable``) inside the compiled call of the
    deferred model: the call raises naming its three weights; the next call gives the logits of the
    model whose weights were written."""
    for m in (deferred, written):
        mlp = m.model.layers[0].mlp
        mlp.forward = torch.compiler.disable(mlp.forward)
    ids = token_batches(1)[0]
    names = ", ".join(f"model.layers.0.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj"))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=f"3 deferred weights were read outside the compiled graphs \\({names}\\)"):
            deferred(ids, use_cache=False)
        assert torch.equal(deferred(ids, use_cache=False).logits, written(ids, use_cache=False).logits)


def test_a_loaded_models_forward_compiled_by_the_user_reads_the_stored_weights(saved_one_layer):
    """``del model.forward`` and a plain ``torch.compile`` of it (no qpass backend): the graph Dynamo
    captures reads the deferred weights, which are written at capture, so it computes the model
    whose weights were written (not unwritten memory)."""
    deferred, backend, written = _deferred_and_written(saved_one_layer)
    del deferred.forward
    ids = token_batches(1)[0]
    with torch.no_grad():
        got = torch.compile(deferred.forward, backend="eager", dynamic=False)(ids, use_cache=False).logits
        want = type(written).forward(written, ids, use_cache=False).logits
    assert not any(isinstance(p, qpass.DeferredParameter) for p in deferred.parameters())
    assert torch.equal(got, want)


def test_a_deferred_per_token_layer_of_a_static_checkpoint_read_eagerly_raises(tmp_path):
    """The same for a static checkpoint's per-token layers (static attention, per-token MLP): the
    calibration ``qpass.load`` builds from the static scales lists only the attention, yet the MLP's
    eager run is still caught, by its deferred weights."""
    model = tiny_model("llama", layers=1)
    config = qpass.preset("w8a8_static", dynamic_fallback=None, dynamic_layers=("*.mlp.*",))
    qpass.save(model, config, tmp_path, calibration=qpass.calibrate(model, token_batches(2)))
    deferred, backend, written = _deferred_and_written(tmp_path)
    assert "model.layers.0.self_attn.q_proj" in backend.calibration and "model.layers.0.mlp.up_proj" not in backend.calibration
    _eager_mlp_raises_once(deferred, written)


def test_release_weights_of_a_loaded_model_frees_no_deferred_memory(saved_one_layer):
    """``release_weights`` on a loaded model releases the deferred weights without writing them
    (nothing of theirs is resident, 0 bytes freed) and the compiled model runs on."""
    deferred, backend, written = _deferred_and_written(saved_one_layer)
    ids = token_batches(1)[0]
    with torch.no_grad():
        ours = deferred(ids, use_cache=False).logits
    assert backend.release_weights(deferred) == 0 and not backend._deferred
    up = deferred.model.layers[0].mlp.up_proj.weight
    assert isinstance(up, qpass.ReleasedParameter)
    with pytest.raises(RuntimeError, match="released by QPassBackend.release_weights"):
        up.sum()
    with torch.no_grad():
        assert torch.equal(deferred(ids, use_cache=False).logits, ours)


@pytest.mark.int_mm
@pytest.mark.skipif(not kernels.int_mm_exact(), reason="torch._int_mm saturates int16 pair sums here (no VNNI / AMX)")
def test_a_loaded_models_packed_weights_are_hashed_once_for_every_graph(saved_one_layer, monkeypatch):
    """The packed-weight cache keys each layer by a digest of its integers: for a loaded model (the
    same stored integers, and on ``_int_mm`` the same concatenations, in every graph) the digest is
    taken for the first graph only, and the second graph still shares the first one's weights.
    (oneDNN / FBGEMM rebuild a shared-input group's concatenation per graph, whose digest is taken again.)"""
    from qpass.passes import lower as lower_pass

    hashed = []
    sha1 = lower_pass.hashlib.sha1  # the lowering's own digests (FX and Dynamo hash too)
    monkeypatch.setattr(lower_pass, "hashlib", types.SimpleNamespace(sha1=lambda data: hashed.append(1) or sha1(data)))
    torch._dynamo.reset()
    reloaded, backend = qpass.load(saved_one_layer, inductor=False, dynamic=False)
    with torch.no_grad():
        reloaded(token_batches(1, seq=16)[0], use_cache=False)
        first = len(hashed)
        reloaded(token_batches(1, seq=8)[0], use_cache=False)
    assert backend.report.graphs == 2 and first > 0 and len(hashed) == first
    consts = [{id(t) for n, t in constants(g).items() if t.dtype in (torch.int8, torch.uint8) and t.dim() == 2}
              for g in backend.graphs]
    assert consts[0] and consts[0] == consts[1]  # the same packed weights in both graphs
