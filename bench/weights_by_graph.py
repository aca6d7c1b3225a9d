"""Which quantized weights each compiled graph holds, and which it shares with another graph: the
random hidden-2048 Llama of ``bench/speed.py`` (one layer by default), ``w8a8_dynamic``, a 512-token
prompt then one decode step into a ``StaticCache``, then ``release_weights``.

    python bench/weights_by_graph.py [--layers 1] [--preset w8a8_dynamic] [--prompt-cache]

The prompt runs as ``bench/speed.py`` runs it (``use_cache=False``), or with ``--prompt-cache`` as
``generate()`` runs it (``use_cache=True``). Prints each graph's int8 weights over 100 kB, marked
``shared`` where an earlier graph holds the same storage, and the total ``bench/speed.py`` counts.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout

import torch  # noqa: E402

import qpass  # noqa: E402
from qpass.graph import constants  # noqa: E402

import speed  # noqa: E402  (bench/speed.py: the model, workloads and weight count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--preset", default="w8a8_dynamic")
    parser.add_argument("--prompt-cache", action="store_true", help="the prompt with use_cache=True, as generate() runs it")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, desc, batches = speed.load("llama2048", args.layers, torch.device("cpu"), torch.float32)
    calib = qpass.calibrate(model, batches(), progress=False)
    w = speed.Workloads(model, 512, 512, torch.device("cpu"))
    copy_ = copy.deepcopy(model)
    backend = qpass.backend(args.preset, calibration=calib)
    compiled = torch.compile(copy_, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(w.ids, use_cache=args.prompt_cache, logits_to_keep=1)
        w.decode(compiled, w.new_cache(model))
    backend.release_weights(copy_)
    print(f"{desc}, {args.preset}, prompt use_cache={args.prompt_cache}")
    seen = set()
    for i, gm in enumerate(backend.graphs):
        for attr, t in constants(gm).items():
            key, size = speed._storage_key(t), speed._bytes(t)
            if size > 100_000:
                print(f"graph {i}: {gm.qpass_names[attr]} {tuple(t.shape)} {t.dtype} {size / 2**20:.2f} MiB"
                      + (" shared" if key in seen else ""))
            seen.add(key)
    print(f"weights as bench/speed.py counts them: {speed.weight_bytes(copy_, backend.graphs) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
