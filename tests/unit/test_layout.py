"""Layouts: golden offsets for every layout type, views over real tensors, detection, bad input."""
from __future__ import annotations

import pytest
import torch

from kvbm._fast import native
from kvbm.errors import LayoutError
from kvbm.layout import BlockLayout, InnerOrder, LayoutConfig, LayoutType, detect_layout

CFG = LayoutConfig(num_layers=3, outer_dim=2, page_size=4, inner_dim=8, dtype="float16")  # region 64 B


def test_config_sizes():
    assert CFG.itemsize == 2
    assert CFG.region_bytes == 4 * 8 * 2 == 64
    assert CFG.block_bytes == 3 * 2 * 64 == 384
    assert LayoutConfig(3, 2, 4, 8, "float16", alignment=4096).block_stride == 4096


def test_golden_offsets_fully_contiguous():
    lay = BlockLayout(CFG, LayoutType.FULLY_CONTIGUOUS, num_blocks=5)
    assert lay.region(0, 0, 0) == (0, 0, 64)
    assert lay.region(0, 0, 1) == (0, 64, 64)
    assert lay.region(0, 1, 0) == (0, 128, 64)
    assert lay.region(2, 1, 1) == (0, 2 * 384 + 128 + 64, 64)
    assert lay.total_bytes == 5 * 384


def test_golden_offsets_fully_contiguous_aligned():
    lay = BlockLayout(LayoutConfig(3, 2, 4, 8, "float16", alignment=512), LayoutType.FULLY_CONTIGUOUS, 4)
    assert lay.block_stride == 512
    assert lay.region(3, 2, 1) == (0, 3 * 512 + 2 * 128 + 64, 64)


def test_golden_offsets_layer_separate_outer_major():
    lay = BlockLayout(CFG, LayoutType.LAYER_SEPARATE, num_blocks=5, order=InnerOrder.OUTER_MAJOR)
    assert lay.region(0, 2, 0) == (2, 0, 64)
    assert lay.region(3, 1, 0) == (1, 3 * 64, 64)
    assert lay.region(3, 1, 1) == (1, 5 * 64 + 3 * 64, 64)
    assert lay.layer_bytes == 5 * 2 * 64


def test_golden_offsets_layer_separate_block_major():
    lay = BlockLayout(CFG, LayoutType.LAYER_SEPARATE, num_blocks=5, order=InnerOrder.BLOCK_MAJOR)
    assert lay.region(3, 1, 0) == (1, 3 * 128, 64)
    assert lay.region(3, 1, 1) == (1, 3 * 128 + 64, 64)


@pytest.mark.parametrize("layout_type, order", [
    (LayoutType.FULLY_CONTIGUOUS, InnerOrder.OUTER_MAJOR),
    (LayoutType.LAYER_SEPARATE, InnerOrder.OUTER_MAJOR),
    (LayoutType.LAYER_SEPARATE, InnerOrder.BLOCK_MAJOR),
])
def test_native_region_address_matches_python_offsets(layout_type, order):
    lay = BlockLayout(CFG, layout_type, 5, order)
    bufs = lay.allocate()
    native_layout = lay.region_layout([b.data_ptr() for b in bufs])
    for block in range(5):
        for layer in range(3):
            for outer in range(2):
                index, offset, _ = lay.region(block, layer, outer)
                assert native_layout.region_address(block, layer, outer) == bufs[index].data_ptr() + offset


@pytest.mark.parametrize("layout_type, order", [
    (LayoutType.FULLY_CONTIGUOUS, InnerOrder.OUTER_MAJOR),
    (LayoutType.LAYER_SEPARATE, InnerOrder.OUTER_MAJOR),
    (LayoutType.LAYER_SEPARATE, InnerOrder.BLOCK_MAJOR),
])
def test_region_layout_of_one_layer_or_a_range(layout_type, order):
    lay = BlockLayout(CFG, layout_type, 5, order)
    bufs = lay.allocate()
    ptrs = [b.data_ptr() for b in bufs]
    for layers in (1, slice(1, 3), range(0, 2), range(2, 3)):
        picked = ([layers] if isinstance(layers, int)
                  else list(range(3)[layers] if isinstance(layers, slice) else layers))
        part = lay.region_layout(ptrs, layers)
        assert (part.num_layers, part.outer_dim, part.num_blocks, part.region_bytes) == (len(picked), 2, 5, 64)
        for i, layer in enumerate(picked):
            for block in range(5):
                for outer in range(2):
                    index, offset, _ = lay.region(block, layer, outer)
                    assert part.region_address(block, i, outer) == ptrs[index] + offset
    for bad in (3, -1, slice(3, 5), range(2, 4), range(0)):
        with pytest.raises(LayoutError, match="outside the 3 layers"):
            lay.region_layout(ptrs, bad)


def test_buffer_bytes_is_what_each_buffer_holds():
    full = BlockLayout(LayoutConfig(3, 2, 4, 8, "float16", alignment=512), LayoutType.FULLY_CONTIGUOUS, 4)
    assert full.buffer_bytes == full.total_bytes == 4 * 512
    separate = BlockLayout(CFG, LayoutType.LAYER_SEPARATE, 5)
    assert separate.buffer_bytes == separate.layer_bytes == 5 * 2 * 64
    assert [b.numel() for b in separate.allocate()] == [5 * 2 * 64] * 3


def test_views_cover_the_tensor_exactly_once():
    lay = BlockLayout(CFG, LayoutType.LAYER_SEPARATE, 5, InnerOrder.OUTER_MAJOR)
    bufs = lay.allocate()
    for b in bufs:
        b.zero_()
    for block in range(5):
        for layer_views in lay.block_views(bufs, block):
            for view in layer_views:
                assert view.shape == (4, 8) and view.dtype == torch.float16
                view.view(torch.int16).add_(1)
    assert all(bool((b.view(torch.int16) == 1).all()) for b in bufs)


