"""Block copies between G1 (the engine's KV tensors) and G2 (pinned host), on CUDA or on the CPU.

Parts
  layer_separate_layout    RegionLayout of an engine's per-layer tensors, outer-major
                           ([outer, num_blocks, ...], vLLM) or block-major ([num_blocks, outer, ...])
  fully_contiguous_layout  RegionLayout of one [num_blocks, num_layers, outer, ...] buffer (G2, G3 staging)
  BlockCopier              offload (G1 -> G2) and onboard (G2 -> G1) for one pair of layouts; CUDA when
                           the G1 tensors are on a GPU and this build has CUDA, else the CPU memcpy routine
  CopyHandle               what a copy returns: done(), wait(), wait_on(stream)
  register_host            pins a host tensor in place (a /dev/shm mapping) for DMA and the SM kernel

Order of a CUDA copy: the direction's own stream (offload and onboard each have one, so both run at
once) waits for `after` (by default the current stream, i.e. the engine's queued work that produces
or last reads the blocks) -> kvbm_cuda_copy_blocks enqueues every layer of every pair in one launch
(kernel or batched DMA, chosen by the rule in csrc/cuda/copy.cu) -> an event is recorded -> the
handle carries it. Nothing blocks the host; `wait_on` makes an engine stream wait for onboarded blocks.
In CPU mode the copy runs at once on memcpy threads and the handle is already done.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

from kvbm.errors import CudaError, LayoutError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

AUTO, KERNEL, DMA, DMA_LOOP, STAGED = 0, 1, 2, 3, 4
_METHODS = {"auto": AUTO, "kernel": KERNEL, "dma": DMA, "dma_loop": DMA_LOOP, "staged": STAGED}


def _native():
    from kvbm._fast import native
    return native


def _check_inner(t: "torch.Tensor", lead: int, what: str) -> int:
    """Bytes of one region: the dims after the first `lead` must be contiguous."""
    inner = t.shape[lead:]
    numel = 1
    expect = 1
    for size, stride in zip(reversed(inner), reversed(t.stride()[lead:])):
        if size != 1 and stride != expect:
            raise LayoutError(f"{what}: dims {tuple(inner)} after the first {lead} are not contiguous "
                              f"(strides {t.stride()[lead:]})")
        expect *= size
        numel *= size
    if numel == 0:
        raise LayoutError(f"{what}: empty region (shape {tuple(t.shape)})")
    return numel * t.element_size()


def layer_separate_layout(tensors: Sequence["torch.Tensor"], outer_dim: int, *,
                          block_major: bool = False):
    """RegionLayout of per-layer KV tensors.

    Outer-major (default) expects each layer as [outer_dim, num_blocks, ...] (vLLM's [2, num_blocks,
    page, heads, dim]); block-major as [num_blocks, outer_dim, ...]. With outer_dim 1 a tensor
    without the outer dim ([num_blocks, ...], MLA) is accepted too. Every layer must share shape,
    strides and dtype; the dims after block and outer must be contiguous.
    """
    native = _native()
    if len(tensors) == 0:
        raise LayoutError("layer_separate_layout: no layer tensors")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype:
            raise LayoutError(f"layer {i}: shape {tuple(t.shape)} stride {t.stride()} {t.dtype} differs "
                              f"from layer 0: {tuple(first.shape)} {first.stride()} {first.dtype}")
        if t.device != first.device:
            raise LayoutError(f"layer {i} is on {t.device}, layer 0 on {first.device}")
    es = first.element_size()
    o_ax, b_ax = (1, 0) if block_major else (0, 1)
    if outer_dim == 1 and not (first.dim() >= 3 and first.shape[o_ax] == 1):
        # [num_blocks, ...] with no outer dim (MLA).
        if first.dim() < 2:
            raise LayoutError(f"layer tensors must be [num_blocks, ...], got shape {tuple(first.shape)}")
        num_blocks = first.shape[0]
        block_stride = first.stride(0) * es
        region = _check_inner(first, 1, "layer 0")
        outer_stride = region
    else:
        if first.dim() < 3:
            raise LayoutError(f"layer tensors must be [outer, blocks, ...] or [blocks, outer, ...], got "
                              f"shape {tuple(first.shape)}")
        if first.shape[o_ax] != outer_dim:
            raise LayoutError(f"outer dim {o_ax} of shape {tuple(first.shape)} is {first.shape[o_ax]}, "
                              f"expected outer_dim {outer_dim}")
        num_blocks = first.shape[b_ax]
        block_stride = first.stride(b_ax) * es
        outer_stride = first.stride(o_ax) * es
        region = _check_inner(first, 2, "layer 0")
    ptrs = [t.data_ptr() for t in tensors]
    return native.RegionLayout(ptrs, outer_dim, num_blocks, block_stride, outer_stride, region)


def fully_contiguous_layout(tensor: "torch.Tensor", num_layers: int, outer_dim: int):
    """RegionLayout of one [num_blocks, ...] buffer whose blocks are [layer][outer][region] runs.

    The block dim may carry padding (stride(0) larger than the block, for O_DIRECT alignment); the
    rest of each block must be contiguous and split evenly into num_layers * outer_dim regions.
    """
    native = _native()
    if tensor.dim() < 2:
        raise LayoutError(f"fully contiguous buffer must be [num_blocks, ...], got shape {tuple(tensor.shape)}")
    block_bytes = _check_inner(tensor, 1, "fully contiguous buffer")
    per_block = num_layers * outer_dim
    if num_layers < 1 or outer_dim < 1 or block_bytes % per_block:
        raise LayoutError(f"block of {block_bytes} bytes does not split into {num_layers} layers x "
                          f"{outer_dim} outer regions")
    region = block_bytes // per_block
    base = tensor.data_ptr()
    ptrs = [base + layer * outer_dim * region for layer in range(num_layers)]
    return native.RegionLayout(ptrs, outer_dim, tensor.shape[0], tensor.stride(0) * tensor.element_size(),
                               region, region)


def register_host(tensor: "torch.Tensor") -> None:
    """Pins a CPU tensor's memory in place (e.g. a mapped /dev/shm segment). CudaError if it fails."""
    _native().cuda_host_register(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def unregister_host(tensor: "torch.Tensor") -> None:
    _native().cuda_host_unregister(tensor.data_ptr())


class CopyHandle:
    """One enqueued copy. Keeps the layouts (and whatever `keep` holds) alive until it is waited on."""

    __slots__ = ("event", "device", "_keep", "bytes")

    def __init__(self, event: Any, keep: tuple, nbytes: int, device: Any = None) -> None:
        self.event = event  # torch.cuda.Event, or None when the copy already ran (CPU mode)
        self.device = device
        self._keep = keep
        self.bytes = nbytes  # bytes the copy moves

    def done(self) -> bool:
        if self.event is None or self.event.query():
            self._keep = ()
            return True
        return False

    def wait(self) -> None:
        """Blocks the host until the copy has finished."""
        if self.event is not None:
            self.event.synchronize()
        self._keep = ()

    def wait_on(self, stream: Any = None) -> None:
        """Makes `stream` (default: the current stream) wait for the copy, without blocking the host."""
        if self.event is None:
            return
        import torch
        (stream or torch.cuda.current_stream(self.device)).wait_event(self.event)


class BlockCopier:
    """Offload (G1 -> G2) and onboard (G2 -> G1) between one device layout and one host layout.

    use_cuda: None decides by the build and by where the G1 tensors are (pass `device`). method:
    'auto' | 'kernel' | 'dma' | 'staged' (or the native constants); max_sms bounds the kernel's SMs (0 = 8).
    """

    def __init__(self, device_layout: Any, host_layout: Any, *, device: Any = None,
                 use_cuda: bool | None = None, method: str | int = "auto", max_sms: int = 0,
                 num_threads: int = 0, keep: tuple = ()) -> None:
        native = _native()
        if (device_layout.num_layers, device_layout.outer_dim, device_layout.region_bytes) != \
                (host_layout.num_layers, host_layout.outer_dim, host_layout.region_bytes):
            raise LayoutError(
                f"device layout {device_layout.num_layers} layers x {device_layout.outer_dim} outer x "
                f"{device_layout.region_bytes} bytes, host layout {host_layout.num_layers} x "
                f"{host_layout.outer_dim} x {host_layout.region_bytes}")
        self.device_layout = device_layout
        self.host_layout = host_layout
        self.method = _METHODS[method] if isinstance(method, str) else int(method)
        self.max_sms = max_sms
        self.num_threads = num_threads
        self._keep = keep
        if use_cuda is None:
            use_cuda = device is not None and str(device).startswith("cuda") and native.cuda_available()
        if use_cuda and not native.cuda_available():
            raise CudaError(f"BlockCopier: CUDA asked for but not available (build {native.build_kind()!r})")
        self.use_cuda = bool(use_cuda)
        self.device = None
        self.offload_stream = self.onboard_stream = None
        if self.use_cuda:
            import torch
            self.device = torch.device(device if device is not None else "cuda")
            # One stream per direction: an offload and an onboard run at once on the two copy
            # engines (or side by side as kernels).
            self.offload_stream = torch.cuda.Stream(self.device)
            self.onboard_stream = torch.cuda.Stream(self.device)

    @classmethod
    def from_tensors(cls, kv_tensors: "torch.Tensor | Sequence[torch.Tensor]", host: "torch.Tensor", *,
                     num_layers: int, outer_dim: int, block_major: bool = False, **kwargs) -> "BlockCopier":
        """G1 given as per-layer tensors (layer-separate) or as one fully contiguous tensor; G2 as
        one fully contiguous [num_blocks, ...] host tensor (pinned, for CUDA)."""
        import torch
        if isinstance(kv_tensors, torch.Tensor):
            dev_layout = fully_contiguous_layout(kv_tensors, num_layers, outer_dim)
            device = kv_tensors.device
            keep = (kv_tensors, host)
        else:
            kv_tensors = list(kv_tensors)
            if len(kv_tensors) != num_layers:
                raise LayoutError(f"{len(kv_tensors)} layer tensors for num_layers {num_layers}")
            dev_layout = layer_separate_layout(kv_tensors, outer_dim, block_major=block_major)
            device = kv_tensors[0].device
            keep = (*kv_tensors, host)
        host_layout = fully_contiguous_layout(host, num_layers, outer_dim)
        if device.type == "cuda" and kwargs.get("use_cuda", True) is not False and not host.is_pinned():
            raise LayoutError("host tensor must be pinned (pin_memory() or register_host) for CUDA copies")
        kwargs.setdefault("device", device)
        return cls(dev_layout, host_layout, keep=keep, **kwargs)

    def offload(self, device_blocks: Any, host_blocks: Any, *, after: Any = None) -> CopyHandle:
        """Gathers device_blocks[i] into host_blocks[i], every layer and outer region."""
        return self._copy(self.device_layout, self.host_layout, device_blocks, host_blocks,
                          self.offload_stream, after)

    def onboard(self, host_blocks: Any, device_blocks: Any, *, after: Any = None) -> CopyHandle:
        """Scatters host_blocks[i] into device_blocks[i]; `handle.wait_on()` before reading them."""
        return self._copy(self.host_layout, self.device_layout, host_blocks, device_blocks,
                          self.onboard_stream, after)

    def _copy(self, src: Any, dst: Any, src_blocks: Any, dst_blocks: Any, stream: Any,
              after: Any) -> CopyHandle:
        native = _native()
        n = len(src_blocks)
        nbytes = n * src.num_layers * src.outer_dim * src.region_bytes
        if not self.use_cuda:
            native.copy_blocks_cpu(src, dst, src_blocks, dst_blocks, self.num_threads)
            return CopyHandle(None, (), nbytes)
        import torch
        with torch.cuda.device(self.device):
            # Order behind the engine: `after` is an event or a stream; by default the current
            # stream, which holds the work that writes (offload) or still reads (onboard) the blocks.
            if after is None:
                stream.wait_stream(torch.cuda.current_stream(self.device))
            elif after is not False:
                if isinstance(after, torch.cuda.Event):
                    stream.wait_event(after)
                else:
                    stream.wait_stream(after)
            native.copy_blocks_cuda(src, dst, src_blocks, dst_blocks, self.method, self.max_sms,
                                    stream.cuda_stream)
            event = torch.cuda.Event()
            event.record(stream)
        return CopyHandle(event, (src, dst, self._keep), nbytes, self.device)
