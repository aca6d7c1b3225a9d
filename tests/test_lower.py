"""The lowering pass through the backend: lowered kernels against the integer reference,
the kernel chosen per preset and device, fallbacks, and snapshots of lowered graphs.

The integer checks recover the kernel's integer dot products from its float output and compare
them, element by element, with an int64 matmul of the quantized operands computed here from the
module's weights and inputs: an off-by-one anywhere (a saturated int16 pair sum, a wrong zero
point, a wrong rounding) fails.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qpass
from qpass import kernels
from qpass.passes import lower as lowering
from tests.linears import (KERNEL_CONFIGS, Proj, int_reference, inputs, proj_case, run_backend,
                            worst_case_weight)
from tests.models import tiny_model, token_batches

CPU = lowering.Target.detect(torch.device("cpu"))
GRIDS = {g.note: g for g in (lowering.GRID_8BIT, lowering.GRID_W7, lowering.GRID_A7, lowering.GRID_SPLIT)}


def _split(label: str) -> tuple[str, lowering.Grid | None]:
    """``"onednn (7-bit act)"`` -> ``("onednn", GRID_A7)``; reference and CUDA labels stay whole; an
    outlier split's note stays on the kernel (``"onednn (7-bit act) + float outlier columns"`` ->
    ``("onednn + float outlier columns", GRID_A7)``)."""
    split = label.endswith(lowering.SPLIT_NOTE)
    label = label.removesuffix(lowering.SPLIT_NOTE)
    note = lowering.SPLIT_NOTE if split else ""
    for grid_note, grid in GRIDS.items():
        if grid_note and label.endswith(f" ({grid_note})"):
            return label[: -len(grid_note) - 3] + note, grid
    return label + note, (lowering.GRID_8BIT if label in ("onednn", "fbgemm") else None)


needs_onednn = pytest.mark.skipif(not CPU.onednn, reason="oneDNN int8 kernels not available")


#: Shape, bias and worst case: a half fraction of the 2 x 2 x 2 grid in which every pair of the three
#: factors still takes all four combinations (each case compiles through Inductor).
SHAPE_BIAS_WORST = [
    pytest.param(37, 23, True, False, id="37-23-bias-random"),
    pytest.param(37, 23, False, True, id="37-23-no-bias-worst-case"),
    pytest.param(100, 70, False, False, id="100-70-no-bias-random"),
    pytest.param(100, 70, True, True, id="100-70-bias-worst-case"),
]


@needs_onednn
@pytest.mark.parametrize("k,n,bias,worst_case", SHAPE_BIAS_WORST)
@pytest.mark.parametrize("m", [1, 3, 17, 513])
@pytest.mark.parametrize("name", KERNEL_CONFIGS)
def test_lowered_linear_equals_integer_reference(name, m, k, n, bias, worst_case):
    """Each kernel's integer dot products, exactly. Through Inductor at 1 token (FBGEMM) and 513
    (oneDNN); 3 and 17 tokens run the same kernel ops with the rewritten graph eager (each Inductor
    compile of a new shape is a C++ build)."""
    model, x, _, calib = proj_case(m, k, n, bias=bias, worst_case=worst_case)
    config = KERNEL_CONFIGS[name].replace(smoothing=None)
    y, backend = run_backend(model, config, calib, x, inductor=m in (1, 513))
    row = backend.report.rows["proj"]
    kernel, grid = _split(row.kernel)
    assert kernel == ("fbgemm" if m <= lowering.DECODE_M and CPU.fbgemm else "onednn"), row
    assert grid in lowering.kernel_grids(CPU, kernel, config.split_weights), row

    acc, unit = int_reference(model, x, config, calib, grid)
    b = model.proj.bias.detach().double() if bias else torch.zeros(n, dtype=torch.float64)
    acc_hat = (y.reshape(-1, n).double() - b) / unit
    per_tensor_zp = not config.activation.symmetric and isinstance(config.activation.granularity, qpass.PerTensor)
    if m > 2 and not per_tensor_zp:  # the all-zero token's output is exactly the bias (its zero point is 0)
        assert torch.equal(y[0, 1], b.float())
    err = (acc_hat - acc.double()).abs().max().item()
    # Symmetric: one float32 rounding of the result. Asymmetric: the zero point's term is subtracted
    # in float32 after the kernel, so add the rounding of the uncorrected sum (well below one unit:
    # a zero point or an activation off by one moves the sum by |w| >= 1 unit, or by sum |w|).
    tol = 0.25
    if not config.activation.symmetric:
        qmax = 2 * grid.act_qmax + 1
        tol += 4 * 2.0**-24 * qmax * (grid.w_qmax * k)
    assert err < tol, f"integer dot products differ by {err:.3f} units (max |acc| {acc.abs().max().item()})"


@needs_onednn
@pytest.mark.parametrize("grid", [lowering.GRID_W7, lowering.GRID_A7], ids=["7-bit-weights", "7-bit-act"])
@pytest.mark.parametrize("worst_case", [False, True], ids=["random", "worst-case"])
@pytest.mark.parametrize("m", [1, 17, 513])
@pytest.mark.parametrize("name", KERNEL_CONFIGS)
def test_avx2_grids_equal_integer_reference(monkeypatch, name, m, worst_case, grid):
    """Each 7-bit grid that CPUs without VNNI use, forced on whatever CPU runs the tests (on a VNNI
    CPU the test above only sees the 8-bit grid): the same element-by-element integer check (the
    split 8-bit grid: ``test_split_weights_equal_8bit_integer_reference``)."""
    k, n = 100, 70
    _with_target(monkeypatch, FAKE_CPU)
    monkeypatch.setattr(lowering, "cpu_grids", lambda target, kernel: (grid,))
    model, x, _, calib = proj_case(m, k, n, worst_case=worst_case)
    config = KERNEL_CONFIGS[name].replace(smoothing=None)
    y, backend = run_backend(model, config, calib, x)
    kernel, used = _split(backend.report.rows["proj"].kernel)
    assert used == grid and kernel == ("fbgemm" if m <= lowering.DECODE_M else "onednn"), kernel
    acc, unit = int_reference(model, x, config, calib, grid)
    acc_hat = (y.reshape(-1, n).double() - model.proj.bias.detach().double()) / unit
    tol = 0.25
    if not config.activation.symmetric:
        tol += 4 * 2.0**-24 * (2 * grid.act_qmax + 1) * (grid.w_qmax * k)
    err = (acc_hat - acc.double()).abs().max().item()
    assert err < tol, f"integer dot products differ by {err:.3f} units (max |acc| {acc.abs().max().item()})"


def test_split_weight_halves():
    """Every int8 value splits into two halves in [-64, 64] (2 * 255 * 64 < 2**15: no u8 x s8 pair
    sum saturates) that add up to it, placed side by side along K."""
    w = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).reshape(2, 128)
    halves = lowering.split_weight(w)
    assert halves.shape == (2, 256) and halves.dtype == torch.int8
    hi, lo = halves[:, :128].long(), halves[:, 128:].long()
    assert torch.equal(hi + lo, w.long())
    assert hi.min() == -64 and hi.max() == 63 and lo.min() == -64 and lo.max() == 64


def _split_grid_runs(force, grids: tuple[lowering.Grid, ...]) -> list[list]:
    """``[config, tokens, kernel label, max error in integer units, tolerance]`` for worst-case
    operands (every activation 255 as uint8, every weight +-127: each pair sum twice what int16
    holds) lowered on each of ``grids`` (``force(grid)`` makes the lowering take it), against the
    8-bit integer reference, for FBGEMM (3 tokens) and oneDNN (32) and three kinds of activations."""
    k, n = 100, 70
    model = Proj(k, n, True).eval()
    with torch.no_grad():
        model.proj.weight.copy_(worst_case_weight(n, k))
    calib = qpass.calibrate(model, [inputs(64, k, seed=99, worst_case=True)])
    runs = []
    for name in ("w8a8_dynamic", "w8a8_static", "asym per-token"):
        config = KERNEL_CONFIGS[name].replace(smoothing=None)
        acc = None
        for m in (3, 32):
            x = inputs(m, k, seed=m, worst_case=True)
            acc, unit = int_reference(model, x, config, calib, lowering.GRID_8BIT)
            # float32 roundings of results up to |acc| (127 * 127 * 100 here): well under one unit
            tol = 0.25 + 4 * 2.0**-24 * acc.abs().max().item()
            if not config.activation.symmetric:
                tol += 4 * 2.0**-24 * 255 * 127 * k
            for grid in grids:
                force(grid)
                y, backend = run_backend(model, config, calib, x, inductor=False)
                acc_hat = (y.reshape(-1, n).double() - model.proj.bias.detach().double()) / unit
                err = (acc_hat - acc.double()).abs().max().item()
                runs.append([name, m, backend.report.rows["proj"].kernel, err, tol])
    return runs


_SPLIT_SCRIPT = """
import json, torch
from qpass import kernels
from qpass.passes import lower as lowering
from tests.test_lower import _split_grid_runs
def force(grid):
    lowering.cpu_grids = lambda target, kernel: (grid,)
