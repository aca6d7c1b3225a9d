"""Where the startup of a saved checkpoint goes: ``qpass.load`` -> first tokens, one fresh process,
with wall-clock timers around qpass's own parts (no profiler overhead).

    python bench/profile_startup.py w8a8_static [--threads 1]      # or fp32, w8a8_dynamic

Run it twice with the same ``TORCHINDUCTOR_CACHE_DIR``: the first run fills Inductor's cache (cold),
the second reads it (warm, every later start). The checkpoint is ``bench/startup.py``'s (written
once by it). Timers (seconds, summed over graphs; nested timers count inside their parents):
``qpass.load``'s parts, each pass of ``qpass.backend.PIPELINE``, the rest of the backend
(``QGraph`` copy, constants, fake-tensor propagation of new nodes, build), Inductor's
``compile_fx``, and Inductor's FX-graph-cache counters. Use 1 thread to locate costs on a shared
machine: at 2 threads every eager op's OpenMP region waits for a core (10x and more under load).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout

import torch  # noqa: E402
import transformers  # noqa: E402

import qpass  # noqa: E402
import qpass.backend  # noqa: E402
import qpass.graph  # noqa: E402
import qpass.load  # noqa: E402
from qpass.passes import lower as lower_pass  # noqa: E402
from qpass.passes import quantize as quantize_pass  # noqa: E402

from profile_compile import Timers, patched  # noqa: E402  (bench/profile_compile.py)

backend_module = sys.modules["qpass.backend"]  # the modules (``qpass.backend`` / ``qpass.load`` are functions)
load_module = sys.modules["qpass.load"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("contender", help="fp32 or a preset bench/startup.py saved (w8a8_static, w8a8_dynamic)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torch._inductor import compile_fx as compile_fx_module

    from startup import CACHE, PROMPT  # noqa: E402  (bench/startup.py)

    timers = Timers()
    pipeline = tuple((name, timers.wrap(f"pass {name}", run)) for name, run in backend_module.PIPELINE)
    targets = [
        (backend_module, "PIPELINE", pipeline),
        (backend_module.QPassBackend, "_compile", "backend (all of it)"),
        (compile_fx_module, "compile_fx", "Inductor compile_fx (FX graph cache lookup and load when warm)"),
        (qpass.graph.QGraph, "__init__", "QGraph copy"),
        (qpass.graph.QGraph, "constant", "QGraph.constant (new graph constants)"),
        (qpass.graph.QGraph, "call", "QGraph.call (new nodes, fake-tensor propagation)"),
        (qpass.graph.QGraph, "build", "QGraph.build"),
        (quantize_pass, "_checked_stored_weight", "quantize: stored weight checks"),
        (lower_pass, "_emit_shared_input", "lower: shared-input groups"),
        (lower_pass._Emit, "packed", "lower: packed weights"),
        (load_module, "qpass_compile", "load: qpass.compile"),
        (backend_module.QPassBackend, "defer_weights", "load: defer_weights (quantized linears left unwritten)"),
        (backend_module.QPassBackend, "_materialize", "deferred weights written (a read of one; 0 calls expected)"),
        (load_module, "_config", "load: config groups"),
        (torch.nn.Module, "load_state_dict", "load: load_state_dict"),
    ]
    with contextlib.ExitStack() as stack:
        for obj, name, label in targets:
            value = label if not isinstance(label, str) else timers.wrap(label, getattr(obj, name))
            stack.enter_context(patched(obj, name, value))
        start = time.perf_counter()
        if args.contender == "fp32":
            from qpass import realdata

            folder = realdata.ensure_smollm2_cache()
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            model.forward = torch.compile(type(model).forward.__get__(model))
        else:
            folder = CACHE / f"smollm2-{args.contender}"
            model, _backend = qpass.load(folder)
        loaded = time.perf_counter()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        done = time.perf_counter()
    print(f"{args.contender}, {args.threads} threads, load average {os.getloadavg()}: load {loaded - start:.2f} s, "
          f"load + tokenizer + compile + 2 tokens {done - start:.2f} s, {tokenizer.decode(out[0, ids.shape[1]:])!r}")
    for name in sorted(timers.seconds, key=lambda n: -timers.seconds[n]):
        print(f"  {name:62s} {timers.seconds[name]:7.2f} s  x{timers.calls[name]}")
    print("  Inductor:", {k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if k.startswith("fxgraph")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
