"""The vLLM connector's scheduler and worker sides without vLLM, over kvbm-workers in CUDA mode
(tensors on the GPU, shaped like vLLM's): a store planned and settled into G2, then a load into
poisoned blocks, asynchronous and layer-wise (each layer whole once its wait returns), byte for byte. The CPU twin is
tests/integration/test_connector_sides.py; both use tests/support/connector_sides.py.
Needs pyzmq and msgpack (no vLLM, no hypothesis)."""
from __future__ import annotations

import pytest

import kvbm
from tests.support.connector_sides import check_store_then_load

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not kvbm.cuda_available(), reason="needs CUDA: kvbm.cuda_available() is False")]


@pytest.mark.parametrize("layerwise", [False, True], ids=["async", "layerwise"])
@pytest.mark.parametrize("kind", ["layer", "cross"])
def test_store_then_load_through_both_sides(tmp_path, kind, layerwise):
    check_store_then_load(tmp_path, "cuda", kind, layerwise)
