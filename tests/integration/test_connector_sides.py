"""The vLLM connector's scheduler and worker sides without vLLM, over kvbm-workers in CPU mode:
a store planned and settled into G2, then a load into poisoned blocks, asynchronous and layer-wise
(each layer whole once its wait returns), byte for byte. The CUDA twin is
tests/gpu/test_connector_sides_gpu.py; both use tests/support/connector_sides.py."""
from __future__ import annotations

import pytest

from tests.support.connector_sides import check_store_then_load


@pytest.mark.parametrize("layerwise", [False, True], ids=["async", "layerwise"])
@pytest.mark.parametrize("kind", ["layer", "cross"])
def test_store_then_load_through_both_sides(tmp_path, kind, layerwise):
    check_store_then_load(tmp_path, "cpu", kind, layerwise)
