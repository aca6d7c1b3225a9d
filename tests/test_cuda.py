"""On a real CUDA device (skipped without one): every preset compiles and runs there, the reference
quant/dequant path gives what it gives on CPU, the lowered kernels (``_int_mm``, ``_scaled_mm``)
reproduce it (INT8: the same integers, so the same logits; FP8: each linear equal up to the tensor
cores' accumulation order), and the INT8 kernel's integer dot products are exact.

CI has no GPU; these run wherever one is present (``python -m pytest tests/test_cuda.py``).
"""

from __future__ import annotations

import pytest
import torch

import qpass
from qpass.passes import lower as lowering
from tests.models import TINY_PRESETS, tiny_model, token_batches
from tests.linears import KERNEL_CONFIGS, Proj, int_reference, inputs, proj_case
from tests.test_lower import EXPECTED
from tests.test_quantize import BOUNDS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def _column() -> int:
    """Index of this GPU's column in ``test_lower.EXPECTED`` (fake H100 = 8.9+, fake A100 = older)."""
    return 2 if torch.cuda.get_device_capability() >= (8, 9) else 3


def _run(model, config, calib, ids, *, inductor=True):
    torch._dynamo.reset()
    backend = qpass.backend(config, calibration=calib, inductor=inductor)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
    torch._dynamo.reset()
    return out, backend


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


# integer_only (illm_w8a8) is not here: its DI-MatMul is an int32 torch.matmul, which CUDA does not implement
@pytest.mark.parametrize("name", sorted(n for n in TINY_PRESETS if qpass.PRESETS[n].integer_only is None))
def test_preset_on_cuda_matches_cpu_reference_and_lowers(name):
    """A 2-layer Llama on CUDA through Inductor: the reference path's logits equal the same config's
    on CPU (plain aten ops on either device), the lowered model gets this GPU's kernel for every
    decoder linear, and its logits equal the reference path's (same integers / fp8 values)."""
    model = tiny_model("llama")
    batches = token_batches(4)
    ids = token_batches(1, batch=1, seq=48, seed=7)[0]
    with torch.no_grad():
        fp32 = model(ids, use_cache=False).logits
    config = qpass.preset(name)
    cpu_ref, _ = _run(model, config.replace(lower=False), qpass.calibrate(model, batches), ids)

    model_cuda = tiny_model("llama").to(CUDA)
    calib = qpass.calibrate(model_cuda, [b.to(CUDA) for b in batches])
    ids_cuda = ids.to(CUDA)
    cuda_ref, _ = _run(model_cuda, config.replace(lower=False), calib, ids_cuda)
    lowered, backend = _run(model_cuda, config, calib, ids_cuda)

    assert _rel(cuda_ref, cpu_ref) < 1e-3, _rel(cuda_ref, cpu_ref)
    assert 0 < _rel(cuda_ref, fp32) <= 1.25 * BOUNDS[name]  # the CPU tests' bounds; a longer input here
    kernels = {r.kernel for p, r in backend.report.rows.items() if p != "lm_head"}
    expected = EXPECTED[name][_column()]
    if name == "llm_int8":  # linears without an outlier channel have no split and get the int8 kernel
        assert expected in kernels and kernels <= {expected, EXPECTED["w8a8_dynamic"][_column()]}, kernels
    else:
        assert kernels == {expected}, kernels
    if name in FP8_PRESETS:
        # fp8 tensor cores accumulate in another order than the reference's fp32 matmul (per linear
        # 1.5e-4..2.2e-4 relative, test_fp8_lowered_linear_matches_reference); in this random model a
        # change that small flips fp8 roundings downstream and moves the logits by about 2% (1e-5
        # weight noise does the same on CPU), so the model-level check is the error bound.
        assert _rel(lowered, fp32) <= 1.25 * BOUNDS[name], _rel(lowered, fp32)
    else:  # _int_mm's integer dot products are exact: the same logits as the reference path
        assert _rel(lowered, cuda_ref) < 2e-3, _rel(lowered, cuda_ref)


FP8_PRESETS = ("fp8_dynamic", "fp8_static")