out = {"probe": {k: kernels.int8_dot_exact(k) for k in kernels.PROBED_KERNELS},
       "runs": _split_grid_runs(force, (lowering.GRID_SPLIT, lowering.GRID_8BIT))}
print(json.dumps(out))
"""


def _check_split_runs(runs: list[list], grids: tuple[lowering.Grid, ...], saturating: bool) -> None:
    assert len(runs) == 6 * len(grids)
    for name, m, label, err, tol in runs:
        kernel, grid = _split(label)
        assert kernel == ("fbgemm" if m <= lowering.DECODE_M and CPU.fbgemm else "onednn"), label
        assert grid in grids, label
        if grid is lowering.GRID_SPLIT or not saturating:
            assert err < tol, (name, m, label, err, tol)
        else:  # the 8-bit grid on a saturating kernel: what the check above would catch
            assert err > 1000, (name, m, label, err)


@needs_onednn
@pytest.mark.skipif(any(v in os.environ for v in ("ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS")),
                    reason="an ISA limit is set in this process: the subprocess sets its own")
def test_split_weights_exact_where_int8_saturates():
    """In a process whose oneDNN and FBGEMM are limited to AVX2 (u8 x s8 pair sums saturate int16, as
    on CPUs without VNNI), on worst-case operands: the split weights give exactly the 8-bit integer
    reference through both kernels and three kinds of activations, where the plain 8-bit grid is off
    by thousands of units."""
    limits = {"ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    run = subprocess.run([sys.executable, "-c", _SPLIT_SCRIPT], env={**os.environ, **limits}, capture_output=True,
                         text=True, cwd=Path(__file__).parent.parent, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["probe"] == {"onednn": False, "fbgemm": False}, got
    _check_split_runs(got["runs"], (lowering.GRID_SPLIT, lowering.GRID_8BIT), saturating=True)


@needs_onednn
def test_split_weights_equal_8bit_integer_reference(monkeypatch):
    """The same worst-case integer check in this process, on whatever CPU runs the tests (exact 8-bit
    kernels or saturating ones): the split weights give the 8-bit integers."""
    _with_target(monkeypatch, FAKE_CPU)
    def force(grid):
        monkeypatch.setattr(lowering, "cpu_grids", lambda target, kernel: (grid,))
    _check_split_runs(_split_grid_runs(force, (lowering.GRID_SPLIT,)), (lowering.GRID_SPLIT,), saturating=False)


@needs_onednn
def test_split_weights_chosen_by_calibration_error(monkeypatch):
    """On a CPU without VNNI (forced), ``split_weights=0.0`` (the default) splits every int8 linear's
    weights without measuring; ``d > 0`` splits where the best 7-bit grid's output error on the
    calibration samples exceeds the 8-bit error by more than d; each says so in the report, and the
    split linear gives the reference path's output; d = 1 (100%) splits none, nor does None."""
    _with_target(monkeypatch, FAKE_CPU)
    torch.manual_seed(0)
    model = Proj(100, 70, True).eval()
    x = inputs(32, 100, seed=1, worst_case=False)
    calib = qpass.calibrate(model, [inputs(64, 100, seed=99, worst_case=False)])
    config = qpass.preset("w8a8_dynamic", smoothing=None)
    ref, _ = run_backend(model, config.replace(lower=False), calib, x, inductor=False)  # quant/dequant
    out = {}
    for d in (0.0, 1e-9, 1.0, None):
        out[d], backend = run_backend(model, config.replace(split_weights=d), calib, x, inductor=False)
        row = backend.report.rows["proj"]
        if d == 0.0:
            assert row.kernel == "onednn (8-bit split weights)", row
            assert row.reason == lowering.SPLIT_ALL, row.reason
        elif d == 1e-9:
            assert row.kernel == "onednn (8-bit split weights)", row
            assert ", 8-bit " in row.reason and row.reason.endswith("7-bit over 8-bit by more than 1e-07%, split"), row.reason
        elif d == 1.0:
            assert _split(row.kernel)[1] in (lowering.GRID_W7, lowering.GRID_A7), row
            assert ", 8-bit " in row.reason and "split" not in row.reason, row.reason  # measured, not taken
        else:  # the 7-bit grids only
            assert _split(row.kernel)[1] in (lowering.GRID_W7, lowering.GRID_A7), row
            assert "kernel grid by calibration error" in row.reason and "8-bit" not in row.reason, row.reason

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(out[0.0], ref) < 1e-6 and rel(out[1e-9], ref) < 1e-6
    assert rel(out[1.0], ref) > 1e-4 and rel(out[None], ref) > 1e-4  # the 7-bit grid differs


