"""Mixture-of-experts models: routers, fused expert weights, grouped matmuls."""

import logging

import pytest
import torch

import qpass
from tests.models import MOE_ARCHS, tiny_model, token_batches

ROUTER = "router: kept in full precision"
# w8a8_static at a fixed alpha: the searches are not the point here
STATIC = qpass.preset("w8a8_static").replace(smoothing=qpass.Smoothing(0.5), dynamic_fallback=None, lower=False)


def _rel(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def _compile(model, config, calib, ids, **kwargs):
    backend = qpass.backend(config, calibration=calib, inductor=False, **kwargs)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, dynamic=False)(ids, use_cache=False).logits
    return out, backend


def _expert_params(model):
    return [n for n, p in model.named_parameters() if p.dim() == 3]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_router_full_precision_and_every_expert_weight_reported(arch, caplog):
    """w8a8_static runs (the router needs no static scale: it is never quantized); every fused
    expert weight has a report row; the router's row says why it stays fp32."""
    model = tiny_model(arch)
    calib = qpass.calibrate(model, token_batches(2))
    ids = token_batches(1, seed=7)[0]
    with caplog.at_level(logging.WARNING):
        _, backend = _compile(model, STATIC, calib, ids)
    rows = backend.report.rows
    routers = [p for p in rows if p.endswith("mlp.gate")]
    assert routers and all(rows[p].weight == "fp32 (router)" and ROUTER in rows[p].reason for p in routers)
    experts = _expert_params(model)
    assert experts and all(p in rows and rows[p].weight for p in experts)
    # a quantized linear next to it, for contrast
    assert rows["model.layers.1.self_attn.o_proj"].weight.startswith("int8")


@pytest.mark.parametrize("impl, op", [("batched_mm", "getitem"), ("eager", None)])
def test_experts_outside_grouped_mm_stay_fp32_with_one_warning(impl, op, caplog):
    model = tiny_model("qwen2_moe")
    model.config._experts_implementation = impl
    calib = qpass.calibrate(model, token_batches(2))
    ids = token_batches(1, seed=7)[0]
    with caplog.at_level(logging.WARNING):
        backend = qpass.compile(model, "w8a8_dynamic", calib, inductor=False, dynamic=False)
        with torch.no_grad():
            model(ids, use_cache=False)
    del model.forward
    experts = _expert_params(model)
    warnings = [r.getMessage() for r in caplog.records if "expert weight tensors" in r.getMessage()]
    assert len(warnings) == 1 and all(p in warnings[0] for p in experts), warnings
    for p in experts:
        row = backend.report.rows[p]
        assert row.weight.startswith("fp32")
        assert (f"read by {op}" if op else "_experts_implementation='eager'") in row.reason
