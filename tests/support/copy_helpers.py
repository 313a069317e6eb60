"""Shared by tests/unit/test_copy.py and tests/gpu/test_copy_gpu.py: build KV buffers in every layout,
fill them with random bytes, poison destinations, and read one (block, layer, outer) region back.

Layout kinds:
  "fc"        one [num_blocks, num_layers, outer, region] tensor (G2, or a fully contiguous engine)
  "outer"     per-layer [outer, num_blocks, page, inner] tensors (vLLM)
  "block"     per-layer [num_blocks, outer, page, inner] tensors
Kept free of hypothesis/pyzmq: the GPU machine has neither.
"""
from __future__ import annotations

import torch

from kvbm.copy import fully_contiguous_layout, layer_separate_layout

POISON = 0xA5
KINDS = ("fc", "outer", "block")
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)


def region_shape(region_bytes: int, dtype: torch.dtype) -> tuple[int, int]:
    elems = region_bytes // torch.empty((), dtype=dtype).element_size()
    page = 16 if elems % 16 == 0 else 1
    return page, elems // page


def make_buffers(kind: str, num_layers: int, outer_dim: int, num_blocks: int, region_bytes: int,
                 dtype: torch.dtype, device: str = "cpu", pin: bool = False, fill: str = "random",
                 gen: torch.Generator | None = None):
    """(tensors, RegionLayout); tensors is a list (per layer) or one tensor (fc)."""
    page, inner = region_shape(region_bytes, dtype)
    if kind == "fc":
        shapes = [(num_blocks, num_layers, outer_dim, page * inner)]
    elif kind == "outer":
        shapes = [(outer_dim, num_blocks, page, inner)] * num_layers
    elif kind == "block":
        shapes = [(num_blocks, outer_dim, page, inner)] * num_layers
    else:
        raise ValueError(kind)
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
    if kind == "fc":
        return tensors[0], fully_contiguous_layout(tensors[0], num_layers, outer_dim)
    return tensors, layer_separate_layout(tensors, outer_dim, block_major=(kind == "block"))


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
