"""KV block layouts: where the bytes of (block, layer, outer) live, in the engine's tensors and in G2/G3.

Parts:
  LayoutConfig   model dims (layers, outer K/V dim, page tokens, inner elements, dtype, alignment)
  LayoutType     FULLY_CONTIGUOUS [block][layer][outer][page*inner], or LAYER_SEPARATE (one region
                 per layer, ordered OUTER_MAJOR [outer][block] like vLLM, or BLOCK_MAJOR [block][outer])
  BlockLayout    a LayoutConfig placed over num_blocks: strides, byte offset and size of every region,
                 bytes per buffer, views of a block over real tensors, and the native RegionLayout the
                 copy routines take (all layers, one layer or a range of them): the only builder of it
  detect_layout  builds the BlockLayout of an engine's KV tensors, refusing shapes, dtypes, strides
                 or alignments it does not understand with a LayoutError that names what it expected.

Every layout is the one address formula of csrc/include/kvbm.h:
  address(b, l, o) = layer_base[l] + b * block_stride + o * outer_stride.
G2 and G3 are always FULLY_CONTIGUOUS, so one block is one contiguous run of bytes there.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from kvbm.errors import LayoutError

if TYPE_CHECKING:
    import torch

# Bytes per element of the dtypes an engine keeps KV in. Strings, so layouts work without torch.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int8": 1, "uint8": 1,
}


class LayoutType(IntEnum):
    FULLY_CONTIGUOUS = 0
    LAYER_SEPARATE = 1


class InnerOrder(IntEnum):
    """Order of the outer (K/V) and block dims inside one layer of a LAYER_SEPARATE layout."""
    OUTER_MAJOR = 0  # [outer][block][page][inner]: vLLM's per-layer [2, num_blocks, page, heads, dim]
    BLOCK_MAJOR = 1  # [block][outer][page][inner]: FlashInfer's / SGLang's order


def dtype_name(dtype: object) -> str:
    """'bfloat16' for torch.bfloat16 or 'bfloat16'; LayoutError for anything else."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_SIZES:
        raise LayoutError(f"unsupported KV dtype {dtype!r}; expected one of {sorted(DTYPE_SIZES)}")
    return name


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True, slots=True)
class LayoutConfig:
    num_layers: int   # attention layers whose KV is cached
    outer_dim: int    # 2 for separate K and V, 1 for MLA's joint latent
    page_size: int    # tokens per block
    inner_dim: int    # elements per token per (layer, outer): kv_heads * head_dim
    dtype: str = "bfloat16"
    alignment: int = 1  # byte alignment of each block start in a FULLY_CONTIGUOUS buffer (4096 for O_DIRECT)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for field in ("num_layers", "outer_dim", "page_size", "inner_dim", "alignment"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayoutError(f"LayoutConfig.{field} must be a positive int, got {value!r}")
        if self.outer_dim > 2:
            raise LayoutError(f"LayoutConfig.outer_dim must be 1 (MLA) or 2 (K/V), got {self.outer_dim}")
        if self.alignment & (self.alignment - 1):
            raise LayoutError(f"LayoutConfig.alignment must be a power of two, got {self.alignment}")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def region_bytes(self) -> int:
        """Bytes of one (block, layer, outer) region: page_size tokens of inner_dim elements."""
        return self.page_size * self.inner_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Payload bytes of one block over all layers and outer dims (no alignment padding)."""
        return self.num_layers * self.outer_dim * self.region_bytes

    @property
    def block_stride(self) -> int:
        """Bytes between consecutive blocks of a FULLY_CONTIGUOUS buffer (payload rounded up to alignment)."""
        return _align_up(self.block_bytes, self.alignment)

    def torch_dtype(self) -> torch.dtype:
        import torch
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, int | str]:
        return {"num_layers": self.num_layers, "outer_dim": self.outer_dim, "page_size": self.page_size,
                "inner_dim": self.inner_dim, "dtype": self.dtype, "alignment": self.alignment}

    @classmethod
    def from_dict(cls, data: dict) -> LayoutConfig:
        try:
            return cls(**{k: data[k] for k in ("num_layers", "outer_dim", "page_size", "inner_dim",
                                               "dtype", "alignment")})
        except KeyError as err:
            raise LayoutError(f"layout description lacks {err.args[0]!r}: {data!r}") from err
        except TypeError as err:
            raise LayoutError(f"bad layout description {data!r}: {err}") from err


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """A LayoutConfig placed over num_blocks blocks in one of the layout types."""

    config: LayoutConfig
    layout_type: LayoutType
    num_blocks: int
    order: InnerOrder = InnerOrder.OUTER_MAJOR

    def __post_init__(self) -> None:
        if not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise LayoutError(f"BlockLayout.num_blocks must be a positive int, got {self.num_blocks!r}")

    # ---- strides (bytes) -------------------------------------------------------------------
    @property
    def region_bytes(self) -> int:
        return self.config.region_bytes

    @property
    def block_stride(self) -> int:
        if self.layout_type is LayoutType.FULLY_CONTIGUOUS:
            return self.config.block_stride
        if self.order is InnerOrder.OUTER_MAJOR:
            return self.config.region_bytes
        return self.config.outer_dim * self.config.region_bytes

    @property
    def outer_stride(self) -> int:
        if self.layout_type is LayoutType.FULLY_CONTIGUOUS or self.order is InnerOrder.BLOCK_MAJOR:
            return self.config.region_bytes
        return self.num_blocks * self.config.region_bytes

    @property
    def layer_stride(self) -> int:
        """Bytes between layers inside one FULLY_CONTIGUOUS block (between layer tensors otherwise)."""
        if self.layout_type is LayoutType.FULLY_CONTIGUOUS:
            return self.config.outer_dim * self.config.region_bytes
        return self.layer_bytes

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer tensor of a LAYER_SEPARATE layout."""
        return self.num_blocks * self.config.outer_dim * self.config.region_bytes

    @property
    def total_bytes(self) -> int:
        if self.layout_type is LayoutType.FULLY_CONTIGUOUS:
            return self.num_blocks * self.config.block_stride
        return self.config.num_layers * self.layer_bytes

    @property
    def buffer_bytes(self) -> int:
        """Bytes each of the num_buffers() buffers must hold: the whole layout, or one layer tensor."""
        return self.total_bytes if self.layout_type is LayoutType.FULLY_CONTIGUOUS else self.layer_bytes

    def num_buffers(self) -> int:
        return 1 if self.layout_type is LayoutType.FULLY_CONTIGUOUS else self.config.num_layers

    # ---- offsets -----------------------------------------------------------------------------
    def region(self, block: int, layer: int, outer: int) -> tuple[int, int, int]:
        """(buffer index, byte offset in that buffer, size) of region (block, layer, outer)."""
        cfg = self.config
        if not (0 <= block < self.num_blocks and 0 <= layer < cfg.num_layers and 0 <= outer < cfg.outer_dim):
            raise LayoutError(f"region ({block}, {layer}, {outer}) outside {self.num_blocks} blocks x "
                              f"{cfg.num_layers} layers x {cfg.outer_dim} outer")
        if self.layout_type is LayoutType.FULLY_CONTIGUOUS:
            return (0, block * self.block_stride + layer * self.layer_stride + outer * self.outer_stride,
                    cfg.region_bytes)
        return layer, block * self.block_stride + outer * self.outer_stride, cfg.region_bytes

    def _layer_bases(self, buffer_ptrs: Sequence[int]) -> list[int]:
        """Base address of every layer, given the address of each buffer (1 or num_layers)."""
        if len(buffer_ptrs) != self.num_buffers():
            raise LayoutError(f"{self.layout_type.name} layout needs {self.num_buffers()} buffer(s), "
                              f"got {len(buffer_ptrs)}")
        if self.layout_type is LayoutType.FULLY_CONTIGUOUS:
            return [int(buffer_ptrs[0]) + layer * self.layer_stride for layer in range(self.config.num_layers)]
        return [int(p) for p in buffer_ptrs]

    def region_layout(self, buffer_ptrs: Sequence[int], layers: int | slice | range | None = None):
        """The native kvbm_layout_t over buffers at these addresses (see kvbm.h): every layer, or
        only `layers` (one index, a slice or a range), for copies that go layer by layer. The one
        place a BlockLayout becomes the native description the copy routines take."""
        from kvbm._fast.native import RegionLayout
        n = self.config.num_layers
        if layers is None:
            picked = range(n)
        elif isinstance(layers, int):
            picked = range(layers, layers + 1)
        elif isinstance(layers, slice):
            picked = range(n)[layers]
        else:
            picked = layers
        if len(picked) == 0 or min(picked) < 0 or max(picked) >= n:
            raise LayoutError(f"layers {layers!r} select none or some outside the {n} layers of the layout")
        bases = self._layer_bases(buffer_ptrs)
        return RegionLayout([bases[layer] for layer in picked], self.config.outer_dim, self.num_blocks,
                            self.block_stride, self.outer_stride, self.config.region_bytes)

    # ---- views over real tensors ---------------------------------------------------------------
    def allocate(self, device: str = "cpu", pin_memory: bool = False) -> list[torch.Tensor]:
        """Fresh uint8 buffers in this layout (tests, CPU-mode engines, benchmarks)."""
        import torch
        return [torch.empty(self.buffer_bytes, dtype=torch.uint8, device=device, pin_memory=pin_memory)
                for _ in range(self.num_buffers())]

    def region_view(self, buffers: Sequence[torch.Tensor], block: int, layer: int, outer: int) -> torch.Tensor:
        """The [page_size, inner_dim] tensor of region (block, layer, outer), typed with the KV dtype."""
        index, offset, size = self.region(block, layer, outer)
        raw = _as_bytes(buffers[index])[offset:offset + size]
        return raw.view(self.config.torch_dtype()).view(self.config.page_size, self.config.inner_dim)

    def block_views(self, buffers: Sequence[torch.Tensor], block: int) -> list[list[torch.Tensor]]:
        """views[layer][outer] of one block."""
        return [[self.region_view(buffers, block, layer, outer) for outer in range(self.config.outer_dim)]
                for layer in range(self.config.num_layers)]

    def block_bytes_of(self, buffers: Sequence[torch.Tensor], block: int) -> bytes:
        """All regions of a block, concatenated in (layer, outer) order: the block's G2 image."""
        parts = []
        for layer in range(self.config.num_layers):
            for outer in range(self.config.outer_dim):
                index, offset, size = self.region(block, layer, outer)
                parts.append(_as_bytes(buffers[index])[offset:offset + size].cpu().numpy().tobytes())
        return b"".join(parts)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    import torch
    if not tensor.is_contiguous():
        raise LayoutError(f"tensor of shape {tuple(tensor.shape)} strides {tensor.stride()} is not contiguous")
    return tensor.reshape(-1).view(torch.uint8)


