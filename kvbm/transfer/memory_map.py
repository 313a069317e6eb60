"""The engine's KV memory as the register message describes it to the path workers.

describe_memory gives one entry per layout buffer: CUDA IPC handle fields of each KV tensor's
storage (torch `_share_cuda_`, sent as msgpack bytes/ints; no pickle), or, in CPU mode, the offset
of each tensor in the shared segment it was allocated in (kvbm.shm.SharedBuffers), which the
workers map by name.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvbm.errors import LayoutError
from kvbm.shm import SharedBuffers


def describe_memory(tensors: Sequence[Any], layout, shared: SharedBuffers | None = None) -> dict:
    """The register message's memory map for the engine's KV buffers (one per layout buffer)."""
    tensors = list(tensors)
    if len(tensors) != layout.num_buffers():
        raise LayoutError(f"{len(tensors)} tensors for a layout of {layout.num_buffers()} buffers")
    if tensors[0].is_cuda:
        return _describe_cuda(tensors)
    if shared is None:
        raise LayoutError("CPU-mode device tensors must live in shared memory the workers can map: allocate "
                          "them with KvBlockManager.create_device_tensors() (kvbm.shm.SharedBuffers)")
    lo, hi = shared.segment.address, shared.segment.address + shared.segment.size
    buffers = []
    for t in tensors:
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        if not (lo <= ptr and ptr + nbytes <= hi):
            raise LayoutError(f"tensor at {ptr:#x} (+{nbytes}) is outside the shared segment {shared.segment.name}")
        buffers.append({"offset": ptr - lo, "nbytes": nbytes})
    return {"kind": "shm", "segment": shared.segment.name, "size": shared.segment.size, "buffers": buffers}


def _describe_cuda(tensors: Sequence[Any]) -> dict:
    buffers = []
    for t in tensors:
        storage = t.untyped_storage()
        (device, handle, storage_size, storage_offset, ref_handle, ref_offset, event_handle,
         event_sync) = storage._share_cuda_()
        buffers.append({"offset": t.data_ptr() - storage.data_ptr(), "nbytes": t.numel() * t.element_size(),
                        "ipc": {"device": int(device), "handle": bytes(handle), "storage_size": int(storage_size),
                                "storage_offset": int(storage_offset), "ref_counter_handle": bytes(ref_handle),
                                "ref_counter_offset": int(ref_offset),
                                "event_handle": bytes(event_handle) if event_handle else b"",
                                "event_sync_required": bool(event_sync)}})
    return {"kind": "cuda_ipc", "device": int(tensors[0].device.index or 0), "buffers": buffers}
