"""A prompt's run with its graph compiled one decoder block at a time (``by_block=True``, the default)
against the same graph compiled whole, in one process, the two taking turns (SmolLM2, real weights).

    python bench/by_block.py [--preset w8a8_dynamic] [--tokens 512 2] [--rounds 8] [--threads 2]
                             [--json bench/results/by_block_prefill.json]

Per prompt length: each backend's first call (its compile, Inductor's cache as it is), the largest
difference between the two logits (the pieces compute the whole graph), and the median of ``rounds``
timed runs each, alternating. The short prompt shows what each piece's call costs (SmolLM2: 32
pieces), the long one what the split costs a prefill in all.
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
from startup import calibration  # noqa: E402  (bench/startup.py: 8 x 512 Wikipedia tokens, kept in a file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="w8a8_dynamic")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "by_block_prefill.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = realdata.load_smollm2()
    calib = calibration(model, tokenizer)
    rows = []
    for n in args.tokens:
        ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
        runs, row = {}, {"tokens": n}
        for by_block in (True, False):
            torch._dynamo.reset()
            compiled = torch.compile(copy.deepcopy(model), dynamic=False,
                                     backend=qpass.backend(args.preset, calibration=calib, by_block=by_block))

            def run(compiled=compiled):
                with torch.no_grad():
                    return compiled(ids, use_cache=False, logits_to_keep=1).logits

            start = time.perf_counter()
            out = run()
            row[f"first_call_s_by_block={by_block}"] = time.perf_counter() - start
            runs[by_block] = (run, out)
        row["max_abs_diff"] = (runs[True][1] - runs[False][1]).abs().max().item()
        times = {True: [], False: []}
        for _ in range(args.rounds):
            for by_block, (run, _) in runs.items():
                start = time.perf_counter()
                run()
                times[by_block].append(1000 * (time.perf_counter() - start))
        for by_block, ms in times.items():
            row[f"median_ms_by_block={by_block}"] = statistics.median(ms)
            row[f"ms_by_block={by_block}"] = ms
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("ms_")}), flush=True)
        rows.append(row)
    meta = {"command": "python bench/by_block.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "cpu": fresh_process.cpu_kind(), "threads": args.threads, "preset": args.preset, "torch": torch.__version__}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
