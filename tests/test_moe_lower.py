"""Lowered fused experts: ``qpass::onednn_grouped_qlinear`` (one oneDNN int8 GEMM per expert with rows).

As in tests/test_lower.py, the integer checks recover the kernel's integer dot products from its float
output and compare them, element by element, with an int64 matmul of the quantized operands written
out here from the module's weights and inputs, per expert: an expert with no rows and one with a
single row included.
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
from torch import nn

import qpass
from qpass.calibration import Calibration, ChannelStats
from qpass.passes import lower as lowering
from tests.models import tiny_model, token_batches

CPU = lowering.Target.detect(torch.device("cpu"))
needs_onednn = pytest.mark.skipif(not CPU.onednn, reason="oneDNN int8 kernels not available")
pytestmark = needs_onednn

E, K, N = 4, 37, 23
#: Segment lengths: expert 1 gets no rows, expert 2 a single row.
SEGMENTS = (3, 0, 1, 5)

CONFIGS = {
    "sym per-token": qpass.preset("w8a8_dynamic", activation=qpass.QuantSpec("int8", qpass.PerToken())),
    "asym per-token": qpass.preset("w8a8_dynamic", activation=qpass.QuantSpec("int8", qpass.PerToken(), symmetric=False)),
    "per-tensor": qpass.preset("w8a8_tensor_dynamic"),
    "static": qpass.preset("w8a8_static", dynamic_fallback=None),
}


class Grouped(nn.Module):
    """One grouped matmul over fused expert weights, as transformers runs it: ``W`` (E, N, K)."""

    def __init__(self, worst_case: bool):
        super().__init__()
        w = torch.randn(E, N, K) / K**0.5
        if worst_case:  # every weight at +-absmax (int8 +-127, 7-bit +-63), one sign per output row
            w = torch.where(torch.arange(N)[:, None] % 2 == 0, 1.0, -1.0).expand(E, N, K) * 0.3
        self.gate_up_proj = nn.Parameter(w)

    def forward(self, x, offs):
        from transformers.integrations.moe import _grouped_mm

        return _grouped_mm(x, self.gate_up_proj.transpose(-2, -1), offs=offs)


def _offs(segments) -> torch.Tensor:
    return torch.cumsum(torch.tensor(segments), 0).to(torch.int32)


def _rows(m: int, seed: int, worst_case: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g)
    x[:, :3] *= 30.0
    if worst_case:
        x[:] = 5.0
    return x


def _static_calibration(x: torch.Tensor, offs: torch.Tensor) -> Calibration:
    """Per-expert statistics of ``x``'s segments (every expert seen: a few rows of its own)."""
    ids = qpass.ops.expert_of_rows(x, offs)
    lo = torch.stack([x[ids == e].amin(0) for e in range(E)])
    hi = torch.stack([x[ids == e].amax(0) for e in range(E)])
    counts = torch.bincount(ids, minlength=E)
    return Calibration({"gate_up_proj": ChannelStats(torch.maximum(-lo, hi), lo, hi, x.shape[0], expert_tokens=counts)})


def _int_reference(model: Grouped, x, offs, config, calib, grid):
    """``(acc, unit)``: the exact int64 dot products on ``grid``, row by row with its expert's weight,
    and the float value of one integer unit per element."""
    ids = qpass.ops.expert_of_rows(x, offs)
    w = model.gate_up_proj.detach().float()
    s8 = (w.abs().amax(dim=2) / 127).clamp(min=1e-12)  # (E, N)
    w8 = torch.clamp(torch.round(w / s8[..., None]), -127, 127).double()  # in float32: see linears.int_reference
    s8 = s8.double()
    qw, qa = grid.w_qmax, grid.act_qmax
    w_k = torch.clamp(torch.round(w8 * qw / 127), -qw, qw)[ids]  # (rows, N, K)
    s_k = (s8 * 127 / qw)[ids]  # (rows, N)
    act = config.activation
    if not act.symmetric:
        lo, hi = x.amin(dim=1, keepdim=True).clamp(max=0), x.amax(dim=1, keepdim=True).clamp(min=0)
        qmax = 2 * qa + 1
        sx = ((hi - lo) / qmax).clamp(min=1e-12)
        zp = torch.clamp(-torch.round(lo / sx), 0, qmax)
        x_q = torch.clamp(torch.round(x / sx) + zp, 0, qmax) - zp
    else:
        if not act.dynamic:
            st = calib["gate_up_proj"]
            ref = (torch.maximum(-st.min.amin(1), st.max.amax(1)).clamp(min=0) / 127).clamp(min=1e-12)
            sx = (ref.double() * (127.0 / qa)).float()[ids, None]
        elif isinstance(act.granularity, qpass.PerToken):
            sx = (x.abs().amax(dim=1, keepdim=True) / qa).clamp(min=1e-12)
        else:
            sx = (x.abs().amax() / qa).clamp(min=1e-12).reshape(1, 1)
        x_q = torch.clamp(torch.round(x / sx), -qa - 1, qa)
    acc = torch.einsum("rk,rnk->rn", x_q.long(), w_k.long())
    return acc, sx.double() * s_k