def test_split_weights_config_errors():
    with pytest.raises(ValueError, match="split_weights must be >= 0"):
        qpass.preset("w8a8_dynamic", split_weights=-0.1)


@needs_onednn
@pytest.mark.parametrize("name", KERNEL_CONFIGS)
def test_lowered_model_close_to_reference_path(name):
    """A 2-layer Llama: the lowered model (7-bit weights on AVX2) is within twice the reference
    (fake-quant) path's error of fp32. The reference path runs eagerly (the same ops; Inductor only
    runs the lowered one, as shipped)."""
    model = tiny_model("llama")
    calib = qpass.calibrate(model, token_batches(4))
    ids = token_batches(1, batch=1, seq=48, seed=7)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    torch._dynamo.reset()
    outs = {}
    for lower in (False, True):
        backend = qpass.backend(KERNEL_CONFIGS[name].replace(lower=lower), calibration=calib, inductor=lower)
        with torch.no_grad():
            outs[lower] = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
        torch._dynamo.reset()
        kernels_used = {_split(r.kernel)[0] for p, r in backend.report.rows.items() if p != "lm_head"}
        assert kernels_used == ({"onednn"} if lower else {""}), kernels_used

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert 0 < rel(outs[False], ref) < 0.12
    assert rel(outs[True], ref) < 2.0 * rel(outs[False], ref)


