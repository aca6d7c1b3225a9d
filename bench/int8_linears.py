"""The CPU int8 GEMM kernels qpass can lower a W8A8 linear to, one linear alone, against fp32.

    python bench/int8_linears.py [--threads 2]

For SmolLM2's and the hidden-2048 Llama's linear shapes (K, N), at one token (decode) and 512
(prefill), the median microseconds of: ``torch._int_mm`` on the plain int8 weight (what qpass lowers
to where its probe finds ``_int_mm`` exact), oneDNN's ``qlinear_pointwise`` on a prepacked weight
(``qpass::onednn_qlinear``), FBGEMM's dynamic linear on a prepacked weight, and fp32 ``F.linear``.
Random integers: the time does not depend on the values.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from qpass.kernels.onednn import onednn_qlinear, pack_onednn_int8  # noqa: E402

from attention import _median_us  # noqa: E402  (bench/attention.py: median microseconds, 5 calls of warm-up)

SHAPES = [(576, 576), (576, 1536), (1536, 576), (2048, 2048), (2048, 5632)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| K | N | M | `_int_mm` us | oneDNN prepacked us | FBGEMM prepacked us | fp32 us |")
    print("|---|---|---|---|---|---|---|")
    for k, n in SHAPES:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        onednn = pack_onednn_int8(w, torch.rand(n) + 0.5)
        qw = torch.quantize_per_channel(w.float() * 0.01, torch.full((n,), 0.01, dtype=torch.float64),
                                        torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        fbgemm = torch.ops.quantized.linear_prepack(qw, None)
        wf = torch.randn(n, k)
        for m in (1, 512):
            reps = 400 if m == 1 else 20
            xi = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            xu = torch.randint(0, 128, (m, k), dtype=torch.uint8)
            xf = torch.randn(m, k)
            row = [_median_us(lambda: torch._int_mm(xi, w.t()), reps),
                   _median_us(lambda: onednn_qlinear(xu, 0.01, 0, onednn.packed, onednn.scales, None), reps),
                   _median_us(lambda: torch.ops.quantized.linear_dynamic(xf, fbgemm, False), reps),
                   _median_us(lambda: torch.nn.functional.linear(xf, wf), reps)]
            print(f"| {k} | {n} | {m} | " + " | ".join(f"{v:.0f}" for v in row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
