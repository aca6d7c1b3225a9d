"""SmolLM2's decoder linears (30 layers x q, k, v, o, gate, up, down; random weights of its shapes) at
1 and 128 tokens: fp32 and bf16 ``F.linear`` against the weight-only kernels qpass lowers ``w8a16`` /
``w4a16`` to, in the same run, median of rounds.

    python bench/weight_only_linears.py [--threads 1]
"""
import argparse
import statistics
import time

import torch
from qpass import kernels, qmath
from qpass.config import QuantSpec, PerGroup, PerOutputChannel
parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=1)
torch.set_num_threads(parser.parse_args().threads)
shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (N, K)
g = torch.Generator().manual_seed(0)
layers = []
for n, k in shapes:
    w = torch.randn(n, k, generator=g) * 0.05
    q8 = qmath.quantize_weight(w, QuantSpec("int8", PerOutputChannel()))
    q4 = qmath.quantize_weight(w, QuantSpec("int4", PerGroup(32), symmetric=False))
    p4, sz = kernels.pack_int4(q4.q, q4.scale, q4.zero_point, torch.bfloat16)
    layers.append(dict(k=k, w32=w, wbf=w.bfloat16(), w8=q8.q, s8=q8.scale.reshape(-1).bfloat16(), p4=p4, sz=sz))
for m in (1, 128):
    xs = {k: (torch.randn(m, k), torch.randn(m, k).bfloat16()) for k in (576, 1536)}
    fns = {
        "fp32 F.linear": lambda L: torch.nn.functional.linear(xs[L["k"]][0], L["w32"]),
        "bf16 F.linear": lambda L: torch.nn.functional.linear(xs[L["k"]][1], L["wbf"]),
        "_weight_int8pack_mm (bf16)": lambda L: torch.ops.aten._weight_int8pack_mm(xs[L["k"]][1], L["w8"], L["s8"]),
        "_weight_int4pack_mm_for_cpu (bf16, g32)": lambda L: torch.ops.aten._weight_int4pack_mm_for_cpu(xs[L["k"]][1], L["p4"], 32, L["sz"]),
    }
    times = {name: [] for name in fns}
    for r in range(7 if m == 1 else 3):
        for name, f in fns.items():
            t = time.perf_counter()
            for _ in range(30 if m == 1 else 3):
                for L in layers:
                    f(L)
            times[name].append((time.perf_counter() - t) / (30 if m == 1 else 3) * 30)  # x30 layers
    base = statistics.median(times["fp32 F.linear"])
    for name, ts in times.items():
        print(f"M={m} | {name} | {1e3 * statistics.median(ts):.2f} ms per 30 layers | {base / statistics.median(ts):.2f}x fp32")
