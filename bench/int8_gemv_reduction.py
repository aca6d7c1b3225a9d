"""An int8 matrix-vector product at decode: ``torch._int_mm`` against the same product written as an
Inductor reduction, in a compiled stack of 30 SmolLM2-shaped layers (q/k/v fused 960 x 576, o 576 x 576,
gate/up fused 3072 x 576, down 576 x 1536; random int8 weights, per-token int8 activations, one token).

    python bench/int8_gemv_reduction.py [--threads 1 2] [--reps 200]

Modes: ``int_mm`` (qpass's CPU lowering), ``int32`` (``sum(x_q.int32 * W_q.int32, -1)``, the same
integers, exact) and ``fp32`` (``sum(x_q.float * W_q.float, -1)``: exact only while the sums stay
below 2**24, so not a lowering, a bound on what a float reduction costs). Median and 10th percentile
of a compiled call, ms. The three give the same integers where exact (checked).
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS = 30


def _quantize(x):
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(x / s).clamp(-127, 127).to(torch.int8), s


def _product(mode: str, xq, w):
    k = w.shape[1]
    if mode == "int_mm":
        return torch._int_mm(torch.as_strided(xq.reshape(1, k), (1, k), (k, 1)), w.t()).float()
    row = torch.as_strided(xq.reshape(1, k).clone(memory_format=torch.contiguous_format), (1, 1, k), (k, k, 1))
    dtype = torch.int32 if mode == "int32" else torch.float32
    return (row.to(dtype) * w.to(dtype)).sum(-1).reshape(1, -1).float()


def _model(mode: str, weights, scales):
    def linear(x, w, ws):
        xq, sx = _quantize(x)
        return _product(mode, xq, w) * (sx * ws)

    def f(x):
        for (wqkv, wo, wgu, wd), (sqkv, so, sgu, sd) in zip(weights, scales):
            h = linear(x, wqkv, sqkv)
            x = x + linear(h[:, :576] * 0.1, wo, so)
            g = linear(x, wgu, sgu)
            x = x + linear(torch.nn.functional.silu(g[:, :1536]) * g[:, 1536:], wd, sd) * 0.01
        return x

    return torch.compile(f, fullgraph=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    weights = [[torch.randint(-127, 128, s, dtype=torch.int8, generator=g) for s in SHAPES] for _ in range(LAYERS)]
    scales = [[torch.rand(s[0], generator=g) * 0.01 for s in SHAPES] for _ in range(LAYERS)]
    x = torch.randn(1, 576, generator=g)
    xq, _ = _quantize(x)
    exact = {m: _product(m, xq, weights[0][0]) for m in ("int_mm", "int32")}
    assert torch.equal(exact["int_mm"], exact["int32"]), "int32 reduction differs from _int_mm"
    print("| mode | threads | median ms | p10 ms |\n|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for mode in ("int_mm", "int32", "fp32"):
            fn = _model(mode, weights, scales)
            with torch.no_grad():
                for _ in range(20):
                    fn(x)
                ts = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    fn(x)
                    ts.append(time.perf_counter() - t)
            ts.sort()
            print(f"| {mode} | {threads} | {ts[len(ts) // 2] * 1e3:.2f} | {ts[len(ts) // 10] * 1e3:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
