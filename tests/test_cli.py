"""The ``qpass`` command line on a tiny random Llama saved as a Hugging Face directory (with a
word-level tokenizer trained here): each subcommand through ``qpass.cli.main(argv)``, one
subprocess for ``python -m qpass --help``, and the exact line and exit status 2 for bad input."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qpass
from qpass import cli, realdata
from tests.models import tiny_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("compressed_tensors") is None, reason="pip install compressed-tensors (the checkpoint format)"
)

TEXT = "\n".join(
    f"the quick brown fox {i} jumps over the lazy dog near river bank number {i % 7} and sings a song" for i in range(200)
)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(vocab_size=128, special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(fp32 model dir, text file, calibration file, checkpoint dir, quantize's stdout): one
    ``qpass quantize`` run shared by the tests that read its checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    model_dir, out = root / "tiny-llama", root / "tiny-w8a8"
    tiny_model("llama").save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    text = root / "calib.txt"
    text.write_text(TEXT)
    torch._dynamo.reset()
    argv = ["quantize", str(model_dir), "--preset", "w8a8_static", "--calib", str(text), "--calib-batches", "4",
            "--calib-seqlen", "64", "--save-calib", str(root / "calib.safetensors"), "--out", str(out)]
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(argv) == 0
    torch._dynamo.reset()
    return model_dir, text, root / "calib.safetensors", out, stdout.getvalue()


def test_help_runs_as_a_module():
    run = subprocess.run([sys.executable, "-m", "qpass", "--help"], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    for command in ("quantize", "eval", "bench", "report"):
        assert command in run.stdout


@pytest.mark.parametrize("command", ["quantize", "eval", "bench", "report"])
def test_each_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert f"examples:\n  qpass {command} " in capsys.readouterr().out


# Without VNNI the lowering picks 7-bit grids from calibration samples a checkpoint does not hold:
# compare on the reference path there (tests/test_save.py says more).
LOWER = qpass.kernels.int8_dot_exact("onednn")


def test_quantized_checkpoint_reloads_with_the_compiled_models_logits(quantized):
    """The directory is a compressed-tensors checkpoint with the tokenizer; reloaded, it gives the
    logits of the model compiled in this process with the same preset and calibration."""
    model_dir, _, calib_file, out, stdout = quantized
    assert re.search(r"calibrated 15 linears on 4 x 64 tokens of .*calib\.txt", stdout)
    assert "14 of 15 linears quantized" in stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (out / "tokenizer.json").is_file() and (out / cli.REPORT_FILE).is_file()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    calib = qpass.Calibration.load(calib_file)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        backend = qpass.backend("w8a8_static", calibration=calib, inductor=False).bind(model)
        backend.config = backend.config.replace(lower=LOWER)
        ours = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
        torch._dynamo.reset()
        reloaded, loaded = qpass.load(out, inductor=False, dynamic=False)
        loaded.config = loaded.config.replace(lower=LOWER)
        theirs = reloaded(ids, use_cache=False).logits
    assert _rel(theirs, ours) <= 1e-6


def test_output_errors_emulate_the_stored_quantization(quantized):
    """The eager emulation behind the report's output errors gives the logits of the checkpoint's
    compiled reference path, and the errors it measures are small and cover every quantized linear."""
    _, _, _, out, _ = quantized
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(4))
    model, backend = qpass.load(out, inductor=False, dynamic=False)
    backend.config = backend.config.replace(lower=False)
    with torch.no_grad():
        compiled = model(ids, use_cache=False).logits
        plain = type(model).forward(model, ids, use_cache=False).logits  # stored weights, fp32 activations
        with cli._emulated(model, backend):
            emulated = type(model).forward(model, ids, use_cache=False).logits
    assert _rel(emulated, compiled) <= 1e-6
    assert _rel(plain, compiled) > 1e-4  # the activations' rounding is what the emulation adds
    errors = json.loads((out / cli.REPORT_FILE).read_text())["output_error"]
    assert len(errors) == 14 and "lm_head" not in errors
    assert all(0 < e < 0.02 for e in errors.values()), errors  # v_proj / up_proj compared after their gain


def test_report_prints_the_quantize_time_table(quantized, capsys):
    _, _, _, out, _ = quantized
    assert cli.main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    table = json.loads((out / cli.REPORT_FILE).read_text())
    down = next(r for r in table["rows"] if r["path"] == "model.layers.0.mlp.down_proj")
    assert down["smoothing"] == "gated-act" and down["alpha"] is not None and down["outlier_ratio"]
    line = next(line for line in printed.splitlines() if line.startswith("model.layers.0.mlp.down_proj "))
    assert f"{down['alpha']:.2f}" in line and "gated-act" in line
    assert "folded patterns: gated-act: 2, linear-linear: 2, linear-norm: 4" in printed
    assert "output error" in printed and "largest: model.layers." in printed


def test_report_plot(quantized, tmp_path, capsys, monkeypatch):
    _, _, _, out, _ = quantized
    png = tmp_path / "layers.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert cli.main(["report", str(out), "--plot", str(png)]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert cli.main(["report", str(out), "--plot", str(tmp_path / "other.png")]) == 2
    assert capsys.readouterr().err == (
        "qpass report: error: --plot needs matplotlib, which is not installed (pip install matplotlib)\n"
    )
    assert not (tmp_path / "other.png").exists()


def test_eval_reference_perplexity(quantized, capsys):
    """Perplexity of the checkpoint on the text file, next to the fp32 model's: the fp32 number is
    what realdata.perplexity gives the eager model on the same windows, the quantized one close."""
    model_dir, text, _, out, _ = quantized
    argv = ["eval", str(out), "--text", str(text), "--seqlen", "32", "--windows", "3", "--reference",
            "--baseline", str(model_dir)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    ppl = float(re.search(r"perplexity ([\d.]+) on 3 window\(s\) of 32 tokens", printed).group(1))
    base = float(re.search(r"fp32 .*: perplexity ([\d.]+)", printed).group(1))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    windows = realdata.windows(realdata.token_ids(AutoTokenizer.from_pretrained(out), TEXT), 32, 3)
    assert base == pytest.approx(realdata.perplexity(lambda ids: fp32(ids, use_cache=False), windows), abs=1e-4)
    assert ppl == pytest.approx(base, rel=0.05) and ppl != base
    assert "path: reference (quant/dequant ops in fp32, no integer kernels)" in printed
    assert re.search(r"CPU: .+; \d+ threads", printed)


def test_bench_reports_ratios_against_fp32(quantized, capsys):
    _, _, _, out, _ = quantized
    argv = ["bench", str(out), "--prefill", "8", "--decode", "2", "--repeats", "1", "--no-inductor"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"prefill +fp32 eager +[\d.]+ ms +qpass +[\d.]+ ms +speedup [\d.]+x", printed)
    assert re.search(r"decode per token +fp32 eager +[\d.]+ ms +qpass +[\d.]+ ms +speedup [\d.]+x", printed)
    assert re.search(r"path: lowered kernels \(.+\) without Inductor", printed)


def test_quantize_from_a_saved_calibration_file(quantized, tmp_path, capsys):
    model_dir, _, calib_file, _, _ = quantized
    out = tmp_path / "w8a16"
    assert cli.main(["quantize", str(model_dir), "--preset", "w8a16", "--calib", str(calib_file), "--out", str(out)]) == 0
    assert f"calibration: 15 linears from {calib_file}" in capsys.readouterr().out
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"] is None and group["weights"]["num_bits"] == 8


def test_quantize_with_a_weight_only_lm_head(quantized, tmp_path):
    """``--weight-only lm_head``: the head's own config group, int8 weights, no input activations."""
    model_dir, _, calib_file, _, _ = quantized
    out = tmp_path / "head"
    argv = ["quantize", str(model_dir), "--preset", "w8a8_dynamic", "--calib", str(calib_file), "--weight-only", "lm_head",
            "--out", str(out)]
    assert cli.main(argv) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    head = [g for g in qc["config_groups"].values() if g["targets"] == ["lm_head"]]
    assert len(head) == 1 and head[0]["input_activations"] is None and head[0]["weights"]["num_bits"] == 8
    assert "lm_head" not in qc["ignore"]