def detect_layout(tensors: torch.Tensor | Sequence[torch.Tensor], page_size: int | None = None,
                  order: InnerOrder | None = None, alignment: int = 1) -> BlockLayout:
    """The BlockLayout of an engine's KV cache.

    Accepted:
      - a list of per-layer tensors [2, num_blocks, page, heads, head_dim] (vLLM; OUTER_MAJOR),
        [num_blocks, 2, page, heads, head_dim] (BLOCK_MAJOR), or [num_blocks, page, dim] (MLA, outer 1);
      - one fully contiguous tensor [num_blocks, num_layers, outer, page, ...inner].
    When both leading dims of a per-layer tensor are 2 the order is ambiguous: vLLM's OUTER_MAJOR is
    assumed unless `order` says otherwise. Every tensor must be contiguous, of one dtype and device,
    and start at a multiple of `alignment` bytes.
    """
    import torch
    if isinstance(tensors, torch.Tensor):
        return _detect_fully_contiguous(tensors, page_size, alignment)
    tensors = list(tensors)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise LayoutError("expected a tensor or a non-empty list of per-layer tensors")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise LayoutError(f"layer {i} is {tuple(t.shape)} {t.dtype} on {t.device}; expected "
                              f"{tuple(first.shape)} {first.dtype} on {first.device} like layer 0")
        _check_tensor(t, f"layer {i}", alignment)
    shape = tuple(first.shape)
    if len(shape) == 3:  # MLA: [num_blocks, page, dim]
        num_blocks, page, inner, outer, detected = shape[0], shape[1], shape[2], 1, InnerOrder.OUTER_MAJOR
    elif len(shape) >= 4 and 2 in shape[:2]:
        if shape[0] == 2 and (shape[1] != 2 or order in (None, InnerOrder.OUTER_MAJOR)):
            detected, num_blocks = InnerOrder.OUTER_MAJOR, shape[1]
        else:
            detected, num_blocks = InnerOrder.BLOCK_MAJOR, shape[0]
        page, outer = shape[2], 2
        inner = 1
        for dim in shape[3:]:
            inner *= dim
    else:
        raise LayoutError(f"per-layer KV tensor shape {shape} not understood; expected [2, num_blocks, page, "
                          "heads, head_dim], [num_blocks, 2, page, heads, head_dim] or [num_blocks, page, dim]")
    if order is not None and order is not detected and len(shape) != 3:
        raise LayoutError(f"order {order.name} asked for, but shape {shape} is {detected.name}")
    if page_size is not None and page_size != page:
        raise LayoutError(f"page_size {page_size} asked for, but the tensors hold {page} tokens per block")
    config = LayoutConfig(num_layers=len(tensors), outer_dim=outer, page_size=page, inner_dim=inner,
                          dtype=dtype_name(first.dtype), alignment=alignment)
    return BlockLayout(config, LayoutType.LAYER_SEPARATE, num_blocks, detected)


