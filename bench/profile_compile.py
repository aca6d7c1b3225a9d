"""Where compile time goes: fp32 ``torch.compile`` against qpass, on SmolLM2, one fresh process each.

    python bench/profile_compile.py [--contenders fp32 w8a8_static w8a8_dynamic load:w8a8_static ...]
                                    [--threads 2] [--out bench/results/profile_compile_smollm2.md]

Each contender runs in a fresh subprocess with an empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR``
a new temporary folder: a cold compile, as a user's first run) and compiles what
``bench/speed.py`` times as compile time: the first prefill call (1 x 512 tokens, ``use_cache=False,
logits_to_keep=1``) and the first decode call (1 token against a ``StaticCache`` holding 512), both
``dynamic=False``. Contenders:
  ``fp32``              ``torch.compile(model)`` (Inductor, default settings);
  ``<preset>``          ``torch.compile(model, backend=qpass.backend(preset, calibration=calib))``,
                        the calibration (8 x 512 Wikipedia tokens) read from a file made once
                        (``--calib``; its making is not timed);
  ``load:<preset>``     ``qpass.load(dir)`` of a checkpoint ``qpass.save`` wrote once beforehand
                        (``--saved``; not timed), then the same two calls through its backend.
Timers (wall clock, no profiler overhead unless ``--cprofile``): the backend's own parts (each pass
of ``qpass.backend.PIPELINE``; the rest of ``QPassBackend._compile``: graph copy, checks, coverage
survey, building the rewritten GraphModule), Inductor's ``compile_fx``, and Dynamo (the first calls
minus the backend minus one warm call of each workload); Dynamo's own ``compile_times`` metrics say
where Inductor's time goes (lowering, code generation, the C++ compiler). ``--cprofile`` adds a
cProfile of qpass's passes (not of Inductor), its top functions by cumulative time in the table.
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import io
import json
import logging
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout, and bench/ for speed.py

import torch  # noqa: E402

import qpass  # noqa: E402
import qpass.backend  # noqa: E402
from qpass import realdata  # noqa: E402

import fresh_process  # noqa: E402  (bench/fresh_process.py)
from startup import calibration, saved_checkpoint  # noqa: E402  (bench/startup.py)

backend_module = sys.modules["qpass.backend"]  # the module (``qpass.backend`` is the function)

DEFAULT_CONTENDERS = ("fp32", "w8a8_static", "w8a8_dynamic", "load:w8a8_static", "load:w8a8_dynamic")
# Inductor's phases worth a column, as Dynamo's ``compile_times`` names them (seconds, summed over graphs)
INDUCTOR_PHASES = {
    "GraphLowering.run": "lowering to IR",
    "GraphLowering.codegen": "code generation",
    "PyCodeCache.load_by_key_path": "load generated module",
    "async_compile.wait": "wait for C++ kernels",
    "compile_fx.<locals>.fw_compiler_base": "aot forward compiler",
    "create_aot_dispatcher_function": "AOT dispatch (functionalize, partition)",
}


# ----------------------------------------------------------------------------- one contender (child)


class Timers:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._depth: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn, profile: cProfile.Profile | None = None):
        """``fn`` timed under ``name`` (the outermost call only, so recursion counts once)."""
        def timed(*args, **kwargs):
            self._depth[name] += 1
            start = time.perf_counter()
            if profile is not None and self._depth[name] == 1:
                profile.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                if profile is not None and self._depth[name] == 1:
                    profile.disable()
                self._depth[name] -= 1
                if self._depth[name] == 0:
                    self.seconds[name] += time.perf_counter() - start
                    self.calls[name] += 1
        return timed


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def child(contender: str, prefill: int, context: int, use_cprofile: bool) -> dict:
    import transformers
    from torch._inductor import compile_fx as compile_fx_module

    import speed

    timers = Timers()
    prof = cProfile.Profile() if use_cprofile else None
    start = time.perf_counter()
    model_fp32, tokenizer = realdata.load_smollm2()
    model_load_s = time.perf_counter() - start
    w = speed.Workloads(model_fp32, prefill, context, torch.device("cpu"))
    with torch.no_grad():
        cache = w.new_cache(model_fp32)  # filled by the fp32 model (eager), not timed
    backend = None
    load_s = float("nan")
    if contender == "fp32":
        model = model_fp32
        fn = torch.compile(model, dynamic=False)
    elif contender.startswith("load:"):
        directory = saved_checkpoint(contender.split(":", 1)[1])
        del model_fp32
        start = time.perf_counter()
        model, backend = qpass.load(directory, compile=False)
        load_s = time.perf_counter() - start
        fn = torch.compile(model, backend=backend, dynamic=False)
    else:
        calib = calibration(model_fp32, tokenizer)
        model = model_fp32
        backend = qpass.backend(contender, calibration=calib)
        fn = torch.compile(model, backend=backend, dynamic=False)

    pipeline = tuple((name, timers.wrap(f"qpass {name}", run, prof)) for name, run in backend_module.PIPELINE)
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(backend_module, "PIPELINE", pipeline))
        stack.enter_context(patched(backend_module.QPassBackend, "_compile",
                                    timers.wrap("qpass backend", backend_module.QPassBackend._compile)))
        stack.enter_context(patched(compile_fx_module, "compile_fx", timers.wrap("inductor compile_fx", compile_fx_module.compile_fx)))
        torch._dynamo.utils.compilation_time_metrics.clear()
        with torch.no_grad():
            t0 = time.perf_counter()
            w.prefill(fn)
            t1 = time.perf_counter()
            w.decode(fn, cache)
            t2 = time.perf_counter()
            # one warm call of each: what the first calls spent running rather than compiling
            w.prefill(fn)
            t3 = time.perf_counter()
            w.decode(fn, cache)
            t4 = time.perf_counter()
    first = {"prefill": t1 - t0, "decode": t2 - t1}
    warm = {"prefill": t3 - t2, "decode": t4 - t3}
    metrics = {k: sum(v) for k, v in torch._dynamo.utils.compilation_time_metrics.items()}
    backend_s = timers.seconds.get("qpass backend", timers.seconds.get("inductor compile_fx", 0.0))
    compile_s = sum(first.values())
    result = {
        "contender": contender,
        "compile_s": compile_s,  # first prefill + first decode call, as bench/speed.py counts it
        "first_call_s": first,
        "warm_call_s": warm,
        "dynamo_s": compile_s - sum(warm.values()) - backend_s,  # tracing, guards, bytecode (approx.)
        "timers": dict(timers.seconds),
        "timer_calls": dict(timers.calls),
        "inductor_phases": {label: metrics.get(key, 0.0) for key, label in INDUCTOR_PHASES.items()},
        "dynamo_metrics": metrics,
        "graphs": len(backend.graphs) if backend is not None else None,
        "model_load_s": model_load_s,
        "qpass_load_s": load_s,
    }
    if prof is not None:
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
        stats.print_stats(r"qpass", 40)
        result["cprofile"] = out.getvalue()
    return result


# ----------------------------------------------------------------------------- the table (parent)


def table(results: list[dict], meta: dict) -> str:
    cols = ["contender", "compile s (prefill + decode)", "vs fp32", "Dynamo (approx.)"]
    passes = sorted({k for r in results for k in r.get("timers", ()) if k.startswith("qpass ") and k != "qpass backend"},
                    key=lambda k: [n for n, _ in backend_module.PIPELINE].index(k.split()[1]))
    cols += [f"{p}" for p in passes] + ["qpass other (copy, checks, build)", "Inductor compile_fx"]
    cols += [f"Inductor: {label}" for label in INDUCTOR_PHASES.values()] + ["qpass.load read s"]
    base = next((r["compile_s"] for r in results if r["contender"] == "fp32"), float("nan"))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['contender']} | failed: {r['error'][:200]} |" + " |" * (len(cols) - 2))
            continue
        t = r["timers"]
        inductor = t.get("inductor compile_fx", 0.0)
        own = sum(t.get(p, 0.0) for p in passes)
        other = t.get("qpass backend", inductor) - inductor - own
        cells = [r["contender"], f"{r['compile_s']:.1f}", f"{r['compile_s'] / base:.2f}x", f"{r['dynamo_s']:.1f}"]
        cells += [f"{t.get(p, 0.0):.1f}" for p in passes] + [f"{other:.1f}", f"{inductor:.1f}"]
        cells += [f"{v:.1f}" for v in r["inductor_phases"].values()]
        cells.append("" if r["qpass_load_s"] != r["qpass_load_s"] else f"{r['qpass_load_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    head = (f"# Compile time on SmolLM2-135M: fp32 torch.compile against qpass\n\n"
            f"`{meta['command']}`\n\n{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, "
            f"load average before the run {meta['load_before']}, after {meta['load_after']}; "
            f"each contender in a fresh process with an empty Inductor cache; seconds, wall clock.\n"
            f"Compile s = first prefill (512 tokens) + first decode (StaticCache, 1 token) call, minus nothing; "
            f"Dynamo = that minus the backend minus one warm call of each; qpass's columns are inside the backend, "
            f"Inductor's phases inside compile_fx (Dynamo's own `compile_times`, summed over graphs).\n\n")
    body = head + "\n".join(lines) + "\n"
    for r in results:
        if r.get("cprofile"):
            body += f"\n## cProfile of qpass's passes, {r['contender']} (top 40 by cumulative time)\n\n```\n{r['cprofile']}```\n"
    return body


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contenders", nargs="+", default=list(DEFAULT_CONTENDERS))
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cprofile", action="store_true", help="cProfile qpass's passes (slows them)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "profile_compile_smollm2.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.child:
        try:
            result = child(args.child, args.prefill, args.context, args.cprofile)
        except Exception as e:  # noqa: BLE001 - reported in the parent's table
            logging.exception("contender %s failed", args.child)
            result = {"contender": args.child, "error": f"{type(e).__name__}: {e}"}
        fresh_process.report(result)
        return 0

    meta = {"command": "python bench/profile_compile.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "cpu": fresh_process.cpu_kind(), "threads": args.threads, "torch": torch.__version__,
            "load_before": load_average()}
    results = []
    for contender in args.contenders:
        flags = ["--prefill", str(args.prefill), "--context", str(args.context), "--threads", str(args.threads)]
        with tempfile.TemporaryDirectory(prefix="qpass-inductor-") as cache_dir:
            result = fresh_process.run(__file__, contender, flags + (["--cprofile"] if args.cprofile else []), cache_dir)
        print(json.dumps({k: v for k, v in result.items() if k not in ("cprofile", "dynamo_metrics")}), flush=True)
        results.append(result)
    meta["load_after"] = load_average()
    text = table(results, meta)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