@pytest.mark.parametrize("k,n", [(64, 64), (64, 32), (96, 64), (64, 96), (100, 70)])
@pytest.mark.parametrize("name", FP8_PRESETS)
def test_fp8_lowered_linear_matches_reference(name, k, n):
    """One linear through ``_scaled_mm`` (padded where K or N is not a multiple of 16) against the
    reference quant/dequant path on the same fp8 values: equal up to accumulation order."""
    torch.manual_seed(0)
    model = Proj(k, n, bias=True).eval().to(CUDA)
    x = inputs(48, k, seed=1, worst_case=False).to(CUDA)
    calib = qpass.calibrate(model, [inputs(64, k, seed=99, worst_case=False).to(CUDA)])
    outs = {}
    for lower in (False, True):
        torch._dynamo.reset()
        backend = qpass.backend(qpass.preset(name, smoothing=None, lower=lower), calibration=calib)
        with torch.no_grad():
            outs[lower] = torch.compile(model, backend=backend, dynamic=False)(x)
    assert backend.report.rows["proj"].kernel == "cuda fp8 (_scaled_mm)"
    assert _rel(outs[True], outs[False]) < 1e-3, _rel(outs[True], outs[False])


@pytest.mark.parametrize("worst_case", [False, True], ids=["random", "worst-case"])
@pytest.mark.parametrize("m,k,n", [(1, 37, 23), (17, 100, 70), (513, 100, 70)])
@pytest.mark.parametrize("name", KERNEL_CONFIGS)
def test_int_mm_dot_products_are_exact(name, m, k, n, worst_case):
    """``_int_mm`` on CUDA (padded to the shapes it takes): the integer dot products recovered from
    the lowered output equal an int64 matmul of the quantized operands, element by element."""
    model, x, calib_x, calib = proj_case(m, k, n, worst_case=worst_case)
    config = KERNEL_CONFIGS[name].replace(smoothing=None)
    acc, unit = int_reference(model, x, config, calib, lowering.GRID_8BIT)

    model_cuda = Proj(k, n, bias=True).eval()
    model_cuda.load_state_dict(model.state_dict())
    model_cuda.to(CUDA)
    calib = qpass.calibrate(model_cuda, [calib_x.to(CUDA)])
    torch._dynamo.reset()
    backend = qpass.backend(config, calibration=calib)
    with torch.no_grad():
        y = torch.compile(model_cuda, backend=backend, dynamic=False)(x.to(CUDA))
    assert backend.report.rows["proj"].kernel == "cuda int8 (_int_mm)"
    b = model.proj.bias.detach().double()
    acc_hat = (y.reshape(-1, n).double().cpu() - b) / unit
    err = (acc_hat - acc.double()).abs().max().item()
    # Asymmetric: the zero point's term is subtracted in float32 after the kernel (see test_lower).
    tol = 0.25 if config.activation.symmetric else 0.25 + 4 * 2.0**-24 * 255 * 127 * k
    assert err < tol, f"integer dot products differ by {err:.3f} units (max |acc| {acc.abs().max().item()})"


@pytest.mark.parametrize("name", ["w8a8_dynamic", "asym per-token", "fp8_dynamic"])
def test_lowered_kernels_run_under_dynamic_shapes(name):
    """``torch.compile(..., dynamic=True)`` through Inductor on CUDA: one graph serves 5, 17 and 33
    tokens (5 padded to _int_mm's 17 rows, M read from the runtime shape) and 1 token its own; every
    length matches the reference path (INT8: the same integers; FP8: up to accumulation order)."""
    config = KERNEL_CONFIGS[name] if name in KERNEL_CONFIGS else qpass.preset(name)
    model = tiny_model("llama").to(CUDA)
    calib = qpass.calibrate(model, [b.to(CUDA) for b in token_batches(4)])
    torch._dynamo.reset()
    backend = qpass.backend(config, calibration=calib)
    ref_backend = qpass.backend(config.replace(lower=False), calibration=calib)
    lowered = torch.compile(model, backend=backend, dynamic=True)
    reference = torch.compile(model, backend=ref_backend, dynamic=True)
    for seq in (5, 17, 33, 1):
        ids = token_batches(1, batch=1, seq=seq, seed=seq)[0].to(CUDA)
        with torch.no_grad():
            out, ref = (f(ids, use_cache=False).logits for f in (lowered, reference))
        bound = 2e-3 if name not in FP8_PRESETS else 0.05  # fp8: rounding flips (see above)
        assert _rel(out, ref) < bound, (seq, _rel(out, ref))
    torch._dynamo.reset()
    assert len(backend.graphs) == 2, len(backend.graphs)
    assert all(r.kernel.startswith("cuda") for p, r in backend.report.rows.items() if p != "lm_head")


