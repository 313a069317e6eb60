"""CPU block copy (kvbm_cpu_copy_blocks through kvbm._fast.native and kvbm.copy): byte-exact round
trips G1 -> G2 -> G1 for every layout, dtype (as raw bytes), outer_dim and region size, with
destinations poisoned first and untouched blocks checked; bad input raises LayoutError with numbers."""
from __future__ import annotations

import pytest
import torch

from kvbm._fast import native
from kvbm.copy import BlockCopier, fully_contiguous_layout, layer_separate_layout
from kvbm.errors import LayoutError
from tests.support.copy_helpers import DTYPES, KINDS, assert_copied, make_buffers, random_pairs

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
    native.copy_blocks_cpu(dev_lay, host_lay, [p[0] for p in pairs], [p[1] for p in pairs])
    assert_copied(kind, dev, "fc", host, pairs, NUM_LAYERS, outer_dim, nb_host)

    back, back_lay = make_buffers(kind, NUM_LAYERS, outer_dim, nb_dev, region, dtype, fill="poison")
    onboard = [(h, int(d)) for (_, h), d in zip(pairs, torch.randperm(nb_dev, generator=gen)[:n])]
    native.copy_blocks_cpu(host_lay, back_lay, [p[0] for p in onboard], [p[1] for p in onboard],
                           num_threads=2)
    assert_copied("fc", host, kind, back, onboard, NUM_LAYERS, outer_dim, nb_dev)


@pytest.mark.parametrize("kind", KINDS)
def test_two_mib_regions(kind):
    gen = torch.Generator().manual_seed(7)
    region = 2 << 20
    dev, dev_lay = make_buffers(kind, 2, 2, 3, region, torch.bfloat16, gen=gen)
    host, host_lay = make_buffers("fc", 2, 2, 3, region, torch.bfloat16, fill="poison")
    pairs = [(2, 0), (0, 2)]
    native.copy_blocks_cpu(dev_lay, host_lay, [2, 0], [0, 2], num_threads=4)
    assert_copied(kind, dev, "fc", host, pairs, 2, 2, 3)


def test_block_copier_cpu_mode():
    gen = torch.Generator().manual_seed(3)
    dev, _ = make_buffers("outer", 4, 2, 10, 8192, torch.float16, gen=gen)
    host, _ = make_buffers("fc", 4, 2, 6, 8192, torch.float16, fill="poison")
    copier = BlockCopier.from_tensors(dev, host, num_layers=4, outer_dim=2)
    assert not copier.use_cuda
    h = copier.offload([9, 0, 4], [5, 1, 2])
    assert h.done() and h.bytes == 3 * 4 * 2 * 8192
    h.wait()
    assert_copied("outer", dev, "fc", host, [(9, 5), (0, 1), (4, 2)], 4, 2, 6)
    back, _ = make_buffers("outer", 4, 2, 10, 8192, torch.float16, fill="poison")
    copier2 = BlockCopier.from_tensors(back, host, num_layers=4, outer_dim=2)
    copier2.onboard([5, 1, 2], [3, 8, 6]).wait()
    assert_copied("fc", host, "outer", back, [(5, 3), (1, 8), (2, 6)], 4, 2, 10)


def test_fully_contiguous_engine_and_mla():
    gen = torch.Generator().manual_seed(4)
    dev = torch.randint(0, 256, (6, 2, 1, 4096), dtype=torch.uint8, generator=gen)
    host = torch.full((4, 2, 1, 4096), 0xA5, dtype=torch.uint8)
    copier = BlockCopier.from_tensors(dev, host, num_layers=2, outer_dim=1)
    copier.offload([5, 2], [0, 3]).wait()
    assert_copied("fc", dev, "fc", host, [(5, 0), (2, 3)], 2, 1, 4)
    # MLA layer tensors without an outer dim: [num_blocks, page, dim]
    mla = [torch.randint(0, 256, (5, 16, 64), dtype=torch.uint8, generator=gen) for _ in range(2)]
    lay = layer_separate_layout(mla, 1)
    assert (lay.num_blocks, lay.outer_dim, lay.region_bytes) == (5, 1, 1024)
    assert lay.region_address(3, 1, 0) == mla[1][3].data_ptr()


def test_layout_addresses_match_tensors():
    dev, lay = make_buffers("outer", 2, 2, 5, 4096, torch.bfloat16, fill="poison")
    assert lay.region_address(3, 1, 1) == dev[1][1, 3].data_ptr()
    dev, lay = make_buffers("block", 2, 2, 5, 4096, torch.bfloat16, fill="poison")
    assert lay.region_address(3, 1, 1) == dev[1][3, 1].data_ptr()
    host, lay = make_buffers("fc", 2, 2, 5, 4096, torch.bfloat16, fill="poison")
    assert lay.region_address(4, 1, 0) == host[4, 1, 0].data_ptr()


