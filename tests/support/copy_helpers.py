"""Shared by tests/unit/test_copy.py and tests/gpu/test_copy_gpu.py: build KV buffers in every layout,
fill them with random bytes, poison destinations, copy through the path workers' Copier, and read one
(block, layer, outer) region back.

Layout kinds (each one a kvbm.layout.BlockLayout, whose region_layout is the only native description):
  "fc"        one [num_blocks, num_layers, outer, region] tensor (G2, or a fully contiguous engine)
  "outer"     per-layer [outer, num_blocks, page, inner] tensors (vLLM)
  "block"     per-layer [num_blocks, outer, page, inner] tensors
Kept free of hypothesis/pyzmq: the GPU machine has neither.
"""
from __future__ import annotations

import numpy as np
import torch

from kvbm.layout import BlockLayout, InnerOrder, LayoutConfig, LayoutType, dtype_name
from kvbm.workers.copy import Copier

POISON = 0xA5
KINDS = ("fc", "outer", "block")
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)


def region_shape(region_bytes: int, dtype: torch.dtype) -> tuple[int, int]:
    elems = region_bytes // torch.empty((), dtype=dtype).element_size()
    page = 16 if elems % 16 == 0 else 1
    return page, elems // page


def block_layout(kind: str, num_layers: int, outer_dim: int, num_blocks: int, region_bytes: int,
                 dtype: torch.dtype) -> BlockLayout:
    """The BlockLayout of a `kind` buffer set (the shapes make_buffers gives)."""
    page, inner = region_shape(region_bytes, dtype)
    config = LayoutConfig(num_layers, outer_dim, page, inner, dtype_name(dtype))
    if kind == "fc":
        return BlockLayout(config, LayoutType.FULLY_CONTIGUOUS, num_blocks)
    if kind not in ("outer", "block"):
        raise ValueError(kind)
    order = InnerOrder.OUTER_MAJOR if kind == "outer" else InnerOrder.BLOCK_MAJOR
    return BlockLayout(config, LayoutType.LAYER_SEPARATE, num_blocks, order)


def ptrs_of(tensors) -> list[int]:
    """Buffer addresses, one per layout buffer (one tensor, or one per layer)."""
    return [tensors.data_ptr()] if isinstance(tensors, torch.Tensor) else [t.data_ptr() for t in tensors]


def native_layout(tensors, layout: BlockLayout):
    """The native RegionLayout of these buffers, for tests of the kvbm_*_copy_blocks entry points."""
    return layout.region_layout(ptrs_of(tensors))


def copier(src, src_layout: BlockLayout, dst, dst_layout: BlockLayout, *, cuda: bool = False,
           **kwargs) -> Copier:
    """The path workers' Copier from src's buffers to dst's (the caller keeps the tensors alive)."""
    return Copier(src_layout, ptrs_of(src), dst_layout, ptrs_of(dst), cuda, **kwargs)


def split(pairs) -> tuple[np.ndarray, np.ndarray]:
    """(source blocks, destination blocks) of (source, destination) pairs, as a worker gets them."""
    return (np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.int64))


def make_buffers(kind: str, num_layers: int, outer_dim: int, num_blocks: int, region_bytes: int,
                 dtype: torch.dtype, device: str = "cpu", pin: bool = False, fill: str = "random",
                 gen: torch.Generator | None = None):
    """(tensors, BlockLayout); tensors is a list (per layer) or one tensor (fc)."""
    layout = block_layout(kind, num_layers, outer_dim, num_blocks, region_bytes, dtype)
    page, inner = region_shape(region_bytes, dtype)
    if kind == "fc":
        shapes = [(num_blocks, num_layers, outer_dim, page * inner)]
    elif kind == "outer":
        shapes = [(outer_dim, num_blocks, page, inner)] * num_layers
    else:
        shapes = [(num_blocks, outer_dim, page, inner)] * num_layers
    es = torch.empty((), dtype=dtype).element_size()
    tensors = []
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        raw = torch.empty(numel * es, dtype=torch.uint8, pin_memory=pin) if device == "cpu" else \
            torch.empty(numel * es, dtype=torch.uint8, device=device)
        if fill == "random":
            src = torch.randint(0, 256, (numel * es,), dtype=torch.uint8, generator=gen)
            raw.copy_(src)
        else:
            raw.fill_(POISON)
        tensors.append(raw.view(dtype).view(shape))
    if device != "cpu":
        torch.cuda.synchronize()  # copies run on other streams: the fill must be done first
    return (tensors[0] if kind == "fc" else tensors), layout


def region_bytes_of(kind: str, tensors, block: int, layer: int, outer: int) -> torch.Tensor:
    """The region's bytes as a flat uint8 CPU tensor."""
    if kind == "fc":
        t = tensors[block, layer, outer]
    elif kind == "outer":
        t = tensors[layer][outer, block]
    else:
        t = tensors[layer][block, outer]
    return t.contiguous().view(torch.uint8).flatten().cpu()


def block_bytes(kind: str, tensors, block: int, num_layers: int, outer_dim: int) -> torch.Tensor:
    return torch.cat([region_bytes_of(kind, tensors, block, l, o)
                      for l in range(num_layers) for o in range(outer_dim)])


def assert_copied(src_kind, src, dst_kind, dst, pairs, num_layers, outer_dim, dst_blocks_total):
    """Every pair's regions equal byte for byte; every other destination block still poisoned."""
    written = {d for _, d in pairs}
    for s, d in pairs:
        a = block_bytes(src_kind, src, s, num_layers, outer_dim)
        b = block_bytes(dst_kind, dst, d, num_layers, outer_dim)
        if not torch.equal(a, b):
            bad = int((a != b).nonzero()[0])
            raise AssertionError(f"pair ({s} -> {d}): first differing byte {bad} of {a.numel()}")
    for d in range(dst_blocks_total):
        if d in written:
            continue
        b = block_bytes(dst_kind, dst, d, num_layers, outer_dim)
        if not bool((b == POISON).all()):
            raise AssertionError(f"destination block {d} was not in the copy but changed")


def random_pairs(gen: torch.Generator, n: int, src_blocks: int, dst_blocks: int):
    s = torch.randperm(src_blocks, generator=gen)[:n].tolist()
    d = torch.randperm(dst_blocks, generator=gen)[:n].tolist()
    return list(zip(s, d))