def test_detect_vllm_layer_tensors():
    tensors = [torch.zeros(2, 7, 16, 4, 32, dtype=torch.bfloat16) for _ in range(5)]
    lay = detect_layout(tensors)
    assert lay.layout_type is LayoutType.LAYER_SEPARATE and lay.order is InnerOrder.OUTER_MAJOR
    assert (lay.num_blocks, lay.config.num_layers, lay.config.outer_dim) == (7, 5, 2)
    assert (lay.config.page_size, lay.config.inner_dim, lay.config.dtype) == (16, 128, "bfloat16")
    # The view of (block 3, layer 2, V) is vLLM's tensors[2][1, 3].
    tensors[2][1, 3].fill_(1.5)
    assert bool((lay.region_view(tensors, 3, 2, 1) == 1.5).all())
    assert float(lay.region_view(tensors, 3, 2, 0).abs().sum()) == 0.0


def test_detect_block_major_mla_and_fully_contiguous():
    lay = detect_layout([torch.zeros(7, 2, 16, 4, 32, dtype=torch.float16) for _ in range(2)])
    assert lay.order is InnerOrder.BLOCK_MAJOR and lay.num_blocks == 7
    mla = detect_layout([torch.zeros(9, 16, 576, dtype=torch.bfloat16) for _ in range(3)])
    assert (mla.config.outer_dim, mla.num_blocks, mla.config.inner_dim) == (1, 9, 576)
    full = detect_layout(torch.zeros(6, 4, 2, 16, 8, 64, dtype=torch.float8_e4m3fn))
    assert full.layout_type is LayoutType.FULLY_CONTIGUOUS
    assert ((full.num_blocks, full.config.num_layers, full.config.inner_dim, full.config.dtype)
            == (6, 4, 512, "float8_e4m3fn"))


def test_ambiguous_two_blocks_defaults_to_vllm_order_unless_told():
    tensors = [torch.zeros(2, 2, 16, 4, 8, dtype=torch.float16)]
    assert detect_layout(tensors).order is InnerOrder.OUTER_MAJOR
    assert detect_layout(tensors, order=InnerOrder.BLOCK_MAJOR).order is InnerOrder.BLOCK_MAJOR


@pytest.mark.parametrize("tensors, message", [
    ([torch.zeros(3, 7, 16, 4, 32)], "not understood"),
    ([torch.zeros(2, 7, 16, 4, 32), torch.zeros(2, 8, 16, 4, 32)], "like layer 0"),
    ([torch.zeros(2, 7, 16, 4, 32), torch.zeros(2, 7, 16, 4, 32, dtype=torch.float16)], "like layer 0"),
    ([torch.zeros(2, 7, 16, 4, 32, dtype=torch.float64)], "unsupported KV dtype"),
    ([torch.zeros(7, 2, 16, 4, 32).transpose(0, 1)], "not contiguous"),
    ([], "non-empty"),
    (torch.zeros(6, 4, 3, 16, 8), "not understood"),
])
def test_detect_rejects_what_it_does_not_understand(tensors, message):
    with pytest.raises(LayoutError, match=message):
        detect_layout(tensors)


def test_detect_checks_page_size_order_and_alignment():
    tensors = [torch.zeros(2, 7, 16, 4, 32, dtype=torch.float16)]
    with pytest.raises(LayoutError, match="page_size 32"):
        detect_layout(tensors, page_size=32)
    with pytest.raises(LayoutError, match="BLOCK_MAJOR asked for"):
        detect_layout(tensors, order=InnerOrder.BLOCK_MAJOR)
    misaligned = torch.zeros(2 * 7 * 16 * 4 * 32 + 1, dtype=torch.float16)[1:].view(2, 7, 16, 4, 32)
    with pytest.raises(LayoutError, match="not aligned to 256"):
        detect_layout([misaligned], alignment=256)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_layers=0), "num_layers"),
    (dict(outer_dim=3), "outer_dim"),
    (dict(page_size=-1), "page_size"),
    (dict(inner_dim=1.5), "inner_dim"),
    (dict(dtype="float64"), "unsupported KV dtype"),
    (dict(alignment=3), "power of two"),
])
def test_layout_config_rejects_bad_values(kwargs, message):
    base = dict(num_layers=2, outer_dim=2, page_size=16, inner_dim=64, dtype="bfloat16")
    with pytest.raises(LayoutError, match=message):
        LayoutConfig(**{**base, **kwargs})


def test_region_out_of_range_and_buffer_count():
    lay = BlockLayout(CFG, LayoutType.LAYER_SEPARATE, 5)
    with pytest.raises(LayoutError, match="outside 5 blocks"):
        lay.region(5, 0, 0)
    with pytest.raises(LayoutError, match="needs 3 buffer"):
        lay.region_layout([1234])
    with pytest.raises(LayoutError, match="num_blocks"):
        BlockLayout(CFG, LayoutType.LAYER_SEPARATE, 0)
    native_layout = lay.region_layout([4096, 8192, 12288])
    with pytest.raises(LayoutError, match="outside"):
        native_layout.region_address(0, 3, 0)


def test_config_round_trips_through_a_dict():
    assert LayoutConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(LayoutError, match="lacks 'dtype'"):
        LayoutConfig.from_dict({k: v for k, v in CFG.to_dict().items() if k != "dtype"})
    with pytest.raises(LayoutError):
        native.RegionLayout([], 2, 1, 1, 1, 1)
