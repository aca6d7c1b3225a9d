"""Where one decode step's time goes: ``torch.profiler`` on each contender of ``bench/speed.py``.

    python bench/profile_decode.py [--model smollm2|llama2048] [--layers 4] [--steps 5] [--threads 2]
                                   [--contenders "fp32 torch.compile" "qpass w8a8_dynamic" ...] [--rows 14]
                                   [--prefill 512] [--dtype bf16 --presets w8a16 w4a16]

``--prefill N`` profiles ``bench/speed.py``'s prefill instead (N tokens, no cache, the last
position's logits) and compiles only that graph.

Same model, workload (one token against a ``StaticCache`` holding ``--context`` tokens) and contenders
as ``bench/speed.py``, but only the decode graph is compiled (no prefill), with Inductor's kernel
profiling on so that its generated C++ kernels show up by name. For each contender: the median wall
time of a step (profiler off), then the operators by self CPU time over ``--steps`` profiled steps
(per step: milliseconds and calls), and the number of calls per step of each qpass kernel op.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]  # this checkout's qpass
import speed  # noqa: E402  (bench/speed.py: models, workloads, contenders)

logger = logging.getLogger("bench.profile_decode")


def run_step(fn, w: speed.Workloads, cache) -> None:
    """One decode step against ``cache``, or one prefill when ``cache`` is None."""
    if cache is None:
        w.prefill(fn)
        return
    w.rewind(cache)
    fn(w.token, past_key_values=cache, cache_position=w.position, use_cache=True)


def step_ms(fn, w: speed.Workloads, cache, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run_step(fn, w, cache)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def profile_steps(fn, w: speed.Workloads, cache, steps: int) -> list[tuple[str, float, float]]:
    """``[(op, self CPU ms per step, calls per step)]`` over ``steps`` profiled steps, largest first."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run_step(fn, w, cache)
    rows = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])


def format_profile(name: str, wall: float, rows: list[tuple[str, float, float]], top: int) -> str:
    total = sum(r[1] for r in rows)
    lines = [f"### {name}: {wall:.2f} ms per step (profiler off); profiled self CPU {total:.2f} ms per step",
             "", "| op | self ms / step | % | calls / step | us / call |", "|---|---|---|---|---|"]
    for op, ms, calls in rows[:top]:
        lines.append(f"| `{op[:70]}` | {ms:.3f} | {100 * ms / total:.1f} | {calls:g} | {1e3 * ms / max(calls, 1):.1f} |")
    qpass_ops = [(op, ms, calls) for op, ms, calls in rows if op.startswith("qpass::")]
    if qpass_ops:
        lines.append("")
        lines.append("qpass kernel ops: " + ", ".join(f"`{op}` {calls:g} calls, {ms:.2f} ms" for op, ms, calls in qpass_ops))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=speed.MODELS)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="profiled decode steps")
    parser.add_argument("--reps", type=int, default=30, help="timed decode steps, profiler off")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=14)
    parser.add_argument("--presets", nargs="+", default=["w8a8_dynamic", "w8a8_static"])
    parser.add_argument("--contenders", nargs="+", default=None, help="names to run (default: all but fp32 eager)")
    parser.add_argument("--prefill", type=int, default=None, help="profile a prefill of this many tokens instead")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="the model's dtype (bf16: weight-only contenders)")
    parser.add_argument("--weight-only-lm-head", action="store_true",
                        help="also each preset with lm_head's weights int8, its input float (bench/speed.py's flag)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, desc, batches = speed.load(args.model, args.layers, device, dtype)
    w = speed.Workloads(model, args.prefill or 8, args.context, device)
    what = f"prefill {args.prefill} tokens" if args.prefill else f"decode 1 token after {args.context}"
    print(f"{desc}, {args.dtype}: {what}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    for label, make in speed.contenders(model, args.presets, batches, torchao=True, weight_only_lm_head=args.weight_only_lm_head):
        if (args.contenders and label not in args.contenders) or (not args.contenders and label == "fp32 eager"):
            continue
        torch._dynamo.reset()
        try:
            c = make()
            with torch.no_grad():
                cache = None if args.prefill else w.new_cache(model)
                with c.scope(), torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
                    run_step(c.fn, w, cache)
                wall = step_ms(c.fn, w, cache, args.reps)
                rows = profile_steps(c.fn, w, cache, args.steps)
            print(format_profile(c.name, wall, rows, args.rows) + "\n", flush=True)
        finally:
            torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
