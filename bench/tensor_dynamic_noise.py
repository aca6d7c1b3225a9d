r"""Why ``w8a8_tensor_dynamic`` scores differently lowered than on its reference path (SmolLM2-135M).

The lowered int8 linears (``torch._int_mm`` where its probe finds it exact) multiply the reference
path's own integers, sum them exactly in int32 and scale after; the reference path computes
``linear(dequantize(x_q), dequantize(W_q))`` in fp32 (rounded sums). Two measurements:

``--layers N`` (per layer, first N windows of each text): fp32 eager and two modes (``--pair``,
the reference and lowered paths by default) run on the same window one after the other; for every
quantized linear, how many of its input's integers differ between the two, how far its activation
scale moved, and its output's error against fp32 on each (v_proj / up_proj outputs unscaled by the
smoothing folded into them).

``--modes ...`` (perplexity, per-window NLLs of every text kept): ``reference``; ``lowered``;
``exact`` (the reference's integers and scales, products and sums in float64: what ``_int_mm``
computes up to its scaling's roundings); ``perm:S`` (the reference path with each linear's input
channels in a random order of seed S: an equally valid float summation order); ``ulp:S`` (the
lowered path with each quantized linear's output moved one ulp up or down at random, seed S).
``--preset`` probes another int8 preset (``exact``: symmetric activations only). ``--summarize
A.json [B.json ...]`` prints the tables of one or more runs on the same windows (no model needed).

The README's numbers (``bench/results/tensor_dynamic_*.json``, each with its command line)::

    python bench/tensor_dynamic_noise.py --windows 16 --modes reference lowered exact perm:1 ulp:1 ... \
        --calibration-cache /tmp/acc/calib_16x512_s64.safetensors --json bench/results/tensor_dynamic_noise_16windows.json
    python bench/tensor_dynamic_noise.py --windows 2 --layers 2 [--pair reference perm:1] [--preset w8a8_dynamic] ...
    python bench/tensor_dynamic_noise.py --summarize bench/results/tensor_dynamic_noise_16windows.json \
        bench/results/tensor_dynamic_noise_16windows_b.json

Graphs run eagerly (``inductor=False``), 1 thread by default; the calibration is
``bench/accuracy.py``'s (16 x 512 Wikipedia tokens, 64 samples per linear).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

import qpass
import qpass.backend  # noqa: F401 - the module; ``qpass.backend`` itself is the factory function
from qpass import realdata
from qpass.passes import lower as qlower

logger = logging.getLogger("bench.tensor_dynamic_noise")
qbackend = sys.modules["qpass.backend"]  # its PIPELINE gains the probe pass while a probed model compiles

PRESET = "w8a8_tensor_dynamic"


class Probe:
    """What the extra pass does to each quantized linear, and what the graphs record while running."""

    def __init__(self, mode: str):
        self.mode = mode
        self.seed = int(mode.split(":")[1]) if ":" in mode else 0
        self.records: dict[str, tuple] | None = None  # path -> (output, x_q, scale) while recording
        self.smoothing: dict[str, torch.Tensor] = {}  # path -> s its input was divided by
        self.generator = torch.Generator().manual_seed(self.seed)
        self.rewritten = 0

    # -- ops called from the rewritten graphs (identity-like under fake tensors)
    def record(self, path: str, y, x_q, scale):
        if not isinstance(y, FakeTensor) and self.records is not None:
            self.records[path] = (y, x_q, scale)
        return y

    def ulp(self, y):
        if isinstance(y, FakeTensor):
            return y.clone()
        up = torch.randint(0, 2, y.shape, generator=self.generator, dtype=torch.bool)
        return torch.where(up, torch.nextafter(y, torch.full_like(y, math.inf)),
                           torch.nextafter(y, torch.full_like(y, -math.inf)))

    # -- the pass, run after ``quantize`` and before ``lower``
    def __call__(self, qg, config, calibration, report) -> int:
        self.smoothing.update({qg.module_of(n): s.detach().clone() for n, s in qg.smoothing.items()})
        done = 0
        for out, path in list(qg.quantized.items()):
            q = qlower.match(qg, out, path, config)
            if q.act is None or q.split:
                raise RuntimeError(f"{path}: expected a plain quantized linear with quantized activations")
            if self.mode in ("exact",) or self.mode.startswith("perm:"):
                new = self._replace_linear(qg, q)
                out.replace_all_uses_with(new)
                qg.graph.erase_node(out)
                del qg.quantized[out]
                qg.quantized[new] = path
                out = new
            if self.mode.startswith("ulp:"):
                y = qg.call(self.ulp, (out,), before=out.next)
                out.replace_all_uses_with(y, delete_user_cb=lambda u, y=y: u is not y)
            rec = qg.call(self.record, (path, out, q.act.x_q, q.act.scale), before=out.next)
            out.replace_all_uses_with(rec, delete_user_cb=lambda u, rec=rec: u is not rec)
            done += 1
        self.rewritten += done
        return done

    def _replace_linear(self, qg, q) -> torch.fx.Node:
        x_dq, w_dq = q.linear.args[0], q.linear.args[1]
        if self.mode == "exact":
            if q.act.zero_point is not None or q.w_zero_point is not None or q.group_size:
                raise RuntimeError(f"{q.path}: the exact probe handles symmetric, ungrouped linears only")
            return qg.call(exact_linear, (q.act.x_q, q.act.scale, q.w_q, q.w_scale, q.bias), before=q.out)
        k = qg.value(q.w_q).shape[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + sum(map(ord, q.path)))
        perm = qg.constant(f"{q.path}.probe_perm", torch.randperm(k, generator=g))
        return qg.call(permuted_linear, (x_dq, w_dq, q.bias, perm), before=q.out)


def exact_linear(x_q, sx, w_q, w_s, bias):
    """``linear(dequantize(x_q, sx), dequantize(w_q, w_s), bias)`` with every product and sum in float64."""
    y = (x_q.double() * sx.double()) @ (w_q.double() * w_s.double()).t()
    if bias is not None:
        y = y + bias.double()
    return y.float()


def permuted_linear(x, w, bias, perm):
    """The same linear with its K input channels summed in the order ``perm``."""
    return F.linear(x.index_select(-1, perm), w.index_select(1, perm), bias)


def compiled(model, calib, probe: Probe, lower: bool):
    config = qpass.preset(PRESET).replace(lower=lower)  # PRESET: --preset
    be = qpass.backend(config, calibration=calib, inductor=False)
    pipeline = qbackend.PIPELINE
    i = [n for n, _ in pipeline].index("quantize") + 1
    return torch.compile(model, backend=be, dynamic=False), be, pipeline[:i] + (("probe", probe),) + pipeline[i:]


def run_modes(model, calib, texts: dict[str, list[torch.Tensor]], modes: list[str], out: dict, save) -> dict:
    """Per-window NLL sums of fp32 and each mode on every text, into ``out`` (``save()`` after each)."""
    start = time.perf_counter()
    out["fp32"] = {t: [realdata.window_nll(model(w, use_cache=False).logits, w)[0] for w in ws]
                   for t, ws in texts.items()}
    logger.info("fp32 done (%.0f s)", time.perf_counter() - start)
    for mode in modes:
        probe = Probe(mode)
        lower = mode == "lowered" or mode.startswith("ulp:")
        torch._dynamo.reset()
        fn, be, pipeline = compiled(model, calib, probe, lower)
        old, qbackend.PIPELINE = qbackend.PIPELINE, pipeline
        start = time.perf_counter()
        try:
            out[mode] = {t: [realdata.window_nll(fn(w, use_cache=False).logits, w)[0] for w in ws]
                         for t, ws in texts.items()}
        finally:
            qbackend.PIPELINE = old
            torch._dynamo.reset()
        kernels: dict[str, int] = {}
        for r in be.report.rows.values():
            for k in r.kernels or [r.kernel or "none"]:
                kernels[k] = kernels.get(k, 0) + 1
        out.setdefault("kernels", {})[mode] = kernels
        logger.info("%s: %s (%.0f s; probe rewrote %d linears; kernels %s)", mode, ", ".join(
            f"{t} {100 * (math.exp(sum(v) / n_tokens(texts[t])) / math.exp(sum(out['fp32'][t]) / n_tokens(texts[t])) - 1):+.2f}%"
            for t, v in out[mode].items()), time.perf_counter() - start, probe.rewritten, kernels)
        save()
    return out


def n_tokens(windows: list[torch.Tensor]) -> int:
    return sum(w.shape[-1] - 1 for w in windows)


def _unsmooth(path: str, y: torch.Tensor, smoothing: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """``y`` of a linear whose output rows carry the next linear's smoothing (v_proj -> o_proj,
    up_proj -> down_proj) back in fp32's units; None if the channels do not map."""
    parent, name = path.rsplit(".", 1)
    nxt = {"v_proj": "o_proj", "up_proj": "down_proj"}.get(name)
    if nxt is None:
        return y
    s = smoothing.get(f"{parent}.{nxt}")
    if s is None:
        return y
    n = y.shape[-1]
    if s.numel() != n:  # GQA: o_proj's input is each KV head repeated; s equal across the repeats
        head = 64
        reps = s.numel() // n
        s3 = s.reshape(n // head, reps, head)
        if not torch.equal(s3, s3[:, :1].expand_as(s3)):
            return None
        s = s3[:, 0].reshape(n)
    return y * s.to(y.dtype)


def run_layers(model, calib, texts: dict[str, list[torch.Tensor]], n_windows: int,
               pair: tuple[str, str] = ("reference", "lowered")) -> dict:
    """Per quantized linear: integer flips between the inputs of two modes (the reference and
    lowered paths by default), scale moves, output errors vs fp32 on both; summed over the first
    ``n_windows`` windows of each text. The result names the first mode "reference", the second
    "lowered"."""
    probes = {"reference": Probe(pair[0]), "lowered": Probe(pair[1])}
    fns = {}
    torch._dynamo.reset()
    for name, probe in probes.items():
        fn, _be, pipeline = compiled(model, calib, probe, probe.mode == "lowered" or probe.mode.startswith("ulp:"))
        fns[name] = (fn, pipeline)
    stats: dict[str, dict] = {}
    per_window: list[dict] = []
    for text, ws in texts.items():
        for wi, w in enumerate(ws[:n_windows]):
            fp32: dict[str, torch.Tensor] = {}
            hooks = [model.get_submodule(p).register_forward_hook(
                lambda m, a, y, p=p: fp32.__setitem__(p, y.detach().clone()))
                for p in {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}]
            try:
                ref_logits = model(w, use_cache=False).logits
            finally:
                for h in hooks:
                    h.remove()
            nll = {"fp32": realdata.window_nll(ref_logits, w)[0]}
            recs = {}
            for name, (fn, pipeline) in fns.items():
                probe = probes[name]
                probe.records = {}
                old, qbackend.PIPELINE = qbackend.PIPELINE, pipeline
                try:
                    nll[name] = realdata.window_nll(fn(w, use_cache=False).logits, w)[0]
                finally:
                    qbackend.PIPELINE = old
                recs[name], probe.records = probe.records, None
                if len(recs[name]) != len(fp32):
                    raise RuntimeError(f"{name}: recorded {len(recs[name])} linears, expected {len(fp32)}")
            per_window.append({"text": text, "window": wi, "nll": nll, "tokens": w.shape[-1] - 1})
            for path, (y_r, xq_r, s_r) in recs["reference"].items():
                y_l, xq_l, s_l = recs["lowered"][path]
                ref32 = fp32[path]
                st = stats.setdefault(path, {"elements": 0, "flips": 0, "max_step": 0, "scale_rel_max": 0.0,
                                             "scale_changed": 0, "calls": 0, "err_ref": 0.0, "err_low": 0.0,
                                             "diff": 0.0, "norm": 0.0, "unsmoothed": True})
                d = (xq_r.to(torch.int16) - xq_l.to(torch.int16)).abs()
                st["elements"] += d.numel()
                st["flips"] += int((d != 0).sum())
                st["max_step"] = max(st["max_step"], int(d.max()))
                rel = float(((s_r.double() - s_l.double()).abs() / s_r.double()).max())
                st["scale_rel_max"] = max(st["scale_rel_max"], rel)
                st["scale_changed"] += int(rel != 0.0)
                st["calls"] += 1
                u_r = _unsmooth(path, y_r, probes["reference"].smoothing)
                u_l = _unsmooth(path, y_l, probes["lowered"].smoothing)
                if u_r is None or u_l is None:
                    st["unsmoothed"] = False
                else:
                    st["err_ref"] += float((u_r.double() - ref32.double()).pow(2).sum())
                    st["err_low"] += float((u_l.double() - ref32.double()).pow(2).sum())
                st["diff"] += float((y_r.double() - y_l.double()).pow(2).sum())
                st["norm"] += float(ref32.double().pow(2).sum())
            logger.info("%s window %d: nll/token fp32 %.4f ref %.4f low %.4f", text, wi,
                        *(nll[k] / (w.shape[-1] - 1) for k in ("fp32", "reference", "lowered")))
    rows = []
    for path, st in stats.items():
        rows.append({
            "path": path, "calls": st["calls"], "elements": st["elements"], "flips": st["flips"],
            "flip_rate": st["flips"] / st["elements"], "max_step": st["max_step"],
            "scale_changed_calls": st["scale_changed"], "scale_rel_max": st["scale_rel_max"],
            "err_ref": math.sqrt(st["err_ref"] / st["norm"]) if st["unsmoothed"] else None,
            "err_low": math.sqrt(st["err_low"] / st["norm"]) if st["unsmoothed"] else None,
            "ref_vs_low": math.sqrt(st["diff"] / st["norm"]),
        })
    return {"pair": list(pair), "linears": rows, "windows": per_window}


def layers_table(rows: list[dict]) -> str:
    """Per decoder layer: the flips and errors of its linears."""
    by_layer: dict[int, list[dict]] = {}
    for r in rows:
        by_layer.setdefault(int(r["path"].split("layers.")[1].split(".")[0]), []).append(r)
    lines = ["| layer | input flips (ref vs lowered) | max step | scale moved (calls) | max scale move | "
             "err vs fp32 ref (mean of linears) | err lowered | ref vs lowered |", "|" + "---|" * 8]
    for layer in sorted(by_layer):
        rs = by_layer[layer]
        flips, el = sum(r["flips"] for r in rs), sum(r["elements"] for r in rs)
        errs = [r for r in rs if r["err_ref"] is not None]
        lines.append(
            f"| {layer} | {flips} ({flips / el:.2e}) | {max(r['max_step'] for r in rs)} | "
            f"{sum(r['scale_changed_calls'] for r in rs)} of {sum(r['calls'] for r in rs)} | "
            f"{max(r['scale_rel_max'] for r in rs):.1e} | "
            f"{sum(r['err_ref'] for r in errs) / len(errs):.4f} | {sum(r['err_low'] for r in errs) / len(errs):.4f} | "
            f"{max(r['ref_vs_low'] for r in rs):.1e} |")
    return "\n".join(lines)


def summary(payload: dict, subsets=(4, 8, 16)) -> str:
    """Markdown: each mode's perplexity change vs fp32 on the last 4 / 8 / all windows of each text
    (the shorter sets are the ends of the longer ones, as ``realdata.eval_windows`` cuts them), and
    the spread of the float-rounding variants (every mode is the same quantized model)."""
    nll, per = payload["nll"], payload["tokens_per_window"]
    modes = [m for m in nll if m not in ("fp32", "kernels")]
    texts = list(nll["fp32"])
    total = len(nll["fp32"][texts[0]])
    subsets = sorted({n for n in subsets if n <= total} | {total})

    def change(mode: str, text: str, n: int) -> float:
        a, b = sum(nll[mode][text][-n:]), sum(nll["fp32"][text][-n:])
        return 100 * (math.exp((a - b) / (n * per)) - 1)

    cols = [(t, n) for n in subsets for t in texts]
    lines = ["| mode | " + " | ".join(f"{t} {n}w" for t, n in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    lines.append("| fp32 perplexity | " + " | ".join(
        f"{math.exp(sum(nll['fp32'][t][-n:]) / (n * per)):.2f}" for t, n in cols) + " |")
    for m in modes:
        lines.append(f"| {m} | " + " | ".join(f"{change(m, t, n):+.2f}%" for t, n in cols) + " |")
    stats = []
    for t, n in cols:
        v = [change(m, t, n) for m in modes]
        mean = sum(v) / len(v)
        sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
        stats.append((mean, sd, min(v), max(v)))
    lines.append("| mean of all modes | " + " | ".join(f"{m:+.2f}%" for m, *_ in stats) + " |")
    lines.append("| sd of all modes (points) | " + " | ".join(f"{sd:.2f}" for _, sd, *_ in stats) + " |")
    lines.append("| min .. max | " + " | ".join(f"{lo:+.2f} .. {hi:+.2f}" for *_, lo, hi in stats) + " |")
    # Each path with its own rounding variants: a systematic difference between the paths shows as a
    # gap between these means larger than their standard errors.
    families = {"reference and perm:*": ["reference"] + [m for m in modes if m.startswith("perm:")],
                "lowered and ulp:*": ["lowered"] + [m for m in modes if m.startswith("ulp:")]}
    for label, members in families.items():
        members = [m for m in members if m in nll]
        if len(members) < 2:
            continue
        cells = []
        for t, n in cols:
            v = [change(m, t, n) for m in members]
            mean = sum(v) / len(v)
            se = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1) / len(v))
            cells.append(f"{mean:+.2f} ± {se:.2f}")
        lines.append(f"| mean of {label} ({len(members)}) ± s.e. | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(payloads: list[dict]) -> dict:
    """One payload from several runs' (the same windows: their fp32 NLLs must agree); the first
    run's per-layer table."""
    out = dict(payloads[0])
    for other in payloads[1:]:
        if "nll" not in other:
            continue
        if "nll" not in out:
            out["nll"], out["tokens_per_window"] = dict(other["nll"]), other["tokens_per_window"]
            continue
        if other["nll"]["fp32"] != out["nll"]["fp32"]:
            raise ValueError("runs on different windows (their fp32 NLLs differ): not merged")
        out["nll"] = {**out["nll"], **{m: v for m, v in other["nll"].items() if m != "kernels"}}
    return out


def main(argv: list[str] | None = None) -> int:
    global PRESET
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=8, help="evaluation windows per text")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--texts", nargs="+", default=["wiki", "news"], choices=["wiki", "news"])
    p.add_argument("--modes", nargs="*", default=[], help="reference, lowered, exact, perm:S, ulp:S")
    p.add_argument("--layers", type=int, default=0, help="per-layer comparison on the first N windows of each text")
    p.add_argument("--pair", nargs=2, default=["reference", "lowered"], metavar=("A", "B"),
                   help="--layers compares these two modes (its columns keep the names reference / lowered)")
    p.add_argument("--calibration-cache", type=Path, help="bench/accuracy.py's calibration file (required to measure)")
    p.add_argument("--summarize", type=Path, nargs="+",
                   help="print the tables of the JSON files this script wrote (their modes together), and exit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--preset", default=PRESET, help="the preset probed (any int8 preset; mode exact: "
                   "symmetric activations, ungrouped weights)")
    p.add_argument("--json", type=Path, help="where the measurements go (required to measure)")
    args = p.parse_args(argv)
    PRESET = args.preset
    if args.summarize:
        payload = merge([json.loads(f.read_text()) for f in args.summarize])
        if "layers" in payload:
            print(layers_table(payload["layers"]["linears"]))
        if "nll" in payload:
            print(summary(payload))
        return 0
    if args.calibration_cache is None:
        p.error("--calibration-cache is required to measure")
    if args.json is None:
        p.error("--json is required to measure")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("qpass").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    for m in args.modes:
        if not (m in ("reference", "lowered", "exact") or m.split(":")[0] in ("perm", "ulp")):
            p.error(f"unknown mode {m!r}")
    model, tok = realdata.load_smollm2(torch.float32)
    calib = qpass.Calibration.load(args.calibration_cache)
    make = {"wiki": realdata.eval_windows, "news": realdata.news_eval_windows}
    texts = {t: make[t](tok, args.seqlen, args.windows * args.seqlen) for t in args.texts}
    meta = {"argv": sys.argv[1:], "preset": args.preset, "cpu": _cpu_name() or platform.processor(),
            "torch": torch.__version__, "threads": args.threads, "windows": args.windows, "seqlen": args.seqlen,
            "int_mm_exact": qpass.kernels.int_mm_exact(), "note": "eager graphs; a loaded shared 2-core machine"}
    payload: dict = {"meta": meta}
    start = time.perf_counter()

    def save():
        meta["seconds"] = time.perf_counter() - start
        args.json.write_text(json.dumps(payload, indent=1) + "\n")

    with torch.no_grad():
        if args.layers:
            payload["layers"] = run_layers(model, calib, texts, args.layers, tuple(args.pair))
            print(layers_table(payload["layers"]["linears"]))
            save()
        if args.modes:
            payload["tokens_per_window"] = args.seqlen - 1
            run_modes(model, calib, texts, args.modes, payload.setdefault("nll", {}), save)
    save()
    logger.info("wrote %s (%.0f s)", args.json, meta["seconds"])
    return 0


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