def _bad_inputs(root: Path, model_dir: Path, text: Path, out: Path) -> list[tuple[list[str], str]]:
    missing, plain = root / "missing", root / "plain"
    plain.mkdir(exist_ok=True)
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x81garbage")
    (root / "corrupt.safetensors").write_bytes(Path(root / "calib.safetensors").read_bytes()[:-7])
    (root / "empty.txt").write_text("  \n")
    full = root / "full"
    full.mkdir(exist_ok=True)
    (full / "x").write_text("x")
    q = ["quantize", str(model_dir), "--calib", str(text), "--out", str(root / "new")]
    return [
        (["quantize", str(missing), "--calib", "wiki", "--out", str(root / "o")],
         f"qpass quantize: error: MODEL_DIR {missing}: no such directory"),
        (["quantize", str(text), "--calib", "wiki", "--out", str(root / "o")],
         f"qpass quantize: error: MODEL_DIR {text}: not a directory"),
        (["quantize", str(plain), "--calib", "wiki", "--out", str(root / "o")],
         f"qpass quantize: error: MODEL_DIR {plain}: not a Hugging Face model directory (no config.json)"),
        (["quantize", str(out), "--calib", "wiki", "--out", str(root / "o")],
         f"qpass quantize: error: MODEL_DIR {out}: already a compressed-tensors checkpoint; quantize the fp32 model"),
        ([*q, "--preset", "w9a9"],
         "qpass quantize: error: argument --preset: invalid choice: 'w9a9' (choose from 'fp8_dynamic', 'fp8_static', "
         "'illm_w8a8', 'llm_int8', 'w3a16_adadim', 'w4a16', 'w4a16_adadim', 'w8a16', 'w8a8_dynamic', 'w8a8_static', "
         "'w8a8_tensor_dynamic') "
         "(see qpass quantize --help)"),
        (["quantize", str(model_dir), "--calib", str(missing), "--out", str(root / "o")],
         f"qpass quantize: error: --calib {missing}: no such file"),
        (["quantize", str(model_dir), "--calib", str(root / "binary.txt"), "--out", str(root / "o")],
         f"qpass quantize: error: --calib {root / 'binary.txt'}: neither UTF-8 text nor a qpass calibration file"),
        (["quantize", str(model_dir), "--calib", str(plain), "--out", str(root / "o")],
         f"qpass quantize: error: --calib {plain}: a directory, not a file"),
        (["quantize", str(model_dir), "--calib", str(root / "empty.txt"), "--out", str(root / "o")],
         f"qpass quantize: error: --calib {root / 'empty.txt'}: the file holds no text"),
        (["quantize", str(model_dir), "--calib", str(text), "--out", str(full)],
         f"qpass quantize: error: --out {full}: exists and is not empty (pass --overwrite to write into it)"),
        ([*q, "--calib-batches", "0"], "qpass quantize: error: --calib-batches must be at least 1, got 0"),
        ([*q, "--preset", "illm_w8a8", "--weight-only", "lm_head"], "qpass quantize: error: --weight-only: "
         "QuantConfig.weight_only: the integer-only region has no float activations; use skip"),
        (["eval", str(missing)], f"qpass eval: error: DIR {missing}: no such directory"),
        (["eval", str(model_dir)],
         f"qpass eval: error: DIR {model_dir}: not a compressed-tensors checkpoint (write one with qpass quantize)"),
        (["eval", str(out), "--text", str(missing)], f"qpass eval: error: --text {missing}: no such file"),
        (["bench", str(plain)], f"qpass bench: error: DIR {plain}: not a Hugging Face model directory (no config.json)"),
        (["report", str(out), "--threads", "0"], "qpass report: error: --threads must be at least 1, got 0"),
        (["frobnicate"], "qpass: error: argument COMMAND: invalid choice: 'frobnicate' (choose from 'quantize', "
         "'eval', 'bench', 'report') (see qpass --help)"),
    ]


