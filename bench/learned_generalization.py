"""How well learned smoothing factors (FSBR) generalize, block by block, on SmolLM2: a cheap
selection tool for the learning's settings, before spending a perplexity run on them.

    python bench/learned_generalization.py --config w8a8_static [--layers 1 5 11 17 23 28]

For the attention and MLP blocks of a few layers it learns the factors under several settings
(rows, held-out split, penalty, steps, learning rate) from the Wikipedia calibration, and measures
each result's block error (``qpass.fsbr.block_loss``) relative to the auto-alpha start on text the
factors never saw and that no perplexity in the README is measured on: the middle of the Wikipedia
stream (after the calibration, before the held-out end) and a novel (gensim's
``crime-and-punishment.txt``). A ratio below 1 means the learned factors beat auto alpha there.

The calibration has 512 samples per linear (32 rows per 512-token batch, positions 0, 16, ...);
the 64-sample settings take its positions 0, 128, 256, 384 of each batch, which are exactly the
rows ``--calib-samples 64`` keeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qpass  # noqa: E402
from qpass import fsbr, realdata  # noqa: E402

logger = logging.getLogger("learned_generalization")

BATCHES, SEQLEN, SAMPLES = 16, 512, 512
ROWS_64 = [b * 32 + j for b in range(BATCHES) for j in (0, 8, 16, 24)]


def old_learn(block: fsbr.Block, steps: int, lr: float) -> fsbr.Learned:
    """The learning as first built: held-out rows interleaved (every fourth sample)."""
    n = len(next(iter(block.refs.values())))
    held = torch.arange(n)[3::4]
    train = torch.tensor([i for i in range(n) if i % 4 != 3])
    log_s = [s.double().log().float().clone().requires_grad_(True) for s in block.init]
    opt = torch.optim.Adam(log_s, lr=lr)

    def held_loss() -> float:
        with torch.no_grad():
            return float(fsbr.block_loss(block, log_s, held))

    best = start = held_loss()
    best_s, best_step = [t.detach().clone() for t in log_s], 0
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        fsbr.block_loss(block, log_s, train).backward()
        opt.step()
        if (now := held_loss()) < best:
            best, best_step, best_s = now, step, [t.detach().clone() for t in log_s]
    return fsbr.Learned([t.exp() for t in best_s], start, best, best_step)


REAL_LEARN = fsbr.learn  # the compile below calls ``fsbr.learn``, which main() replaces

# name: (rows, learn function)
SETTINGS = {
    "64 rows, interleaved held-out, lr .02 x64 (as built)": (ROWS_64, lambda b: old_learn(b, 64, 0.02)),
    "64 rows, held-out sequences, lr .02 x64": (ROWS_64, lambda b: REAL_LEARN(b, 64, 0.02)),
    "512 rows, held-out sequences, lr .02 x64": (None, lambda b: REAL_LEARN(b, 64, 0.02)),
    "512 rows, held-out sequences, lr .01 x100": (None, lambda b: REAL_LEARN(b, 100, 0.01)),
    "512 rows, held-out sequences, lr .01 x100, penalty 0.1": (None, lambda b: REAL_LEARN(b, 100, 0.01, penalty=0.1)),
    "512 rows, held-out sequences, lr .01 x100, penalty 1": (None, lambda b: REAL_LEARN(b, 100, 0.01, penalty=1.0)),
}


def with_rows(block: fsbr.Block, x_of) -> fsbr.Block:
    """``block`` on other input rows (``x_of(name, x)``), the same weights, ranges and activation specs."""
    linears = {n: dataclasses.replace(l, x=None if l.x is None else x_of(n, l.x)) for n, l in block.linears.items()}
    return fsbr.Block(linears, block.gated, block.init, block.weight, granularity=block.granularity)


def error(block: fsbr.Block, factors) -> float:
    with torch.no_grad():
        return float(fsbr.block_loss(block, [f.double().log().float() for f in factors]))


def validation_texts(tokenizer) -> dict[str, list[torch.Tensor]]:
    wiki = realdata.wikipedia_token_ids(tokenizer)
    start = BATCHES * SEQLEN + 8 * SEQLEN  # after the calibration
    assert start + 4 * SEQLEN <= wiki.numel() - realdata.HELD_OUT_TOKENS  # before the evaluation text
    novel = realdata.token_ids(tokenizer, realdata._gensim_data("crime-and-punishment.txt").read_text(errors="replace"))
    mid = novel.numel() // 2
    return {
        "wiki-mid": realdata.windows(wiki[start:start + 4 * SEQLEN], SEQLEN),
        "novel": realdata.windows(novel[mid:mid + 4 * SEQLEN], SEQLEN),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="w8a8_static")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 5, 11, 17, 23, 28])
    parser.add_argument("--calibration-cache", type=Path, default=Path("/work/tmp/calib_smollm2_s512.pt"))
    parser.add_argument("--settings", nargs="*", help="substrings of the settings to run (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    model, tok = realdata.load_smollm2()
    if args.calibration_cache.exists():
        calib = qpass.Calibration.load(args.calibration_cache)
    else:
        calib = qpass.calibrate(model, realdata.calibration_batches(tok, BATCHES, SEQLEN), samples=SAMPLES)
        calib.save(args.calibration_cache)
    vcache = args.calibration_cache.with_name(args.calibration_cache.stem + "_validation.pt")
    if vcache.exists():
        vcal = {k: qpass.Calibration.load(vcache.with_suffix(f".{k}.pt")) for k in ("wiki-mid", "novel")}
    else:
        vcal = {k: qpass.calibrate(model, w, samples=SAMPLES) for k, w in validation_texts(tok).items()}
        for k, c in vcal.items():
            c.save(vcache.with_suffix(f".{k}.pt"))
        vcache.touch()
    settings = {k: v for k, v in SETTINGS.items() if not args.settings or any(s in k for s in args.settings)}
    rows: list[dict] = []

    def hooked(block, steps, lr, **kw):
        name = next(iter(block.linears))
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
        if layer not in args.layers:
            return fsbr.Learned(list(block.init), 0.0, 0.0, 0)
        kind = "mlp" if block.gated else "attn"
        val = {k: with_rows(block, lambda n, x, c=c: c[n].samples.float()) for k, c in vcal.items()}
        for setting, (idx, fn) in settings.items():
            b = block if idx is None else with_rows(block, lambda n, x: x[idx])
            t = time.perf_counter()
            res = fn(b)
            row = {"layer": layer, "block": kind, "setting": setting, "rows": len(next(iter(b.refs.values()))),
                   "held": res.loss_end / res.loss_start, "step": res.steps, "seconds": time.perf_counter() - t}
            for k, vb in val.items():
                row[k] = error(vb, res.factors) / error(vb, block.init)
            rows.append(row)
            logger.info("%s", row)
        return fsbr.Learned(list(block.init), 0.0, 0.0, 0)

    fsbr.learn = hooked
    config = qpass.preset(args.config, smoothing=qpass.Smoothing("learned", steps=64, lr=0.02))
    torch._dynamo.reset()
    be = qpass.backend(config, calibration=calib, inductor=False)
    ids = realdata.calibration_batches(tok, 1, 32)[0]
    with torch.no_grad():
        torch.compile(model, backend=be, dynamic=False)(ids, use_cache=False)
    fsbr.learn = REAL_LEARN

    print(f"\n{args.config}: block error of the learned factors / auto alpha's (geomean over {len(args.layers)} layers)")
    print("| setting | blocks | held-out (calibration text) | wiki-mid | novel | novel, worst block | kept step (median) | s per block |")
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for setting in settings:
        for kind in ("attn", "mlp", None):
            rs = [r for r in rows if r["setting"] == setting and (kind is None or r["block"] == kind)]
            if not rs:
                continue
            gm = {k: math.exp(statistics.fmean(math.log(r[k]) for r in rs)) for k in ("held", "wiki-mid", "novel")}
            line = (f"| {setting} | {kind or 'all'} | {gm['held']:.3f} | {gm['wiki-mid']:.3f} | {gm['novel']:.3f} | "
                    f"{max(r['novel'] for r in rs):.3f} | {statistics.median(r['step'] for r in rs):.0f} | "
                    f"{statistics.fmean(r['seconds'] for r in rs):.1f} |")
            print(line)
            summary.append(line)
    if args.json:
        args.json.write_text(json.dumps({"config": args.config, "layers": args.layers, "rows": rows,
                                         "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