def _lowered(model, config, calib, x, offs, *, dynamic=False, inductor=False):
    torch._dynamo.reset()
    backend = qpass.backend(config, calibration=calib, inductor=inductor)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with torch.no_grad():
        return compiled(x, offs), backend, compiled


def _dynamic_calls(model, config, layouts):
    """One Inductor compile with ``dynamic=True`` at the first segment layout, then a call at each:
    yields ``(offs, x, y, backend)`` per layout, the rows drawn as ``_rows`` draws them."""
    compiled = None
    for segments in layouts:
        offs = _offs(segments)
        x = _rows(offs[-1].item(), seed=sum(segments), worst_case=False)
        if compiled is None:
            y, backend, compiled = _lowered(model, config, None, x, offs, dynamic=True, inductor=True)
        else:
            with torch.no_grad():
                y = compiled(x, offs)
        yield offs, x, y, backend


def _integer_error(model, config, calib, x, offs, y, grid) -> tuple[float, float]:
    """(largest difference from the integer reference in integer units, its tolerance)."""
    acc, unit = _int_reference(model, x, offs, config, calib, grid)
    err = (y.double() / unit - acc.double()).abs().max().item()
    tol = 0.25  # one float32 rounding of the result
    if not config.activation.symmetric:  # the zero point's term subtracted in float32 after the kernel
        tol += 4 * 2.0**-24 * (2 * grid.act_qmax + 1) * (grid.w_qmax * K)
    return err, tol


def _check_integers(model, config, calib, x, offs, y, grid):
    err, tol = _integer_error(model, config, calib, x, offs, y, grid)
    assert err < tol, f"integer dot products differ by {err:.3f} units"


@pytest.mark.parametrize("worst_case", [False, True], ids=["random", "worst-case"])
@pytest.mark.parametrize("grid", [None, lowering.GRID_W7, lowering.GRID_A7, lowering.GRID_SPLIT],
                         ids=["probed", "7-bit-weights", "7-bit-act", "split-weights"])
@pytest.mark.parametrize("name", CONFIGS)
def test_lowered_experts_equal_integer_reference(monkeypatch, name, grid, worst_case):
    """Each expert's rows through its own packed int8 weight: the probed grid of this CPU, and each
    7-bit grid of CPUs without VNNI forced (as tests/test_lower.py forces them), and the split
    weights (``split_weights``), whose halves give the 8-bit integers on any CPU."""
    if grid is not None:
        monkeypatch.setattr(lowering, "cpu_grids", lambda target, kernel: (grid,))
    torch.manual_seed(len(name))
    model = Grouped(worst_case).eval()
    offs = _offs(SEGMENTS)
    x = _rows(offs[-1].item(), seed=3, worst_case=worst_case)
    config = CONFIGS[name].replace(smoothing=None)
    calib = _static_calibration(_rows(8, seed=4, worst_case=worst_case), _offs((2, 2, 2, 2))) if name == "static" else None
    y, backend, _ = _lowered(model, config, calib, x, offs)
    used = grid or lowering.kernel_grids(CPU, "onednn", config.split_weights)[0]
    assert backend.report.rows["gate_up_proj"].kernel == lowering.experts_label(used)
    _check_integers(model, config, calib, x, offs, y, used)


#: A weight row (absmax A) and weight B whose quotient B / (A / 127) is a tie in float32 (-76.5) but
#: not in float64 (-76.5000016): a weight of a random draw once (torch.manual_seed(6) plus one draw).
TIE_ABSMAX, TIE_WEIGHT = 0.3622113764286041, -0.21818244457244873