# ----------------------------------------------------------------------------- which kernel, per device

FAKE_CPU = lowering.Target("cpu", onednn=True, fbgemm=True, int8_dot=False)
FAKE_CPU_VNNI = lowering.Target("cpu", onednn=True, fbgemm=True, int8_dot=True)
FAKE_H100 = lowering.Target("cuda", capability=(9, 0))
FAKE_A100 = lowering.Target("cuda", capability=(8, 0))

# preset -> kernel label per (target, tokens); "reference (...)" names the fallback's reason.
# CPU kernels are shown without their grid note.
EXPECTED = {
    "w8a8_dynamic": ("fbgemm", "onednn", "cuda int8 (_int_mm)", "cuda int8 (_int_mm)"),
    "w8a8_static": ("fbgemm", "onednn", "cuda int8 (_int_mm)", "cuda int8 (_int_mm)"),
    "w8a8_tensor_dynamic": ("fbgemm", "onednn", "cuda int8 (_int_mm)", "cuda int8 (_int_mm)"),
    "fp8_dynamic": ("reference (fp8 on CPU)", "reference (fp8 on CPU)", "cuda fp8 (_scaled_mm)",
                    "reference (fp8 needs CUDA compute capability 8.9+)"),
    "fp8_static": ("reference (fp8 on CPU)", "reference (fp8 on CPU)", "cuda fp8 (_scaled_mm)",
                   "reference (fp8 needs CUDA compute capability 8.9+)"),
    # The tiny model is fp32: the weight-only kernels are for bf16 activations (tests/test_weight_only_lower.py).
    "w8a16": ("reference (weight-only with float32 activations (its kernels are fast with bfloat16 only))",) * 2
    + ("reference (weight-only (its kernels here are CPU kernels))",) * 2,
    "w4a16": ("reference (weight-only with float32 activations (its kernels are fast with bfloat16 only))",) * 2
    + ("reference (weight-only (its kernels here are CPU kernels))",) * 2,
    # The inlier linear on the int8 kernel; linears with no calibrated channel above the threshold
    # have no split and get the int8 kernel alone.
    "llm_int8": tuple(f"{k}{lowering.SPLIT_NOTE}" for k in ("fbgemm", "onednn", "cuda int8 (_int_mm)", "cuda int8 (_int_mm)")),
}


def _with_target(monkeypatch, target: lowering.Target) -> None:
    monkeypatch.setattr(lowering.Target, "detect", staticmethod(lambda device: target))


