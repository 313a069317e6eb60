"""CPU block copy (kvbm_cpu_copy_blocks through the path workers' Copier, and kvbm._fast.native
directly): byte-exact round trips G1 -> G2 -> G1 for every layout, dtype (as raw bytes), outer_dim
and region size, whole and layer by layer, with destinations poisoned first and untouched blocks
checked; bad input raises LayoutError with numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvbm._fast import native
from kvbm.errors import LayoutError
from kvbm.layout import BlockLayout, LayoutType, detect_layout
from kvbm.workers.copy import Copier
from tests.support.copy_helpers import (
    DTYPES,
    KINDS,
    assert_copied,
    block_layout,
    copier,
    make_buffers,
    native_layout,
    ptrs_of,
    random_pairs,
    split,
)

NUM_LAYERS = 3


@pytest.mark.parametrize("region", [4096, 16384, 65536])
@pytest.mark.parametrize("outer_dim", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind, dtype, outer_dim, region):
    gen = torch.Generator().manual_seed(hash((kind, str(dtype), outer_dim, region)) & 0xFFFF)
    nb_dev, nb_host, n = 9, 7, 5
    dev, dev_lay = make_buffers(kind, NUM_LAYERS, outer_dim, nb_dev, region, dtype, gen=gen)
    host, host_lay = make_buffers("fc", NUM_LAYERS, outer_dim, nb_host, region, dtype, fill="poison")
    pairs = random_pairs(gen, n, nb_dev, nb_host)
    moved = copier(dev, dev_lay, host, host_lay).copy(*split(pairs))
    assert moved == n * NUM_LAYERS * outer_dim * region
    assert_copied(kind, dev, "fc", host, pairs, NUM_LAYERS, outer_dim, nb_host)

    back, back_lay = make_buffers(kind, NUM_LAYERS, outer_dim, nb_dev, region, dtype, fill="poison")
    onboard = [(h, int(d)) for (_, h), d in zip(pairs, torch.randperm(nb_dev, generator=gen)[:n])]
    landed: list[int] = []
    copier(host, host_lay, back, back_lay, threads=2).copy(*split(onboard), on_layer=landed.append)
    assert landed == [NUM_LAYERS - 1]  # a small copy: every layer in one group, reported once
    assert_copied("fc", host, kind, back, onboard, NUM_LAYERS, outer_dim, nb_dev)


@pytest.mark.parametrize("kind", KINDS)
def test_two_mib_regions(kind):
    gen = torch.Generator().manual_seed(7)
    region = 2 << 20
    dev, dev_lay = make_buffers(kind, 2, 2, 3, region, torch.bfloat16, gen=gen)
    host, host_lay = make_buffers("fc", 2, 2, 3, region, torch.bfloat16, fill="poison")
    pairs = [(2, 0), (0, 2)]
    landed: list[int] = []
    copier(dev, dev_lay, host, host_lay, threads=4).copy(np.array([2, 0]), np.array([0, 2]),
                                                        on_layer=landed.append)
    assert landed == [0, 1]  # 8 MiB a layer: one copy call and one report per layer
    assert_copied(kind, dev, "fc", host, pairs, 2, 2, 3)


def test_copier_cpu_mode():
    gen = torch.Generator().manual_seed(3)
    dev, dev_lay = make_buffers("outer", 4, 2, 10, 8192, torch.float16, gen=gen)
    host, host_lay = make_buffers("fc", 4, 2, 6, 8192, torch.float16, fill="poison")
    off = copier(dev, dev_lay, host, host_lay)
    assert not off.cuda and off.stream is None
    assert off.copy(np.array([9, 0, 4]), np.array([5, 1, 2])) == 3 * 4 * 2 * 8192
    assert_copied("outer", dev, "fc", host, [(9, 5), (0, 1), (4, 2)], 4, 2, 6)
    back, back_lay = make_buffers("outer", 4, 2, 10, 8192, torch.float16, fill="poison")
    copier(host, host_lay, back, back_lay).copy(np.array([5, 1, 2]), np.array([3, 8, 6]))
    assert_copied("fc", host, "outer", back, [(5, 3), (1, 8), (2, 6)], 4, 2, 10)


def test_fully_contiguous_engine_and_mla():
    gen = torch.Generator().manual_seed(4)
    dev = torch.randint(0, 256, (6, 2, 1, 4096), dtype=torch.uint8, generator=gen)
    host = torch.full((4, 2, 1, 4096), 0xA5, dtype=torch.uint8)
    dev_lay = detect_layout(dev.view(6, 2, 1, 16, 256))  # [blocks, layers, outer, page, inner]
    assert dev_lay.layout_type is LayoutType.FULLY_CONTIGUOUS
    host_lay = BlockLayout(dev_lay.config, LayoutType.FULLY_CONTIGUOUS, 4)
    copier(dev, dev_lay, host, host_lay).copy(np.array([5, 2]), np.array([0, 3]))
    assert_copied("fc", dev, "fc", host, [(5, 0), (2, 3)], 2, 1, 4)
    # MLA layer tensors without an outer dim: [num_blocks, page, dim]
    mla = [torch.randint(0, 256, (5, 16, 64), dtype=torch.uint8, generator=gen) for _ in range(2)]
    mla_lay = detect_layout(mla)
    lay = native_layout(mla, mla_lay)
    assert (lay.num_blocks, lay.outer_dim, lay.region_bytes) == (5, 1, 1024)
    assert lay.region_address(3, 1, 0) == mla[1][3].data_ptr()
    mla_host = torch.full((3, 2, 1, 1024), 0xA5, dtype=torch.uint8)
    copier(mla, mla_lay, mla_host, BlockLayout(mla_lay.config, LayoutType.FULLY_CONTIGUOUS, 3)).copy(
        np.array([4, 1]), np.array([2, 0]))
    for d, h in ((4, 2), (1, 0)):
        for layer in range(2):
            assert torch.equal(mla_host[h, layer, 0], mla[layer][d].flatten())
    assert bool((mla_host[1] == 0xA5).all())


def test_layout_addresses_match_tensors():
    dev, lay = make_buffers("outer", 2, 2, 5, 4096, torch.bfloat16, fill="poison")
    assert native_layout(dev, lay).region_address(3, 1, 1) == dev[1][1, 3].data_ptr()
    dev, lay = make_buffers("block", 2, 2, 5, 4096, torch.bfloat16, fill="poison")
    assert native_layout(dev, lay).region_address(3, 1, 1) == dev[1][3, 1].data_ptr()
    host, lay = make_buffers("fc", 2, 2, 5, 4096, torch.bfloat16, fill="poison")
    assert native_layout(host, lay).region_address(4, 1, 0) == host[4, 1, 0].data_ptr()


def _pair():
    """A 2-layer outer-major device and a fully contiguous host, 4 blocks each: the Copier between
    them, their native layouts, and the tensors (kept alive by the caller)."""
    dev, dev_lay = make_buffers("outer", 2, 2, 4, 4096, torch.float16, fill="poison")
    host, host_lay = make_buffers("fc", 2, 2, 4, 4096, torch.float16, fill="poison")
    return copier(dev, dev_lay, host, host_lay), native_layout(dev, dev_lay), native_layout(host, host_lay), (dev, host)


@pytest.mark.parametrize("other,needle", [
    (("fc", 3, 2, 4, 4096), "2 layers x 2 outer x 4096 bytes, destination 3 x 2 x 4096"),
    (("fc", 2, 1, 4, 4096), "destination 2 x 1 x 4096"),
    (("fc", 2, 2, 4, 8192), "destination 2 x 2 x 8192"),
])
def test_mismatched_layouts(other, needle):
    dev, dev_lay = make_buffers("outer", 2, 2, 4, 4096, torch.float16, fill="poison")
    kind, L, O, nb, region = other
    dst, dst_lay = make_buffers(kind, L, O, nb, region, torch.float16, fill="poison")
    with pytest.raises(LayoutError, match="layouts disagree") as err:
        native.copy_blocks_cpu(native_layout(dev, dev_lay), native_layout(dst, dst_lay), [0], [0])
    assert needle in str(err.value)
    with pytest.raises(LayoutError, match="source and destination layouts disagree"):
        copier(dev, dev_lay, dst, dst_lay)  # refused when the engine registers, before any copy


def test_out_of_range_and_negative_blocks():
    c, _, _, _keep = _pair()
    with pytest.raises(LayoutError, match=r"source block 4 \(pair 1\) outside \[0, 4\)"):
        c.copy(np.array([0, 4]), np.array([0, 1]))
    with pytest.raises(LayoutError, match=r"destination block 9 \(pair 0\) outside \[0, 4\)"):
        c.copy(np.array([0]), np.array([9]))
    with pytest.raises(LayoutError, match=r"source block -1 \(pair 0\) outside \[0, 4\)"):
        c.copy(np.array([-1]), np.array([0]), on_layer=lambda layer: None)


def test_unequal_lists():
    c, _, _, _keep = _pair()
    with pytest.raises(LayoutError, match=r"equally long, got \(2,\) and \(3,\)"):
        c.copy(np.array([0, 1]), np.array([0, 1, 2]))


def test_bad_tensors_and_buffers():
    # What the one detection (kvbm.layout.detect_layout) refuses, and a layout given too few buffers.
    with pytest.raises(LayoutError, match="fully contiguous KV tensor shape .* not understood"):
        detect_layout(torch.empty(4, 100, dtype=torch.uint8))
    t = torch.empty(2, 4, 16, 8)[:, :, :, :4]
    with pytest.raises(LayoutError, match="not contiguous"):
        detect_layout([t])
    with pytest.raises(LayoutError, match=r"per-layer KV tensor shape \(3, 4, 16, 8\) not understood"):
        detect_layout([torch.empty(3, 4, 16, 8)])
    with pytest.raises(LayoutError, match="like layer 0"):
        detect_layout([torch.empty(2, 4, 16, 8), torch.empty(2, 5, 16, 8)])
    two = detect_layout([torch.empty(2, 4, 16, 8)] * 2)
    one = torch.empty(2, 4, 16, 8)
    host = block_layout("fc", 2, 2, 4, two.region_bytes, torch.float32)
    with pytest.raises(LayoutError, match=r"needs 2 buffer\(s\), got 1"):
        Copier(two, ptrs_of([one]), host, [one.data_ptr()], False)
    with pytest.raises(LayoutError, match=r"copy method 7; expected one of \[0, 1, 2, 3, 4\]"):
        Copier(two, ptrs_of([one, one]), host, [one.data_ptr()], False, method=7)


def test_cuda_entry_points_in_cpu_build():
    if native.build_kind() != "cpu" or native.cuda_available():
        pytest.skip("CPU build only")
    _, a, b, _keep = _pair()
    from kvbm.errors import CudaError
    with pytest.raises(CudaError, match="built without CUDA"):
        native.copy_blocks_cuda(a, b, [0], [0])
    with pytest.raises(CudaError, match="built without CUDA"):
        native.cuda_pick_method(a, b, [0], [0])
    with pytest.raises(CudaError, match="built without CUDA"):
        native.cuda_kernel_sms()
    with pytest.raises(CudaError, match="built without CUDA"):
        native.cuda_host_register(4096, 4096)
    with pytest.raises(CudaError, match="built without CUDA"):
        native.cuda_host_unregister(1)
    with pytest.raises(CudaError, match="built without CUDA"):
        native.copy_layers_cuda(a, b, [0], [0], [1] * a.num_layers)
    with pytest.raises(CudaError, match="built without CUDA"):
        a.vouch_uva()
    assert not a.uva_checked


def test_layouts_whose_offsets_overflow_are_refused_before_any_copy():
    ok = native.RegionLayout([4096], 2, 4, 8192, 4096, 4096)
    huge = native.RegionLayout([4096], 2, 2**40, 2**30, 4096, 4096)       # 2^70 bytes of blocks
    with pytest.raises(LayoutError, match="overflow a 64-bit offset"):
        native.copy_blocks_cpu(huge, ok, [0], [0])
    wraps = native.RegionLayout([2**64 - 4096], 2, 4, 8192, 4096, 4096)   # base + span wraps
    with pytest.raises(LayoutError, match="wraps"):
        native.copy_blocks_cpu(ok, wraps, [0], [0])
