import pytest
import torch

from tests.models import tiny_model  # noqa: F401  (re-exported for tests)


@pytest.fixture(autouse=True)
def _cpu_int8_kernels(request, monkeypatch):
    """Where ``torch._int_mm`` is exact (VNNI / AMX) qpass lowers int8 linears to it; without VNNI to
    oneDNN / FBGEMM on 7-bit grids. So that the oneDNN / FBGEMM tests (grids, fusion, packing,
    snapshots) run the same kernels on both CPU kinds, tests use those unless marked ``int_mm``
    (tests/test_int_mm.py and the real-model checks, which measure the default path)."""
    if request.node.get_closest_marker("int_mm") is None:
        from qpass.passes import lower

        monkeypatch.setattr(lower, "_probed_int_mm", lambda: False)
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no Dynamo cache, no FX graph cache hit that skips our passes."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False, fx_graph_remote_cache=False):
        yield
    torch._dynamo.reset()