def test_bad_input_is_one_line_and_exit_status_2(quantized, tmp_path, capsys):
    model_dir, text, calib_file, out, _ = quantized
    root = calib_file.parent
    for argv, line in _bad_inputs(root, model_dir, text, out):
        try:
            status = cli.main(argv)
        except SystemExit as e:  # argparse's own errors
            status = e.code
        err = capsys.readouterr().err
        assert (status, err) == (2, line + "\n"), argv
    corrupt = root / "corrupt.safetensors"
    assert cli.main(["quantize", str(model_dir), "--calib", str(corrupt), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qpass quantize: error: --calib {corrupt}: ") and err.count("\n") == 1


def test_report_plot_needs_the_quantize_sidecar(quantized, tmp_path, capsys):
    _, _, _, out, _ = quantized
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in out.iterdir():
        if f.name != cli.REPORT_FILE:
            (bare / f.name).write_bytes(f.read_bytes())
    assert cli.main(["report", str(bare), "--plot", str(tmp_path / "p.png")]) == 2
    assert capsys.readouterr().err == (
        f"qpass report: error: --plot: {bare} has no {cli.REPORT_FILE} (written by qpass quantize): "
        "no smoothing decisions or output errors to plot\n"
    )
    assert cli.main(["report", str(bare)]) == 0  # the table of how qpass.load runs it
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and f"(no {cli.REPORT_FILE}:" in printed