@pytest.mark.parametrize("grid", [None, lowering.GRID_SPLIT], ids=["probed", "split-weights"])
def test_weight_on_a_float32_tie_rounds_half_to_even(monkeypatch, grid):
    """A weight whose float32 quotient by its scale is exactly -76.5: the kernel's integer is -76 (round
    half to even in float32, as ``qpass.quantize`` defines it and the reference path computes) and the
    integer check's reference rounds it the same way (in float64 it made it -77: off by the
    activation's integer on every row of the expert). The 8-bit integers: the probed grid and the split
    weights (a 7-bit weight grid maps -76 and -77 to the same integer)."""
    if grid is not None:
        monkeypatch.setattr(lowering, "cpu_grids", lambda target, kernel: (grid,))
    scale = torch.tensor(TIE_ABSMAX) / 127
    assert torch.round(torch.tensor(TIE_WEIGHT) / scale).item() == -76.0
    assert torch.round(torch.tensor(TIE_WEIGHT, dtype=torch.float64) / scale.double()).item() == -77.0
    torch.manual_seed(0)
    model = Grouped(False).eval()
    with torch.no_grad():
        row = model.gate_up_proj[3, 7]
        row.clamp_(-TIE_ABSMAX / 2, TIE_ABSMAX / 2)
        row[0], row[21] = TIE_ABSMAX, TIE_WEIGHT
    offs = _offs(SEGMENTS)
    x = _rows(offs[-1].item(), seed=3, worst_case=False)
    x[:, 21] = 5.0  # a few integer units on every row, so the weight's unit shows
    config = CONFIGS["sym per-token"].replace(smoothing=None)
    y, backend, _ = _lowered(model, config, None, x, offs)
    used = grid or lowering.kernel_grids(CPU, "onednn", config.split_weights)[0]
    assert backend.report.rows["gate_up_proj"].kernel == lowering.experts_label(used)
    _check_integers(model, config, None, x, offs, y, used)


def _forced_grid_runs(force, grids) -> list[list]:
    """``[config, grid note, err, tol]`` for every config on worst-case operands, each grid forced
    in turn by ``force(grid)``: the integer check's numbers, for a subprocess to report."""
    runs = []
    for grid in grids:
        force(grid)
        for name, config in CONFIGS.items():
            torch.manual_seed(len(name))
            model = Grouped(True).eval()
            offs = _offs(SEGMENTS)
            x = _rows(offs[-1].item(), seed=3, worst_case=True)
            calib = _static_calibration(_rows(8, seed=4, worst_case=True), _offs((2, 2, 2, 2))) if name == "static" else None
            y, backend, _ = _lowered(model, config.replace(smoothing=None), calib, x, offs)
            runs.append([name, backend.report.rows["gate_up_proj"].kernel,
                         *_integer_error(model, config, calib, x, offs, y, grid)])
    return runs


_SPLIT_SCRIPT = """
import json
from qpass import kernels
from qpass.passes import lower as lowering
from tests.test_moe_lower import _forced_grid_runs
def force(grid):
    lowering.cpu_grids = lambda target, kernel: (grid,)
runs = _forced_grid_runs(force, (lowering.GRID_SPLIT, lowering.GRID_8BIT))
print(json.dumps({"probe": kernels.int8_dot_exact("onednn"), "runs": runs}))
"""