def test_generate_on_cuda_runs_through_qpass_with_a_static_cache():
    """``qpass.compile`` on a CUDA model: greedy ``generate()`` with a static cache gives the tokens
    of a manual loop over the same compiled forward, prefill and decode reach the backend (two
    graphs: decode compiles once), and every decoder linear runs ``_int_mm``."""
    from tests.test_generate import _greedy_loop

    torch._dynamo.reset()
    model = tiny_model("llama").to(CUDA)
    calib = qpass.calibrate(model, [b.to(CUDA) for b in token_batches(2)])
    ids = token_batches(1, batch=1, seq=24)[0].to(CUDA)
    config = qpass.preset("w8a8_dynamic", smoothing=qpass.Smoothing(alpha=0.5))
    backend = qpass.compile(model, config, calib)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert backend.report.graphs == 2, backend.report.graphs
    assert all(r.kernel == "cuda int8 (_int_mm)" for p, r in backend.report.rows.items() if p != "lm_head")
    torch.testing.assert_close(out, _greedy_loop(model, ids, 4), rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["w8a8_dynamic", "w8a8_static", "fp8_dynamic"])
def test_bf16_model_on_cuda(name):
    """A bf16 model on CUDA through Inductor: bf16 logits, every decoder linear on this GPU's kernel,
    and the error within the fp32 model's bound for the preset plus the bf16 model's own noise."""
    model = tiny_model("llama").to(CUDA, torch.bfloat16)
    calib = qpass.calibrate(model, [b.to(CUDA) for b in token_batches(4)])
    ids = token_batches(1, batch=1, seq=48, seed=7)[0].to(CUDA)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        ref32 = tiny_model("llama").to(CUDA)(ids, use_cache=False).logits
    noise = _rel(ref, ref32)
    out, backend = _run(model, qpass.preset(name), calib, ids)
    assert out.dtype == torch.bfloat16
    assert all(r.kernel.startswith("cuda") for p, r in backend.report.rows.items() if p != "lm_head")
    assert _rel(out, ref) <= 1.25 * BOUNDS[name] + 3 * noise, (_rel(out, ref), noise)


@pytest.mark.parametrize("segments", [(3, 0, 1, 40), (0, 0, 9, 0), (0, 1, 0, 0), (20, 17, 0, 2)])
def test_grouped_int_mm_on_cuda_equals_int64_products(segments):
    """``qpass::grouped_int_mm`` on CUDA (padded: each segment under 17 rows runs as 17, K and N
    padded to multiples of 8 by the weight): int32 products equal to int64 ones on full-range operands."""
    from qpass import kernels

    e, n, k = 4, 23, 37
    g = torch.Generator().manual_seed(sum(segments))
    x = torch.randint(-128, 128, (sum(segments), k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (e, n, k), dtype=torch.int8, generator=g)
    offs = torch.cumsum(torch.tensor(segments), 0).to(torch.int32)
    w_pad = torch.zeros(e, 24, 40, dtype=torch.int8)
    w_pad[:, :n, :k] = w
    y = kernels.grouped_int_mm(x.to(CUDA), offs.to(CUDA), w_pad.to(CUDA), True)[:, :n].cpu()
    ids = qpass.ops.expert_of_rows(x, offs)
    assert torch.equal(y.long(), torch.einsum("rk,rnk->rn", x.long(), w[ids].long()))


@pytest.mark.parametrize("name", ["w8a8_dynamic", "w8a8_static"])
def test_moe_experts_on_cuda_int_mm(name):
    """A Qwen2-MoE on CUDA through Inductor: every fused expert weight on ``_int_mm`` per expert, and
    the logits equal to the CUDA reference path's (the same integers)."""
    model = tiny_model("qwen2_moe").to(CUDA)
    calib = qpass.calibrate(model, [b.to(CUDA) for b in token_batches(4)])
    ids = token_batches(1, batch=1, seq=48, seed=7)[0].to(CUDA)
    ref, _ = _run(model, qpass.preset(name, lower=False), calib, ids)
    lowered, backend = _run(model, qpass.preset(name), calib, ids)
    experts = [p for p, w in model.named_parameters() if w.dim() == 3]
    assert all(backend.report.rows[p].kernel == "cuda int8 (_int_mm per expert)" for p in experts)
    assert _rel(lowered, ref) < 2e-3, _rel(lowered, ref)