def _detect_fully_contiguous(tensor: torch.Tensor, page_size: int | None, alignment: int) -> BlockLayout:
    shape = tuple(tensor.shape)
    if len(shape) < 5 or shape[2] not in (1, 2):
        raise LayoutError(f"fully contiguous KV tensor shape {shape} not understood; expected "
                          "[num_blocks, num_layers, outer (1 or 2), page, ...inner]")
    _check_tensor(tensor, "KV tensor", alignment)
    if page_size is not None and page_size != shape[3]:
        raise LayoutError(f"page_size {page_size} asked for, but the tensor holds {shape[3]} tokens per block")
    inner = 1
    for dim in shape[4:]:
        inner *= dim
    config = LayoutConfig(num_layers=shape[1], outer_dim=shape[2], page_size=shape[3], inner_dim=inner,
                          dtype=dtype_name(tensor.dtype), alignment=1)
    return BlockLayout(config, LayoutType.FULLY_CONTIGUOUS, shape[0])


def _check_tensor(tensor: torch.Tensor, what: str, alignment: int) -> None:
    dtype_name(tensor.dtype)
    if not tensor.is_contiguous():
        raise LayoutError(f"{what}: strides {tensor.stride()} for shape {tuple(tensor.shape)} are not "
                          "contiguous; expected a dense row-major tensor")
    if tensor.data_ptr() % alignment:
        raise LayoutError(f"{what}: data pointer {tensor.data_ptr():#x} is not aligned to {alignment} bytes")
