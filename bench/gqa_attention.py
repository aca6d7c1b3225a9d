"""One layer's attention with the key / value heads repeated (what a grouped-query decoder's
``repeat_kv`` compiles to) against SDPA's ``enable_gqa`` on the heads as stored
(``qpass.passes.attention``), both compiled by Inductor, at decode and at prefill.

    python bench/gqa_attention.py [--threads 1 2] [--json bench/results/gqa_attention.json]

Shapes: SmolLM2-135M (9 query heads on 3 KV heads, head dim 64) and the random hidden-2048 Llama of
``bench/speed.py`` (32 on 4); decode is one query against ``--context`` cached positions with the
static cache's additive mask, prefill ``--prefill`` causal queries. Reports the median microseconds
per call of each and the largest difference of their outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {"smollm2": (9, 3, 64), "llama2048": (32, 4, 64)}


def _median_us(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def measure(heads: int, kv_heads: int, dim: int, queries: int, keys: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, queries, dim, generator=g)
    k, v = torch.randn(1, kv_heads, keys, dim, generator=g), torch.randn(1, kv_heads, keys, dim, generator=g)
    n = heads // kv_heads
    if queries == 1:  # decode: the static cache's mask, the slots after the current position masked
        mask = torch.zeros(1, 1, 1, keys)
        mask[..., keys - 15:] = float("-inf")
        kwargs = {"attn_mask": mask}
    else:
        kwargs = {"is_causal": True}

    def repeat(x):
        return x[:, :, None, :, :].expand(1, kv_heads, n, keys, dim).reshape(1, heads, keys, dim)

    def repeated():
        return F.scaled_dot_product_attention(q, repeat(k), repeat(v), **kwargs)

    def grouped():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)

    torch._dynamo.reset()
    a, b = torch.compile(repeated, dynamic=False), torch.compile(grouped, dynamic=False)
    diff = (a() - b()).abs().max().item()
    us_a, us_b = _median_us(a, reps), _median_us(b, reps)
    return {"repeated_us": round(us_a, 1), "enable_gqa_us": round(us_b, 1), "speedup": round(us_a / us_b, 2),
            "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--context", type=int, default=528, help="cached positions at decode (bench/speed.py: 512 + 16)")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for model, (heads, kv_heads, dim) in SHAPES.items():
            for phase, queries, keys, reps in (("decode", 1, args.context, 300), ("prefill", args.prefill, args.prefill, 20)):
                row = {"threads": threads, "model": model, "phase": phase, "heads": heads, "kv_heads": kv_heads,
                       **measure(heads, kv_heads, dim, queries, keys, reps)}
                rows.append(row)
                print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": _cpu(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


def _cpu() -> str:
    flags = open("/proc/cpuinfo").read()
    return "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2, no VNNI" if "avx2" in flags else "other"


if __name__ == "__main__":
    raise SystemExit(main())
