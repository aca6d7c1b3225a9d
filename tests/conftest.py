import os

# One intra-op thread per test process (and per subprocess a test starts; `-n 2` runs two processes).
# The tests' models are tiny: their thousands of small ops gain nothing from a second thread, and on a
# busy 2-core machine every op's OpenMP barrier waits for a core (measured under load 7: tests/test_quantize.py
# 153 s at one thread against 316 s at two).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.models import tiny_model  # noqa: F401  (re-exported for tests)


def _int_mm_off() -> bool:
    return False


def pytest_configure(config):
    """Where ``torch._int_mm`` is exact (VNNI / AMX) qpass lowers int8 linears to it; without VNNI to
    oneDNN / FBGEMM on 7-bit grids. So that the oneDNN / FBGEMM tests (grids, fusion, packing,
    snapshots, and the module-scoped runs they compare with) run the same kernels on both CPU kinds,
    the session starts with the ``_int_mm`` probe answering "no"; tests marked ``int_mm``
    (tests/test_int_mm.py, the real-model lowered check) get the real probe: the default path."""
    from qpass.passes import lower

    torch.set_num_threads(1)  # torch may have been imported before this file (a plugin)
    global _REAL_PROBE
    _REAL_PROBE = lower._probed_int_mm
    lower._probed_int_mm = _int_mm_off


@pytest.fixture(autouse=True)
def _cpu_int8_kernels(request):
    if request.node.get_closest_marker("int_mm") is None:
        yield
        return
    from qpass.passes import lower

    lower._probed_int_mm = _REAL_PROBE
    try:
        yield
    finally:
        lower._probed_int_mm = _int_mm_off


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no Dynamo cache, no FX graph cache hit that skips our passes."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False, fx_graph_remote_cache=False):
        yield
    torch._dynamo.reset()
