"""Startup: from a fresh process to the first generated tokens, fp32 ``torch.compile`` against a saved
qpass checkpoint reloaded with ``qpass.load`` (issue 16, Must 6).

    python bench/startup.py [--presets w8a8_static w8a8_dynamic] [--threads 2] [--new-tokens 2]
                            [--caches cold warm] [--json bench/results/startup_cpu.json]

Each measurement is one fresh subprocess (the timer starts after ``import torch, transformers, qpass``):
  fp32      ``AutoModelForCausalLM.from_pretrained`` of SmolLM2's safetensors folder (the converted
            model ``qpass.realdata`` keeps), ``model.forward = torch.compile(model.forward)``;
  <preset>  ``qpass.load(dir)`` of a checkpoint ``qpass.save`` wrote beforehand (once, with the
            calibration of 8 x 512 Wikipedia tokens; not timed): the model rebuilt from the stored
            integers and its forward compiled by ``qpass.compile``;
then greedy ``model.generate(prompt, max_new_tokens=N)`` (N=2: the prefill graph gives the first
token, the first decode step's graph the second). Timed: load, and load + compile + generate.
``--caches``: ``cold`` runs with an empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR`` a new folder per
contender, a user's first start), ``warm`` runs again on the folder the cold run filled (every later
start); the contenders take turns (all cold runs, then all warm runs).
The ratio is each preset's time over fp32's in the same cache state. Results as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout

import torch  # noqa: E402
import transformers  # noqa: E402

import qpass  # noqa: E402
from qpass import realdata  # noqa: E402

import fresh_process  # noqa: E402  (bench/fresh_process.py)

PROMPT = "The capital of France is"
CACHE = Path(os.environ.get("QPASS_BENCH_CACHE", "~/.cache/qpass/bench")).expanduser()


def calibration(model, tokenizer) -> qpass.Calibration:
    """SmolLM2's calibration on 8 x 512 Wikipedia tokens, made once and kept in a file."""
    path = CACHE / "smollm2_calib_8x512.pt"
    if path.is_file():
        return qpass.Calibration.load(path)
    calib = qpass.calibrate(model, realdata.calibration_batches(tokenizer, 8, 512), progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    calib.save(path)
    return calib


def saved_checkpoint(preset: str) -> Path:
    """A ``qpass.save`` directory of SmolLM2 with ``preset``, written once."""
    out = CACHE / f"smollm2-{preset}"
    if not (out / "config.json").is_file():
        model, tokenizer = realdata.load_smollm2()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
        qpass.save(model, preset, tmp, calibration=calibration(model, tokenizer), tokenizer=tokenizer)
        try:
            tmp.rename(out)
        except OSError:  # another process saved it meanwhile
            if not (out / "config.json").is_file():
                raise
            shutil.rmtree(tmp)
    return out


def child(contender: str, new_tokens: int) -> dict:
    start = time.perf_counter()
    if contender == "fp32":
        folder = realdata.ensure_smollm2_cache()
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        loaded = time.perf_counter()
        model.forward = torch.compile(type(model).forward.__get__(model))
    else:
        folder = CACHE / f"smollm2-{contender}"
        model, _backend = qpass.load(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        loaded = time.perf_counter()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    done = time.perf_counter()
    return {"contender": contender, "load_s": loaded - start, "first_tokens_s": done - start,
            "compile_and_generate_s": done - loaded, "tokens": out[0, ids.shape[1]:].tolist(),
            "text": tokenizer.decode(out[0, ids.shape[1]:]),
            # graphs Dynamo compiled and how Inductor's FX graph cache answered (hit / miss / bypass)
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
            "fx_graph_cache": {k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if k.startswith("fxgraph_cache")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["w8a8_static", "w8a8_dynamic"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=2)
    parser.add_argument("--caches", nargs="+", default=["cold", "warm"], choices=("cold", "warm"))
    parser.add_argument("--json", type=Path, default=HERE / "results" / "startup_cpu.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.child:
        fresh_process.report(child(args.child, args.new_tokens))
        return 0

    for preset in args.presets:
        saved_checkpoint(preset)  # not timed
    meta = {"command": "python bench/startup.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "cpu": fresh_process.cpu_kind(), "threads": args.threads, "torch": torch.__version__,
            "prompt": PROMPT, "new_tokens": args.new_tokens,
            "load_average_before": os.getloadavg()}
    rows = []
    contenders = ["fp32", *args.presets]
    states = ["cold", "warm"] if "warm" in args.caches else ["cold"]  # a warm run reads what the cold one wrote
    with contextlib.ExitStack() as stack:
        cache_dirs = {c: stack.enter_context(tempfile.TemporaryDirectory(prefix="qpass-startup-inductor-"))
                      for c in contenders}
        for state in states:  # contenders interleaved, so that a change of the machine's load hits all alike
            for contender in contenders:
                flags = ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
                result = fresh_process.run(__file__, contender, flags, cache_dirs[contender])
                result["cache"] = state
                if state in args.caches:
                    rows.append(result)
                print(json.dumps(result), flush=True)
    meta["load_average_after"] = os.getloadavg()
    for row in rows:
        base = next((r for r in rows if r["contender"] == "fp32" and r["cache"] == row["cache"]), None)
        if base and "error" not in row and "error" not in base:
            row["vs_fp32"] = row["first_tokens_s"] / base["first_tokens_s"]
            row["same_tokens_as_fp32"] = row["tokens"] == base["tokens"]
    print(f"{meta['cpu']}, {args.threads} threads, load average {meta['load_average_before']} -> {meta['load_average_after']}")
    print("| contender | Inductor cache | load s | load + compile + first tokens s | vs fp32 | process s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['contender']} | {r['cache']} | failed: {r['error'][-200:]!r} | | | |")
            continue
        print(f"| {r['contender']} | {r['cache']} | {r['load_s']:.1f} | {r['first_tokens_s']:.1f} | "
              f"{r.get('vs_fp32', float('nan')):.2f}x | {r['process_s']:.1f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
