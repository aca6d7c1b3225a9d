"""What Dynamo's guards cost a SmolLM2 decode step: the same preset compiled with each of
``torch.compiler``'s guard filters (``options={"guard_filter_fn": ...}``), taking turns in one process
(real weights, one token after 512 in a ``StaticCache``, as ``bench/speed.py`` decodes).

    python bench/guard_filters.py [--preset w8a8_dynamic] [--rounds 15] [--steps 10] [--threads 2]
                                  [--json bench/results/guard_filters.json]

The filters are unsafe by their own documentation: without guards on the model's modules a changed
module or parameter is not noticed, and without any guard a new input shape runs a graph specialised
for another. This measures what they would save; qpass does not set them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout

import torch  # noqa: E402

import qpass  # noqa: E402
from qpass import realdata  # noqa: E402

import fresh_process  # noqa: E402  (bench/fresh_process.py)
import speed  # noqa: E402  (bench/speed.py: the decode workload)
from startup import calibration  # noqa: E402  (bench/startup.py: 8 x 512 Wikipedia tokens, kept in a file)

FILTERS = {
    "all guards (default)": None,
    "no guards on nn modules": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
    "no guards at all": torch.compiler.skip_all_guards_unsafe,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="w8a8_dynamic")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "guard_filters.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fp32, tokenizer = realdata.load_smollm2()
    calib = calibration(fp32, tokenizer)
    w = speed.Workloads(fp32, 1, 512, torch.device("cpu"))
    runs = {}
    for name, guard_filter in FILTERS.items():
        torch._dynamo.reset()
        options = {} if guard_filter is None else {"options": {"guard_filter_fn": guard_filter}}
        backend = qpass.backend(args.preset, calibration=calib)
        compiled = torch.compile(copy.deepcopy(fp32), backend=backend, dynamic=False, **options)
        cache = w.new_cache(fp32)
        with torch.no_grad():
            runs[name] = (compiled, cache, w.decode(compiled, cache))
    first = next(iter(runs.values()))[2]
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, (compiled, cache, _) in runs.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    w.decode(compiled, cache)
                times[name].append(1000 * (time.perf_counter() - start) / args.steps)
    rows = []
    base = statistics.median(times["all guards (default)"])
    for name, ms in times.items():
        median = statistics.median(ms)
        rows.append({"guards": name, "median_ms": round(median, 3), "saved_ms": round(base - median, 3),
                     "max_abs_logit_diff": (runs[name][2] - first).abs().max().item()})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"command": "python bench/guard_filters.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "preset": args.preset, "cpu": fresh_process.cpu_kind(), "threads": args.threads, "torch": torch.__version__}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