@pytest.mark.skipif("ONEDNN_MAX_CPU_ISA" in os.environ, reason="an ISA limit is set in this process: the subprocess sets its own")
def test_split_expert_weights_exact_where_int8_saturates():
    """In a process whose oneDNN is limited to AVX2 (u8 x s8 pair sums saturate int16, as on CPUs
    without VNNI), on worst-case operands: every expert's split weights give exactly the 8-bit
    integer reference for the four kinds of activations, where the plain 8-bit grid is off by
    thousands of units."""
    run = subprocess.run([sys.executable, "-c", _SPLIT_SCRIPT], env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["probe"] is False, got
    assert len(got["runs"]) == 2 * len(CONFIGS)
    for name, kernel, err, tol in got["runs"]:
        if kernel == lowering.experts_label(lowering.GRID_SPLIT):
            assert err < tol, (name, kernel, err, tol)
        else:
            assert kernel == lowering.EXPERTS_KERNEL and err > 1000, (name, kernel, err)


def test_rows_past_the_last_segment_are_zero_and_segments_may_be_empty():
    """The kernel itself: every expert empty but the last; rows past ``offs[-1]`` give zeros, like
    the grouped matmul it replaces; an unpacked weight is refused before oneDNN can crash."""
    from qpass import kernels

    w = torch.randint(-127, 128, (E, N, K), dtype=torch.int8)
    packed = [kernels.pack_onednn_int8(w[e], 1.0) for e in range(E)]
    x = torch.randint(0, 256, (6, K), dtype=torch.uint8)
    offs = torch.tensor([0, 0, 0, 4], dtype=torch.int32)
    y = kernels.onednn_grouped_qlinear(x, offs, [p.packed for p in packed], torch.ones(E, N), 128)
    exact = (x[:4].long() - 128) @ w[3].long().T
    if lowering.cpu_grids(CPU, "onednn")[0] is lowering.GRID_8BIT:  # full-range operands are exact here
        assert torch.equal(y[:4].long(), exact)
    assert torch.equal(y[4:], torch.zeros(2, N))
    with pytest.raises(ValueError, match="needs weights packed by pack_onednn_int8"):
        kernels.onednn_grouped_qlinear(x, offs, [w[e] for e in range(E)], torch.ones(E, N), 128)


def test_inductor_dynamic_shapes_one_graph_for_every_row_count():
    """``torch.compile(..., dynamic=True)`` with Inductor: the op's fake implementation serves every
    row count and segment layout from one graph; each call equals the integer reference."""
    torch.manual_seed(0)
    model = Grouped(False).eval()
    config = CONFIGS["sym per-token"].replace(smoothing=None)
    for offs, x, y, backend in _dynamic_calls(model, config, ((3, 0, 1, 5), (1, 1, 1, 1), (0, 7, 0, 2), (2, 0, 0, 0))):
        _check_integers(model, config, None, x, offs, y, lowering.kernel_grids(CPU, "onednn", config.split_weights)[0])
    assert len(backend.graphs) == 1
    assert backend.report.rows["gate_up_proj"].kernel.startswith(lowering.EXPERTS_KERNEL[:-1])


# ----------------------------------------------------------------------------- whole models


def _rel_max(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=["qwen2_moe", "olmoe"])
def moe(request):
    model = tiny_model(request.param)
    calib = qpass.calibrate(model, token_batches(4))
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    return model, calib, ids, ref


def _logits(model, config, calib, ids, *, dynamic=False):
    torch._dynamo.reset()
    backend = qpass.backend(config, calibration=calib, inductor=False)
    with torch.no_grad():
        return torch.compile(model, backend=backend, dynamic=dynamic)(ids, use_cache=False).logits, backend


def _expert_paths(model):
    return [p for p, w in model.named_parameters() if w.dim() == 3]


@pytest.mark.parametrize("name", ["w8a8_dynamic", "w8a8_static"])
def test_lowered_moe_close_to_reference_path(moe, name, caplog):
    """Qwen2-MoE and OLMoE: every expert weight lowered, no warning about the reference path, and
    the logits within the dense lowering test's bound (twice the reference path's error of fp32) and
    within 2e-3 (relative norm) of the reference path's. Measured: 2e-7 to 3e-7, and 7e-4 on OLMoE
    w8a8_dynamic, where lowered dense linears and lowered experts together (each alone 3e-7) flip
    a rounding that one layer amplifies (2.1e-3 of the largest logit)."""
    model, calib, ids, ref = moe
    with caplog.at_level(logging.WARNING, logger="qpass.passes.lower"):
        out, backend = _logits(model, qpass.preset(name), calib, ids)
    reference, _ = _logits(model, qpass.preset(name, lower=False), calib, ids)
    labels = {lowering.experts_label(g) for g in lowering.kernel_grids(CPU, "onednn", 0.0)}  # split without VNNI
    for p in _expert_paths(model):
        assert backend.report.rows[p].kernel in labels, (p, backend.report.rows[p].kernel)
    assert not [r for r in caplog.records if "fused expert" in r.getMessage()]
    if CPU.int8_dot:  # the reference path's own integers
        assert _rel(out, reference) < 2e-3, _rel(out, reference)
    # On the 7-bit grids (no VNNI) the tiny OLMoE's dense linears lowered give 2.3x the reference
    # path's error under w8a8_dynamic (0.0159 against 0.0070; its experts alone stay within 1.14x):
    # held to 2.5x there, an open question, not the dense test's 2x.
    factor = 2.0 if CPU.int8_dot else 2.5
    assert _rel(out, ref) < factor * _rel(reference, ref), (_rel(out, ref), _rel(reference, ref))


#: Only the experts quantized (the router is never): the forced-grid test holds them alone to the bound.
EXPERTS_ONLY = ("lm_head", "*self_attn*", "*shared_expert*")


@pytest.mark.parametrize("name", ["w8a8_dynamic", "w8a8_static"])
def test_forced_7bit_grid_keeps_the_bound(moe, monkeypatch, name):
    """A (fake) CPU without VNNI, only the experts quantized, ``split_weights=None``: each expert layer
    on the 7-bit grid its calibration samples reproduce better, named in the report, within 2.5x the
    reference path's error of fp32. Measured with alpha='auto' (which scores the experts and their
    8-bit reference since issue 14): Qwen2-MoE 2.44x / 2.14x (dynamic / static), OLMoE 1.43x / 1.21x,
    DeepSeek-V3 1.32x / 1.49x; at alpha 0.5 1.75x / 1.80x, 1.18x / 1.60x, 2.27x / 1.57x. The searched
    alpha lowers the reference path's error more than the 7-bit grids': the lowered errors themselves
    are no larger than at alpha 0.5 (Qwen2-MoE 0.0032 / 0.0039 against 0.0037 / 0.0039)."""
    model, calib, ids, ref = moe
    monkeypatch.setattr(lowering.Target, "detect", staticmethod(
        lambda device: lowering.Target("cpu", onednn=True, fbgemm=True, int8_dot=False)))
    config = qpass.preset(name, skip=EXPERTS_ONLY, split_weights=None)
    reference, _ = _logits(model, config.replace(lower=False), calib, ids)
    out, backend = _logits(model, config, calib, ids)
    for p in _expert_paths(model):
        row = backend.report.rows[p]
        assert row.kernel in {lowering.experts_label(g) for g in (lowering.GRID_W7, lowering.GRID_A7)}, row.kernel
        assert "kernel grid by calibration error" in row.reason, row.reason
    assert 0 < _rel(out, ref) < 2.5 * _rel(reference, ref), (_rel(out, ref), _rel(reference, ref))


def test_split_weights_chosen_for_experts_by_calibration_error(monkeypatch):
    """A (fake) CPU without VNNI, only the experts quantized: with ``split_weights=0.0`` (the default)
    every expert layer takes the split weights unmeasured; with a tiny ``d > 0`` where its best 7-bit
    grid loses to 8-bit on its calibration samples. Each says so in the report and gives the reference
    path's logits: the split computes its 8-bit integers (measured 4e-8). With ``split_weights=None``
    the 7-bit grids are chosen: ``test_forced_7bit_grid_keeps_the_bound``."""
    model = tiny_model("qwen2_moe", layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    ids = token_batches(1, seed=7)[0]
    monkeypatch.setattr(lowering.Target, "detect", staticmethod(
        lambda device: lowering.Target("cpu", onednn=True, fbgemm=True, int8_dot=False)))
    config = qpass.preset("w8a8_dynamic", skip=EXPERTS_ONLY, smoothing=None)  # the grids are the point
    reference, _ = _logits(model, config.replace(lower=False), calib, ids)
    for d in (0.0, 1e-9):
        out, backend = _logits(model, config.replace(split_weights=d), calib, ids)
        for p in _expert_paths(model):
            row = backend.report.rows[p]
            assert row.kernel == lowering.experts_label(lowering.GRID_SPLIT), row.kernel
            if d == 0.0:
                assert row.reason.endswith(lowering.SPLIT_ALL), row.reason
            else:
                assert ", 8-bit " in row.reason and row.reason.endswith("7-bit over 8-bit by more than 1e-07%, split"), row.reason
        assert _rel(out, reference) < 1e-5, _rel(out, reference)


def test_dynamic_shapes_across_sequence_lengths():
    """``torch.compile(..., dynamic=True)`` on Qwen2-MoE across 5, 17, 33 and 1 tokens: each equals the
    reference path's logits, and lowering adds no graph (recompile) to the reference path's."""
    model = tiny_model("qwen2_moe", layers=1)
    calib = qpass.calibrate(model, token_batches(2))
    config = qpass.preset("w8a8_dynamic")
    torch._dynamo.reset()
    backend = qpass.backend(config, calibration=calib, inductor=False)
    ref_backend = qpass.backend(config.replace(lower=False), calibration=calib, inductor=False)
    lowered = torch.compile(model, backend=backend, dynamic=True)
    reference = torch.compile(model, backend=ref_backend, dynamic=True)
    for seq in (5, 17, 33, 1):
        ids = token_batches(1, batch=1, seq=seq, seed=seq)[0]
        with torch.no_grad():
            out, ref = (f(ids, use_cache=False).logits for f in (lowered, reference))
        if CPU.int8_dot:  # the reference path's own integers; without VNNI the 7-bit grids differ from it
            assert _rel_max(out, ref) < 2e-3, (seq, _rel_max(out, ref))
    assert len(backend.graphs) == len(ref_backend.graphs)
    assert all(backend.report.rows[p].kernel.startswith(lowering.EXPERTS_KERNEL[:-1]) for p in _expert_paths(model))


@pytest.mark.parametrize("name, why", [("fp8_dynamic", "fp8 on CPU"), ("w4a16", "weight-only"),
                                       ("w8a16", "weight-only")])
def test_experts_without_a_kernel_keep_the_reference_path_with_one_warning(name, why, caplog):
    model = tiny_model("olmoe", layers=1)
    calib = qpass.calibrate(model, token_batches(1))
    with caplog.at_level(logging.WARNING, logger="qpass.passes.lower"):
        _, backend = _logits(model, qpass.preset(name), calib, token_batches(1, seed=7)[0])
    experts = _expert_paths(model)
    for p in experts:
        assert backend.report.rows[p].kernel == f"reference ({why})"
    warnings = [r.getMessage() for r in caplog.records if "fused expert" in r.getMessage()]
    assert warnings == [f"qpass lower: {len(experts)} fused expert weights kept on the reference quant/dequant "
                        f"path: " + ", ".join(f"{p} ({why})" for p in experts)]


@pytest.mark.parametrize("name", ["sym per-token", "asym per-token", "static"])
def test_lowered_experts_graph_snapshot(monkeypatch, name):
    """The lowered grouped matmul for a fixed target (a VNNI CPU: the 8-bit grid), in
    tests/snapshots/lowered_experts_*.txt; its numerical twin is the integer test above.
    EXPECTTEST_ACCEPT=1 rewrites them."""
    import os
    from pathlib import Path

    monkeypatch.setattr(lowering.Target, "detect", staticmethod(
        lambda device: lowering.Target("cpu", onednn=True, fbgemm=True, int8_dot=True)))
    torch.manual_seed(0)
    model = Grouped(False).eval()
    offs = _offs(SEGMENTS)
    x = _rows(offs[-1].item(), seed=3, worst_case=False)
    calib = _static_calibration(_rows(8, seed=4, worst_case=False), _offs((2, 2, 2, 2))) if name == "static" else None
    _, backend, _ = _lowered(model, CONFIGS[name].replace(smoothing=None), calib, x, offs)
    text = qpass.format_graph(backend.graphs[0])
    path = Path(__file__).parent / "snapshots" / f"lowered_experts_{name.replace(' ', '_')}.txt"
    if os.environ.get("EXPECTTEST_ACCEPT") == "1":
        path.write_text(text)
    assert path.exists(), f"no snapshot {path.name}; run with EXPECTTEST_ACCEPT=1"
    assert text == path.read_text(), f"{path.name} changed; run with EXPECTTEST_ACCEPT=1 and read the diff"


def test_bf16_experts_lowered():
    """bf16 experts (torch._grouped_mm): lowered, output in bf16, within twice the reference path's
    error of the bf16 model (measured 0.0125 against the reference path's 0.0142: the integer GEMM
    accumulates in int32 and rescales in fp32, the reference in bf16)."""
    model = tiny_model("qwen2_moe").to(torch.bfloat16)
    calib = qpass.calibrate(model, token_batches(2))
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.float()
    reference, _ = _logits(model, qpass.preset("w8a8_dynamic", lower=False), calib, ids)
    out, backend = _logits(model, qpass.preset("w8a8_dynamic"), calib, ids)
    assert out.dtype == torch.bfloat16
    assert all(backend.report.rows[p].kernel.startswith(lowering.EXPERTS_KERNEL[:-1]) for p in _expert_paths(model))
    assert 0 < _rel(out.float(), ref) < 2.0 * _rel(reference.float(), ref)
