"""The vLLM connector's scheduler and worker sides without vLLM, over kvbm-workers in CPU mode:
a store planned and settled into G2, then a load into poisoned blocks, asynchronous and layer-wise
(each layer whole once its wait returns), byte for byte. The CUDA twin is
tests/gpu/test_connector_sides_gpu.py; both use tests/support/connector_sides.py."""
from __future__ import annotations

import pytest

from tests.support.connector_sides import Sides, store_then_load


@pytest.fixture
def sides(tmp_path, request):
    made = []

    def make(kind: str) -> Sides:
        made.append(Sides(tmp_path / f"s{len(made)}", "cpu", kind))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("layerwise", [False, True], ids=["async", "layerwise"])
@pytest.mark.parametrize("kind", ["layer", "cross"])
def test_store_then_load_through_both_sides(sides, kind, layerwise):
    out = store_then_load(sides(kind), layerwise)
    assert out["got"] == out["want"] and not out["failed"]
    assert out["recving"] == (set() if layerwise else {"B"})   # only an asynchronous load is "received"
    assert out["active"] == 0 and out["loaded"] == 4            # the G2 blocks are released once loaded
    if layerwise and kind == "layer":
        assert out["layers_ok"] == [True, True, True]
