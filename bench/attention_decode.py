"""SmolLM2 decode steps with qpass's attention rewrites (``qpass.passes.attention``) against the same
preset without them, in one process, the two taking turns (real weights, one token after 512 in a
``StaticCache``, as ``bench/speed.py`` decodes).

    python bench/attention_decode.py [--presets w8a8_dynamic w8a16] [--rounds 20] [--steps 10] [--threads 2]
                                     [--json bench/results/attention_decode.json]

``w8a16`` runs the model in bfloat16 (its kernels' dtype), the others in float32. Per preset: the
largest difference between the two decode logits; the relative error of each against the fp32 eager
model (``bench/speed.py``'s measure) on ``--error-tokens`` different next tokens, mean and spread;
and the median step time of each over ``rounds`` alternating rounds of ``steps`` steps. "Without" switches both rewrites off (the KV heads repeated,
the flash kernel at one query), as qpass compiled before them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import statistics
import sys
import time
import unittest.mock
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout

import torch  # noqa: E402

import qpass  # noqa: E402
from qpass import realdata  # noqa: E402

import fresh_process  # noqa: E402  (bench/fresh_process.py)
import speed  # noqa: E402  (bench/speed.py: the decode workload)
from startup import calibration  # noqa: E402  (bench/startup.py: 8 x 512 Wikipedia tokens, kept in a file)

backend_module = importlib.import_module("qpass.backend")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["w8a8_dynamic", "w8a16"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--error-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "attention_decode.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fp32, tokenizer = realdata.load_smollm2()
    calib = calibration(fp32, tokenizer)
    rows = []
    for preset in args.presets:
        dtype = torch.bfloat16 if preset in ("w8a16", "w4a16") else torch.float32
        model = fp32 if dtype == torch.float32 else copy.deepcopy(fp32).to(dtype)
        w = speed.Workloads(model, 1, 512, torch.device("cpu"))
        runs, row = {}, {"preset": preset, "dtype": str(dtype).removeprefix("torch.")}
        for rewrites in (True, False):
            torch._dynamo.reset()
            off = unittest.mock.patch.multiple(backend_module, grouped_query_attention=lambda qg: 0,
                                               decode_attention=lambda qg: 0)
            with contextlib.nullcontext() if rewrites else off:
                config = qpass.preset(preset)
                needs_calib = config.activation is not None or config.outliers is not None or config.smoothing is not None
                backend = qpass.backend(config, calibration=calib if needs_calib else None)
                compiled = torch.compile(copy.deepcopy(model), dynamic=False, backend=backend)
                cache = w.new_cache(model)
                with torch.no_grad():
                    out = w.decode(compiled, cache)
            row[f"rewritten_calls_{rewrites}"] = [backend.report.grouped_attention, backend.report.decode_attention]
            runs[rewrites] = (compiled, cache, out)
        row["max_abs_diff"] = (runs[True][2] - runs[False][2]).abs().max().item()
        tokens = torch.randint(0, model.config.vocab_size, (args.error_tokens, 1, 1), generator=torch.Generator().manual_seed(5))
        ref_cache = w.new_cache(fp32)
        errors = {True: [], False: []}
        with torch.no_grad():
            for token in tokens:
                w.token = token
                ref = w.decode(fp32, ref_cache)
                for rewrites, (compiled, cache, _) in runs.items():
                    errors[rewrites].append(speed._rel(w.decode(compiled, cache), ref))
        w.token = tokens[0]
        for rewrites, errs in errors.items():
            row[f"rel_err_mean_rewrites={rewrites}"] = round(statistics.mean(errs), 5)
            row[f"rel_err_sd_rewrites={rewrites}"] = round(statistics.stdev(errs), 5)
        row["logit_scale"] = runs[False][2].abs().max().item()
        times = {True: [], False: []}
        with torch.no_grad():
            for _ in range(args.rounds):
                for rewrites, (compiled, cache, _) in runs.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        w.decode(compiled, cache)
                    times[rewrites].append(1000 * (time.perf_counter() - start) / args.steps)
        for rewrites, ms in times.items():
            row[f"median_ms_rewrites={rewrites}"] = round(statistics.median(ms), 3)
        row["speedup"] = round(row["median_ms_rewrites=False"] / row["median_ms_rewrites=True"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = {"command": "python bench/attention_decode.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "cpu": fresh_process.cpu_kind(), "threads": args.threads, "torch": torch.__version__}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
