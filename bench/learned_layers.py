"""Layer-output FSBR (``qpass.fsbr_layers``) against auto alpha: perplexity of SmolLM2, reference path.

    python bench/learned_layers.py --stage start --state /tmp/ll   # calibrate, fp32, auto alpha
    python bench/learned_layers.py --stage learn --state /tmp/ll [--steps 30 --lr 0.01 --penalty 0 ...]
    python bench/learned_layers.py --stage learn --state /tmp/ll --target logits --tokens 256 --steps 16
    python bench/learned_layers.py --stage learn --state /tmp/ll --target logits --tokens 256 --steps 16 --learn-text mixed

(``--target logits``: every layer's factors learned together through the whole model, on the
next-token KL divergence from fp32; ``qpass.fsbr_layers.learn_layers``. ``--learn-text mixed``: the
learning and held-out sequences alternate calibration Wikipedia and Usenet posts,
``realdata.newsgroup_text``, a text that is never evaluated.)

Two stages so that the expensive part that does not depend on the learning (calibration, fp32, the
auto-alpha compile with its alpha search) runs once. ``start`` compiles ``w8a8_static`` with
``Smoothing("learned", steps=0)``: zero learning steps keep the auto-alpha factors exactly (the
start, ``qpass.fsbr.learn``), folded as auto alpha folds them, so its perplexity is auto alpha's and
the calibration it saves holds the start factors under that config's fingerprint, where
``learn_layers`` reads them. ``learn`` loads that calibration, learns every decoder layer's factors
on the calibration sequences (``--train`` of them, ``--held`` more held out), compiles the learned
config (the factors are read from the calibration, no alpha search) and evaluates it on the same
windows; changes are relative to the fp32 perplexity of the ``start`` stage (eager fp32 on one
thread gives the same numbers in every process).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qpass  # noqa: E402
from qpass import realdata  # noqa: E402
from qpass.accuracy import evaluate, format_table, to_json  # noqa: E402

from accuracy import _texts, cpu_kind  # noqa: E402

logger = logging.getLogger("bench.learned_layers")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["start", "learn"], required=True)
    p.add_argument("--state", type=Path, required=True, help="folder for the calibration and the start stage's JSON")
    p.add_argument("--preset", default="w8a8_static")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--train", type=int, default=6, help="calibration sequences the factors learn from")
    p.add_argument("--held", type=int, default=2, help="calibration sequences that choose the kept step")
    p.add_argument("--tokens", type=int, default=512, help="tokens of each learning sequence")
    p.add_argument("--learn-offset", type=int, default=0,
                   help="skip this many calibration sequences before the learning ones (other sequences, same text)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--penalty", type=float, default=0.0)
    p.add_argument("--target", choices=["fp32", "own", "logits"], default="fp32", help="learn_layers' target")
    p.add_argument("--learn-text", choices=["calibration", "mixed"], default="calibration",
                   help="what the factors learn from: the calibration's Wikipedia sequences, or half of them "
                        "and half Usenet posts (realdata.newsgroup_text; neither text is evaluated)")
    p.add_argument("--layers", type=int, default=None, help="learn only the first N decoder layers (screening)")
    p.add_argument("--dynamic-fallback", type=float, default=None,
                   help="the preset with this dynamic_fallback (default: the preset's own)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="start stage: read this calibration (same --calib-* arguments) instead of calibrating")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("bench.learned_layers", "qpass.accuracy", "qpass.fsbr_layers"):
        logging.getLogger(name).setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    args.state.mkdir(parents=True, exist_ok=True)
    calib_file, start_json = args.state / "calibration.safetensors", args.state / "start.json"
    model, tokenizer = realdata.load_smollm2()
    texts = _texts(tokenizer, ["wiki", "news"], args.windows, args.seqlen)
    batches = realdata.calibration_batches(tokenizer, args.calib_batches, 512)
    changes = {} if args.dynamic_fallback is None else {"dynamic_fallback": args.dynamic_fallback}
    start_cfg = qpass.preset(args.preset, smoothing=qpass.Smoothing("learned", steps=0), **changes)
    t0 = time.perf_counter()

    if args.stage == "start":
        if args.calibration is not None:
            calib = qpass.Calibration.load(args.calibration)
        else:
            calib = qpass.calibrate(model, batches, samples=args.calib_samples)
        results = evaluate(model, calib, texts, [(f"{args.preset} auto alpha (learned, 0 steps)", start_cfg)],
                           inductor=False)
        calib.save(calib_file)
        payload = {"cpu": cpu_kind(), "table": format_table(results), **to_json(results),
                   "meta": {"argv": sys.argv[1:], "seconds": time.perf_counter() - t0, "torch": torch.__version__,
                            "python": platform.python_version(), "windows": args.windows, "seqlen": args.seqlen,
                            "calib_batches": args.calib_batches, "calib_samples": args.calib_samples}}
        start_json.write_text(json.dumps(payload, indent=2) + "\n")
        print(payload["table"])
        return 0

    from qpass.fsbr_layers import learn_layers

    calib = qpass.Calibration.load(calib_file)
    start = json.loads(start_json.read_text())
    cfg = qpass.preset(args.preset, smoothing=qpass.Smoothing("learned", steps=args.steps, lr=args.lr,
                                                                 penalty=args.penalty), **changes)
    if args.learn_offset + args.train + args.held > len(batches):
        p.error(f"--learn-offset {args.learn_offset} + --train {args.train} + --held {args.held} exceeds the "
                f"{len(batches)} calibration sequences")
    seqs = learning_sequences(tokenizer, batches[args.learn_offset:], args.learn_text, args.train, args.held, args.tokens)
    t = time.perf_counter()
    learned = learn_layers(model, cfg, calib, seqs, held_out=args.held, layers=args.layers,
                           target=args.target)
    learn_s = time.perf_counter() - t
    how = "logits, end to end" if args.target == "logits" else "layer output"
    results = evaluate(model, calib, texts, [(f"{args.preset} learned ({how})", cfg)], fp32=False,
                       inductor=False)
    base = {r["name"]: r for r in start["results"]}
    fp32 = base["fp32"]["texts"]
    row = to_json(results)["results"][0]
    for text, v in row["texts"].items():
        v["rel_change"] = v["perplexity"] / fp32[text]["perplexity"] - 1.0
    lines = ["| config | wiki | news |", "|---|---|---|"]
    for r in [*start["results"], row]:
        lines.append(f"| {r['name']} | " + " | ".join(
            f"{r['texts'][x]['perplexity']:.3f} ({100 * r['texts'][x]['rel_change']:+.2f}%)" for x in ("wiki", "news")) + " |")
    table = "\n".join(lines)
    print(table)
    payload = {"cpu": cpu_kind(), "table": table, "start": start, "learned": row,
               "layers": [dataclass_row(x) for x in learned],
               "meta": {"argv": sys.argv[1:], "learn_seconds": learn_s, "seconds": time.perf_counter() - t0,
                        "train_sequences": args.train, "held_sequences": args.held, "tokens": args.tokens,
                        "target": args.target, "learn_text": args.learn_text, "learn_offset": args.learn_offset}}
    out = args.json or args.state / "learned.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    logger.info("wrote %s", out)
    return 0


def learning_sequences(tokenizer, calibration: list[torch.Tensor], text: str, train: int, held: int,
                       tokens: int) -> list[torch.Tensor]:
    """``train`` learning sequences then ``held`` held-out ones (``learn_layers`` holds out the last),
    ``tokens`` long: calibration sequences, or (``mixed``) calibration and Usenet sequences taking
    turns in both parts, so that the kept step is chosen on both kinds of text too."""
    if text == "calibration":
        return [b[:, :tokens] for b in calibration[: train + held]]
    other = iter(realdata.newsgroup_batches(tokenizer, (train + held + 1) // 2, tokens))
    ours = iter(b[:, :tokens] for b in calibration)
    return [next(ours) if i % 2 == 0 else next(other) for n in (train, held) for i in range(n)]


def dataclass_row(x) -> dict:
    return {"layer": x.layer, "loss_start": x.loss_start, "loss_end": x.loss_end, "step": x.steps,
            "note": x.note, "seconds": x.seconds}


if __name__ == "__main__":
    sys.exit(main())
