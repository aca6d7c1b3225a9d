"""Compile SmolLM2-135M with qpass: calibrate on Wikipedia text, print what every
linear became, and compare perplexity on held-out text and prefill speed with fp32.

    python examples/smollm2.py [--preset w8a8_static] [--windows 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

import qpass
from qpass import kernels, realdata


def _time_prefill(fn, ids: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        fn(ids)  # compile / warm up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="w8a8_static", choices=sorted(qpass.PRESETS))
    parser.add_argument("--windows", type=int, default=4, help="held-out windows of 1024 tokens for perplexity")
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    model, tokenizer = realdata.load_smollm2()
    calib = qpass.calibrate(model, realdata.calibration_batches(tokenizer, args.calib_batches, 512))
    windows = realdata.eval_windows(tokenizer, 1024, 1024 * args.windows)
    fp32_ppl = realdata.perplexity(lambda ids: model(ids, use_cache=False), windows)

    start = time.perf_counter()
    backend = qpass.compile(model, args.preset, calibration=calib)  # model.forward now runs through qpass
    quantized_ppl = realdata.perplexity(lambda ids: model(ids, use_cache=False), windows)
    compile_and_eval = time.perf_counter() - start
    print(backend.report)
    print()
    prompt_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    generated = model.generate(prompt_ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(generated[0, prompt_ids.shape[1]:])
    del model.forward  # back to the fp32 model for the speed comparison
    prompt = windows[0][:, :512]
    fp32_compiled = torch.compile(model, dynamic=False)
    t_fp32 = _time_prefill(lambda ids: fp32_compiled(ids, use_cache=False), prompt, args.repeats)
    qp_prefill = torch.compile(model, backend=qpass.backend(qpass.preset(args.preset), calibration=calib), dynamic=False)
    t_qpass = _time_prefill(lambda ids: qp_prefill(ids, use_cache=False), prompt, args.repeats)

    grid = ("8-bit on torch._int_mm (exact int8 products)" if kernels.int_mm_exact()
            else "8-bit on oneDNN (exact u8 x s8 dot products)" if kernels.int8_dot_exact("onednn")
            else "7-bit (kernels saturate int16: no VNNI)")
    kinds = sorted({k for r in backend.report.rows.values() for k in r.kernels})
    print(f"SmolLM2-135M, {args.preset}, {len(windows)} held-out Wikipedia windows of 1024 tokens, {args.threads} threads")
    print(f"  path: lowered kernels ({', '.join(kinds)}); CPU int8 grid: {grid}")
    print(f"  greedy generate(): 'The capital of France is' -> {text!r}")
    print(f"  perplexity   fp32 {fp32_ppl:.2f}   qpass {quantized_ppl:.2f}   ({100 * (quantized_ppl / fp32_ppl - 1):+.2f}%)")
    print(f"  prefill 512  fp32 torch.compile {1e3 * t_fp32:.1f} ms   qpass {1e3 * t_qpass:.1f} ms   ({t_fp32 / t_qpass:.2f}x)")
    print(f"  compile + perplexity run: {compile_and_eval:.0f} s")


if __name__ == "__main__":
    main()