def _lowered_llama(monkeypatch, target, config, seq):
    """A 1-layer Llama lowered for ``target`` and run eagerly (``inductor=False``) on CPU tensors:
    the CUDA kernels' ops (``_int_mm``, ``_scaled_mm``) have CPU reference implementations."""
    _with_target(monkeypatch, target)
    model = tiny_model("llama", layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    ids = token_batches(1, batch=1, seq=seq, seed=3)[0]
    torch._dynamo.reset()
    backend = qpass.backend(config, calibration=calib, inductor=False)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
    return backend, out, (model, calib, ids)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_kernel_choice_per_preset_and_device(monkeypatch, name, caplog):
    """Every preset on a (fake) AVX2 CPU at decode (8 tokens) and prefill (32), on a fake H100 and
    A100: the kernel each decoder linear gets, or the reference fallback with its reason, logged
    once per layer with the layer's path."""
    cases = ((FAKE_CPU, 8), (FAKE_CPU, 32), (FAKE_H100, 32), (FAKE_A100, 32))
    for (target, seq), expected in zip(cases, EXPECTED[name]):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qpass.passes.lower"):
            backend, _, _ = _lowered_llama(monkeypatch, target, qpass.preset(name), seq)
        rows = {p: r for p, r in backend.report.rows.items() if p != "lm_head"}
        assert len(rows) == 7
        got = {p: _split(r.kernel)[0] for p, r in rows.items()}
        if target is FAKE_CPU:  # 8-bit products saturate: every int8 layer's weights split in two halves
            assert {_split(r.kernel)[1] for r in rows.values() if not r.kernel.startswith("reference")} <= {
                lowering.GRID_SPLIT}
            assert all(lowering.SPLIT_ALL in r.reason for r in rows.values()
                       if not r.kernel.startswith("reference")), rows
        if name == "llm_int8":
            unsplit = EXPECTED["w8a8_dynamic"][cases.index((target, seq))]
            assert expected in got.values() and set(got.values()) <= {expected, unsplit}, got
        else:
            assert set(got.values()) == {expected}, (target, seq, got)
        fallbacks = [r.getMessage() for r in caplog.records if "reference quant/dequant path" in r.getMessage()]
        reason = expected.removeprefix("reference (").removesuffix(")")
        assert sorted(fallbacks) == sorted(f"{p}: kept on the reference quant/dequant path: {reason}"
                                           for p, k in got.items() if k == expected and k.startswith("reference"))


@needs_onednn
def test_vnni_cpu_keeps_8bit_weights(monkeypatch):
    backend, _, _ = _lowered_llama(monkeypatch, FAKE_CPU_VNNI, qpass.preset("w8a8_dynamic"), 32)
    assert backend.report.rows["model.layers.0.mlp.down_proj"].kernel == "onednn"


@pytest.mark.parametrize("name", ["w8a8_dynamic", "w8a8_static", "fp8_dynamic", "fp8_static", "asym per-token",
                                  "asym per-tensor"])
def test_cuda_lowering_runs_exactly_on_cpu_tensors(monkeypatch, name):
    """The CUDA lowering (``_int_mm`` / ``_scaled_mm`` on the reference's own grid) emitted for a fake
    H100 but run on CPU tensors, where both ops have slow reference kernels: the logits equal the
    reference quant/dequant path's up to float summation order."""
    if not name.startswith("fp8") and not kernels.int_mm_exact():
        pytest.skip("this CPU's torch._int_mm sums int8 pairs in saturating int16 (no VNNI): not the CUDA kernel's integers")
    config = KERNEL_CONFIGS[name] if name in KERNEL_CONFIGS else qpass.preset(name)
    backend, out, (model, calib, ids) = _lowered_llama(monkeypatch, FAKE_H100, config, 32)
    assert all(r.kernel.startswith("cuda") for p, r in backend.report.rows.items() if p != "lm_head")
    torch._dynamo.reset()
    ref_backend = qpass.backend(config.replace(lower=False), calibration=calib, inductor=False)
    with torch.no_grad():
        ref = torch.compile(model, backend=ref_backend, dynamic=False)(ids, use_cache=False).logits
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-3, err  # the same integers / fp8 values; a rounding flip of one activation at most


@pytest.mark.parametrize("name", ["w8a8_dynamic", "asym per-token", "fp8_dynamic"])
def test_cuda_lowering_runs_under_dynamic_shapes(monkeypatch, name):
    """``torch.compile(..., dynamic=True)``: the CUDA lowering (fake H100, run on CPU tensors, padded
    as on CUDA) reads M and the output's sizes from the graph, so one graph serves 5, 17 and 33 tokens
    (5 padded to _int_mm's 17 rows) and 1 token gets its own; each equals the reference path's logits.
    A 37 x 23 linear adds the padding of K and N."""
    if not name.startswith("fp8") and not kernels.int_mm_exact():
        pytest.skip("this CPU's torch._int_mm sums int8 pairs in saturating int16 (no VNNI): not the CUDA kernel's integers")
    _with_target(monkeypatch, FAKE_H100)
    config = KERNEL_CONFIGS[name] if name in KERNEL_CONFIGS else qpass.preset(name)
    llama = tiny_model("llama", layers=1)
    proj = Proj(37, 23, True).eval()
    calibs = {"llama": qpass.calibrate(llama, token_batches(2)),
              "proj": qpass.calibrate(proj, [inputs(64, 37, seed=5, worst_case=False)])}
    for label, model in (("llama", llama), ("proj", proj)):
        torch._dynamo.reset()
        backend = qpass.backend(config, calibration=calibs[label], inductor=False)
        ref_backend = qpass.backend(config.replace(lower=False), calibration=calibs[label], inductor=False)
        lowered = torch.compile(model, backend=backend, dynamic=True)
        reference = torch.compile(model, backend=ref_backend, dynamic=True)
        for seq in (5, 17, 33, 1):
            if label == "llama":
                ids = token_batches(1, batch=1, seq=seq, seed=seq)[0]
                with torch.no_grad():
                    out, ref = (f(ids, use_cache=False).logits for f in (lowered, reference))
            else:
                x = inputs(seq, 37, seed=seq, worst_case=False)
                with torch.no_grad():
                    out, ref = lowered(x), reference(x)
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            assert err < 2e-3, (label, seq, err)
        assert len(backend.graphs) == 2, f"{label}: {len(backend.graphs)} graphs for 4 lengths"
        assert all(r.kernel.startswith("cuda") for p, r in backend.report.rows.items() if p != "lm_head")


def test_narrow_weight_is_exact_requantization():
    w_q = torch.arange(-127, 128, dtype=torch.int8).reshape(5, 51)
    s = torch.rand(5, 1) + 0.5
    w7, s7 = lowering.narrow_weight(w_q, s, 63)
    assert w7.dtype == torch.int8 and int(w7.abs().max()) == 63
    assert torch.allclose(s7, s * 127 / 63)
    # within half a 7-bit step of the int8 weights
    assert ((w7.float() * s7 - w_q.float() * s).abs() <= 0.5 * s7 + 1e-6).all()
    same, s_same = lowering.narrow_weight(w_q, s, 127)
    assert same is w_q and s_same is s


# ----------------------------------------------------------------------------- shared-input groups

_KERNEL_OPS = (torch.ops.qpass.onednn_qlinear.default, torch.ops.qpass.fbgemm_qlinear.default)


@needs_onednn
@pytest.mark.parametrize("seq", [4, 48], ids=["fbgemm", "onednn"])
@pytest.mark.parametrize("name,arch", [  # qwen2: q / k / v with biases (inside oneDNN on the static path)
    ("w8a8_dynamic", "llama"), ("w8a8_static", "qwen2"), ("w8a8_tensor_dynamic", "qwen2"), ("asym per-tensor", "llama")])
def test_shared_input_linears_run_as_one_gemm_equal_to_unfused(monkeypatch, name, arch, seq):
    """q / k / v and gate / up read one quantized activation: one kernel call over their
    concatenated weights, 4 per layer instead of 7, with logits equal to the unfused lowering's
    (the same integers and per-column arithmetic), and every linear keeping its report row."""
    target = lowering.Target("cpu", onednn=True, fbgemm=CPU.fbgemm)
    if not kernels.int8_dot_exact("onednn"):  # without VNNI each linear picks its 7-bit grid, and only equal grids fuse
        monkeypatch.setattr(lowering, "cpu_grids", lambda t, k: (lowering.GRID_W7,))
    if seq == 4 and not CPU.fbgemm:
        pytest.skip("FBGEMM not available")
    _with_target(monkeypatch, target)
    model = tiny_model(arch, layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    ids = token_batches(1, batch=1, seq=seq, seed=3)[0]
    outs, calls = {}, {}
    for fuse in (False, True):
        monkeypatch.setattr(lowering, "FUSE_SHARED_INPUT", fuse)
        torch._dynamo.reset()
        backend = qpass.backend(KERNEL_CONFIGS[name], calibration=calib, inductor=False)
        with torch.no_grad():
            outs[fuse] = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
        calls[fuse] = sum(n.target in _KERNEL_OPS for n in backend.graphs[0].graph.nodes)
        rows = {p: r for p, r in backend.report.rows.items() if p != "lm_head"}
        assert len(rows) == 7 and all(_split(r.kernel)[0] == ("fbgemm" if seq == 4 else "onednn") for r in rows.values())
    assert torch.equal(outs[True], outs[False])
    assert calls == {False: 7, True: 4}
    prefix = "model.layers.0."
    assert "one GEMM with model.layers.0.self_attn.q_proj, model.layers.0.self_attn.v_proj (same input)" in \
        rows[prefix + "self_attn.k_proj"].reason
    assert "one GEMM with model.layers.0.mlp.gate_proj (same input)" in rows[prefix + "mlp.up_proj"].reason
    assert "one GEMM" not in rows[prefix + "mlp.down_proj"].reason


@needs_onednn
def test_shared_input_groups_split_by_grid(monkeypatch):
    """Without VNNI and with ``split_weights=None`` each linear takes the 7-bit grid its calibration
    samples prefer: linears of one input on different grids quantize it differently, so only those on
    the same grid share a GEMM."""
    _with_target(monkeypatch, FAKE_CPU)
    model = tiny_model("llama", layers=2)
    calib = qpass.calibrate(model, token_batches(2))
    backend = qpass.backend(qpass.preset("w8a8_dynamic", split_weights=None), calibration=calib, inductor=False)
    ids = token_batches(1, batch=1, seq=32, seed=3)[0]
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False)
    rows = backend.report.rows
    for layer in range(2):
        for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
            paths = [f"model.layers.{layer}.{block}.{n}" for n in names]
            for p in paths:
                same = [o for o in paths if o != p and _split(rows[o].kernel)[1] == _split(rows[p].kernel)[1]]
                note = "one GEMM with " + ", ".join(same) + " (same input)"
                assert (note in rows[p].reason) == bool(same), (p, rows[p].kernel, rows[p].reason)
    grids = {_split(r.kernel)[1] for p, r in rows.items() if p != "lm_head"}
    assert grids <= {lowering.GRID_W7, lowering.GRID_A7}


# ----------------------------------------------------------------------------- snapshots

SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.mark.parametrize("name,target,seq", [
    ("w8a8_static", "cpu", 32),
    ("w8a8_dynamic", "cpu", 32),
    ("w8a8_dynamic", "cpu", 8),
    ("w8a8_dynamic", "h100", 32),
    ("fp8_dynamic", "h100", 32),
])
def test_lowered_graph_snapshot(monkeypatch, name, target, seq):
    """The lowered 1-layer Llama for a fixed target (tests/snapshots/lowered_*.txt); its numerical
    twins are the tests above. EXPECTTEST_ACCEPT=1 rewrites them."""
    t = {"cpu": FAKE_CPU, "h100": FAKE_H100}[target]
    if target == "cpu" and not CPU.onednn:
        pytest.skip("oneDNN not available: the lowered graph cannot run here")
    backend, _, _ = _lowered_llama(monkeypatch, t, qpass.preset(name), seq)
    text = qpass.format_graph(backend.graphs[0])
    path = SNAPSHOTS / f"lowered_llama_{name}_{target}_{seq}.txt"
    if os.environ.get("EXPECTTEST_ACCEPT") == "1":
        path.write_text(text)
    assert path.exists(), f"no snapshot {path.name}; run with EXPECTTEST_ACCEPT=1"
    assert text == path.read_text(), f"{path.name} changed; run with EXPECTTEST_ACCEPT=1 and read the diff"


# ----------------------------------------------------------------------------- fallbacks


@needs_onednn
def test_odd_weight_dtype_falls_back_with_layer_name(caplog):
    """Per-group int8 weights have no kernel: the reference path, one log line naming the layer."""
    model = Proj(64, 16, True).eval()
    x = torch.randn(1, 32, 64)
    config = qpass.preset("w8a8_dynamic", smoothing=None, weight=qpass.QuantSpec("int8", qpass.PerGroup(16)))
    with caplog.at_level(logging.WARNING, logger="qpass.passes.lower"):
        y, backend = run_backend(model, config, None, x)
    assert backend.report.rows["proj"].kernel == "reference (per-group weights)"
    assert [r.getMessage() for r in caplog.records] == [
        "proj: kept on the reference quant/dequant path: per-group weights"]
    with torch.no_grad():
        assert ((y - model(x)).norm() / model(x).norm()) < 0.05


@needs_onednn
def test_lowering_leaves_user_weights_untouched():
    model = Proj(37, 23, True).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_backend(model, qpass.preset("w8a8_dynamic"), qpass.calibrate(model, [torch.randn(1, 8, 37)]), torch.randn(1, 20, 37))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_kernels_registry_keys_match_report_labels():
    assert set(lowering.KERNELS) == {"onednn", "fbgemm", "cpu_int_mm", "cuda_int8", "cuda_fp8", "cpu_w8", "cpu_w4", "cpu_wo_reduction"}
    assert kernels.kernel_available("onednn") == CPU.onednn


# ----------------------------------------------------------------------------- saturation probe, global state

_PROBE_SCRIPT = """
import json, logging, sys, torch, qpass
from qpass import kernels
from qpass.passes import lower as lowering
from tests.linears import KERNEL_CONFIGS, Proj, inputs, worst_case_weight
logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(message)s", stream=sys.stdout)
cpu = lowering.Target.detect(torch.device("cpu"))
out = {"probe": {k: kernels.int8_dot_exact(k) for k in kernels.PROBED_KERNELS},
       "grids": {k: [g.note for g in lowering.cpu_grids(cpu, k)] for k in kernels.PROBED_KERNELS}, "runs": []}
model = Proj(100, 70, True).eval()
with torch.no_grad():
    model.proj.weight.copy_(worst_case_weight(70, 100))
config = KERNEL_CONFIGS["w8a8_dynamic"].replace(smoothing=None)
for split in (0.0, None):
    for m in (32, 3, 32):
        x = inputs(m, 100, seed=m, worst_case=True)
        torch._dynamo.reset()
        backend = qpass.backend(config.replace(split_weights=split), inductor=False)
        ref_backend = qpass.backend(config.replace(lower=False), inductor=False)
        with torch.no_grad():
            y = torch.compile(model, backend=backend, dynamic=False)(x)
            torch._dynamo.reset()
            ref = torch.compile(model, backend=ref_backend, dynamic=False)(x)
        out["runs"].append([m, split, backend.report.rows["proj"].kernel, ((y - ref).norm() / ref.norm()).item()])
print(json.dumps(out))
"""


@needs_onednn
@pytest.mark.skipif(any(v in os.environ for v in ("ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS")),
                    reason="an ISA limit is set in this process: the comparison needs the CPU's own kernels here")
@pytest.mark.parametrize("limits", [
    {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    {"ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"},
], ids=["onednn-avx2", "onednn-and-fbgemm-avx2"])
def test_saturation_probe_sees_a_limited_isa(limits):
    """oneDNN and FBGEMM each choose their instructions at run time, and each can be limited to AVX2
    (``vpmaddubsw``, saturating int16 pair sums) whatever the CPU flags say. In a fresh process so
    limited, each kernel's probe reports what the kernel does, logs that once per kernel, and on
    worst-case inputs (on the 8-bit grid a saturating kernel is off by half the result) the lowering
    computes the reference's integers on exactly the saturating kernels by splitting the weights (the
    default), or stays close on the 7-bit grids (``split_weights=None``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS")}
    run = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT], env={**env, **limits}, capture_output=True,
                         text=True, cwd=Path(__file__).parent.parent, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    got = json.loads(lines[-1])
    # FBGEMM unlimited does what it does in this process (exact with VNNI, saturating without).
    fbgemm_exact = "FBGEMM_ENABLE_INSTRUCTIONS" not in limits and kernels.int8_dot_exact("fbgemm")
    assert got["probe"] == {"onednn": False, "fbgemm": fbgemm_exact}, got
    assert got["grids"] == {"onednn": ["7-bit weights", "7-bit act"],
                            "fbgemm": [""] if fbgemm_exact else ["7-bit weights", "7-bit act"]}, got
    probe_logs = [line for line in lines if line.startswith("LOG qpass.passes.lower") and "worst-case probe" in line]
    assert len(probe_logs) == 2 and "onednn" in probe_logs[0] + probe_logs[1], probe_logs
    for m, split, kernel, err in got["runs"]:
        saturating = m > lowering.DECODE_M or not fbgemm_exact
        name = "onednn" if m > lowering.DECODE_M else "fbgemm"
        if split is None:
            assert kernel.startswith(f"{name} (7-bit") if saturating else kernel == name, (m, kernel)
            assert err < 0.02, (m, kernel, err)
        else:
            assert kernel == (f"{name} (8-bit split weights)" if saturating else name), (m, kernel)
            assert err < 1e-6, (m, kernel, err)


@needs_onednn
@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines or not kernels.kernel_available("fbgemm"),
                    reason="needs the onednn quantized engine and FBGEMM")
def test_quantized_engine_is_never_changed(monkeypatch, caplog):
    """Under ``torch.backends.quantized.engine = "onednn"`` FBGEMM weights cannot be packed without
    switching the process-wide engine (every FBGEMM pack dispatches on it), so decode-sized linears
    get oneDNN, with one log line; the engine is never set, not even for a moment, and the results
    equal the integer reference."""
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "onednn"
    sets = []
    real_set = torch._C._set_qengine
    monkeypatch.setattr(torch._C, "_set_qengine", lambda e: (sets.append(e), real_set(e))[1])
    lowering._log_fbgemm_refused.cache_clear()
    try:
        k, n = 100, 70
        model = Proj(k, n, True).eval()
        config = qpass.preset("w8a8_dynamic", smoothing=None)
        for m in (3, 3):
            x = inputs(m, k, seed=m, worst_case=False)
            with caplog.at_level(logging.INFO, logger="qpass.passes.lower"):
                y, backend = run_backend(model, config, None, x)
            kernel, grid = _split(backend.report.rows["proj"].kernel)
            assert kernel == "onednn" and torch.backends.quantized.engine == "onednn"
            acc, unit = int_reference(model, x, config, None, grid)
            acc_hat = (y.reshape(-1, n).double() - model.proj.bias.detach().double()) / unit
            tol = 0.25 + 4 * 2.0**-24 * (2 * grid.act_qmax + 1) * (grid.w_qmax * k)
            assert (acc_hat - acc.double()).abs().max().item() < tol
        with pytest.raises(RuntimeError, match="does not change the process-wide engine"):
            kernels.pack_fbgemm_dynamic(torch.randn(4, 8))
    finally:
        monkeypatch.undo()
        torch.backends.quantized.engine = engine
    assert sets == []
    refused = [r.getMessage() for r in caplog.records if "pack FBGEMM weights" in r.getMessage()]
    assert len(refused) == 1 and "'onednn'" in refused[0], refused  # once, not once per lowering
