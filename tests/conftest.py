import pytest
import torch

from tests.models import tiny_model  # noqa: F401  (re-exported for tests)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no Dynamo cache, no FX graph cache hit that skips our passes."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False, fx_graph_remote_cache=False):
        yield
    torch._dynamo.reset()