def _pair():
    _, a = make_buffers("outer", 2, 2, 4, 4096, torch.float16, fill="poison")
    _, b = make_buffers("fc", 2, 2, 4, 4096, torch.float16, fill="poison")
    return a, b


@pytest.mark.parametrize("other,needle", [
    (("fc", 3, 2, 4, 4096), "2 layers x 2 outer x 4096 bytes, destination 3 x 2 x 4096"),
    (("fc", 2, 1, 4, 4096), "destination 2 x 1 x 4096"),
    (("fc", 2, 2, 4, 8192), "destination 2 x 2 x 8192"),
])
def test_mismatched_layouts(other, needle):
    a, _ = _pair()
    kind, L, O, nb, region = other
    _, b = make_buffers(kind, L, O, nb, region, torch.float16, fill="poison")
    with pytest.raises(LayoutError, match="layouts disagree") as err:
        native.copy_blocks_cpu(a, b, [0], [0])
    assert needle in str(err.value)


def test_out_of_range_and_negative_blocks():
    a, b = _pair()
    with pytest.raises(LayoutError, match=r"source block 4 \(pair 1\) outside \[0, 4\)"):
        native.copy_blocks_cpu(a, b, [0, 4], [0, 1])
    with pytest.raises(LayoutError, match=r"destination block 9 \(pair 0\) outside \[0, 4\)"):
        native.copy_blocks_cpu(a, b, [0], [9])
    with pytest.raises(LayoutError, match=r"source block -1 \(pair 0\) outside \[0, 4\)"):
        native.copy_blocks_cpu(a, b, [-1], [0])


def test_unequal_lists():
    a, b = _pair()
    with pytest.raises(LayoutError, match=r"equally long, got \(2,\) and \(3,\)"):
        native.copy_blocks_cpu(a, b, [0, 1], [0, 1, 2])


def test_bad_tensors():
    with pytest.raises(LayoutError, match="does not split into 3 layers x 2 outer"):
        fully_contiguous_layout(torch.empty(4, 100, dtype=torch.uint8), 3, 2)
    t = torch.empty(2, 4, 16, 8)[:, :, :, :4]
    with pytest.raises(LayoutError, match="not contiguous"):
        layer_separate_layout([t], 2)
    with pytest.raises(LayoutError, match="expected outer_dim 2"):
        layer_separate_layout([torch.empty(3, 4, 16, 8)], 2)
    with pytest.raises(LayoutError, match="differs from layer 0"):
        layer_separate_layout([torch.empty(2, 4, 16, 8), torch.empty(2, 5, 16, 8)], 2)
    with pytest.raises(LayoutError, match="num_layers 2"):
        BlockCopier.from_tensors([torch.empty(2, 4, 16, 8)], torch.empty(4, 2, 2, 128),
                                 num_layers=2, outer_dim=2)


def test_cuda_entry_points_in_cpu_build():
    if native.build_kind() != "cpu" or native.cuda_available():
        pytest.skip("CPU build only")
    a, b = _pair()
    from kvbm.errors import CudaError
    with pytest.raises(CudaError, match="built without CUDA"):
        native.copy_blocks_cuda(a, b, [0], [0])
    with pytest.raises(CudaError, match="built without CUDA"):
        native.cuda_stream_create()
    for call in (native.cuda_stream_destroy, native.cuda_stream_synchronize, native.cuda_event_destroy,
                 native.cuda_event_synchronize, native.cuda_host_unregister,
                 lambda h: native.cuda_event_record(h, 0), lambda h: native.cuda_stream_wait_event(0, h)):
        with pytest.raises(CudaError, match="built without CUDA"):
            call(1)


def test_layouts_whose_offsets_overflow_are_refused_before_any_copy():
    ok = native.RegionLayout([4096], 2, 4, 8192, 4096, 4096)
    huge = native.RegionLayout([4096], 2, 2**40, 2**30, 4096, 4096)       # 2^70 bytes of blocks
    with pytest.raises(LayoutError, match="overflow a 64-bit offset"):
        native.copy_blocks_cpu(huge, ok, [0], [0])
    wraps = native.RegionLayout([2**64 - 4096], 2, 4, 8192, 4096, 4096)   # base + span wraps
    with pytest.raises(LayoutError, match="wraps"):
        native.copy_blocks_cpu(ok, wraps, [0], [0])
