"""One layer's attention, compiled by Inductor, three ways (``qpass.passes.attention``): the key /
value heads repeated (what a grouped-query decoder's ``repeat_kv`` compiles to), SDPA's
``enable_gqa`` on the heads as stored, and, at decode, ``decode_attention``'s reductions.

    python bench/attention.py [--threads 1 2] [--dtypes fp32 bf16] [--json bench/results/attention.json]

Shapes: SmolLM2-135M (9 query heads on 3 KV heads, head dim 64) and the random hidden-2048 Llama of
``bench/speed.py`` (32 on 4); decode is one query against ``--context`` cached positions with the
static cache's additive mask, prefill ``--prefill`` causal queries. Reports the median microseconds
per call of each (a compiled call's own overhead, about 25 us, included) and the largest difference
of each from float64 attention.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from qpass.graph import QGraph
from qpass.passes.attention import decode_attention

SHAPES = {"smollm2": (9, 3, 64), "llama2048": (32, 4, 64)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _median_us(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def measure(heads: int, kv_heads: int, dim: int, queries: int, keys: int, dtype: torch.dtype, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, queries, dim, generator=g).to(dtype)
    k = torch.randn(1, kv_heads, keys, dim, generator=g).to(dtype)
    v = torch.randn(1, kv_heads, keys, dim, generator=g).to(dtype)
    n = heads // kv_heads
    if queries == 1:  # decode: the static cache's mask, the slots after the current position masked
        mask = torch.zeros(1, 1, 1, keys, dtype=dtype)
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

    want = F.scaled_dot_product_attention(q.double(), repeat(k).double(), repeat(v).double(),
                                          **{key: (m.double() if isinstance(m, torch.Tensor) else m) for key, m in kwargs.items()})
    variants = {"repeated": torch.compile(repeated, dynamic=False), "enable_gqa": torch.compile(grouped, dynamic=False)}
    if queries == 1:
        variants["reductions"] = torch.compile(grouped, backend=_reductions, dynamic=False)
    row = {}
    torch._dynamo.reset()
    for name, fn in variants.items():
        row[f"{name}_err"] = (fn().double() - want).abs().max().item()
        row[f"{name}_us"] = round(_median_us(fn, reps), 1)
    row["speedup_vs_repeated"] = {name: round(row["repeated_us"] / row[f"{name}_us"], 2) for name in variants}
    return row


def _reductions(gm: torch.fx.GraphModule, example_inputs):
    """Inductor on the graph with ``decode_attention`` applied."""
    from torch._inductor.compile_fx import compile_fx

    qg = QGraph(gm, example_inputs)
    assert decode_attention(qg) == 1
    return compile_fx(qg.build(), example_inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--context", type=int, default=528, help="cached positions at decode (bench/speed.py: 512 + 16)")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype, (model, (heads, kv_heads, dim)) in ((d, m) for d in args.dtypes for m in SHAPES.items()):
            for phase, queries, keys, reps in (("decode", 1, args.context, 300), ("prefill", args.prefill, args.prefill, 10)):
                row = {"threads": threads, "dtype": dtype, "model": model, "phase": phase, "heads": heads,
                       "kv_heads": kv_heads, **measure(heads, kv_heads, dim, queries, keys, DTYPES[dtype], reps)}
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
