"""The engine's KV memory as the register message describes it to the path workers.

describe_memory gives one entry per layout buffer: CUDA IPC handle fields of each KV tensor's
storage (torch `_share_cuda_`, sent as msgpack bytes/ints; no pickle), or, in CPU mode, the offset
of each tensor in the shared segment it was allocated in (kvbm.shm.SharedBuffers), which the
workers map by name.

CUDA shares and shutdown. `_share_cuda_` wraps the shared storage's memory in a torch
CudaIPCSentData that holds an offset of a ref-counter file until that storage is freed; a
producer that exits with one still held prints "Producer process has been terminated before all
shared CUDA tensors released". An engine's KV tensors live until its exit, so sharing them directly
printed it at every exit. What is shared instead is an alias: a second, non-owning storage over
the same bytes (torch._C._construct_storage_from_data_pointer: no deleter, so whenever torch frees
its record, nothing else is freed with it), kept in `keep` by the caller with the engine's storage
(the memory must outlive every mapping) and dropped once the workers have dropped their mappings
(release_ipc_shares, from KvBlockManager.close and ShardTransfers.close: the workers unregister and
exit, then the aliases go, then torch.cuda.ipc_collect()). Where torch lacks that call or refuses
the alias (memory its caching allocator did not hand out as one block), the storage itself is
shared, as before.

Each registration message carries shares of its own (torch counts one consumer per share: the
worker that opens it releases it when it drops the registration, or replaces it with a later one).
A worker killed by a signal while holding one never releases it: torch's counter stays at one, and
torch keeps the memory and warns at exit. HeldShares tracks which generation holds which message's
shares and, once a killed generation's death is confirmed, releases them in its place
(release_shares); a worker that exits by itself has released them already.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kvbm.errors import LayoutError
from kvbm.shm import SharedBuffers

logger = logging.getLogger(__name__)
# Shares a worker may still map after its engine closed: kept (with the storages they alias) until
# the process exits.
_UNRELEASED: list = []


def describe_memory(tensors: Sequence[Any], layout, shared: SharedBuffers | None = None,
                    keep: list | None = None) -> dict:
    """The register message's memory map for the engine's KV buffers (one per layout buffer).
    CUDA: the shared aliases are appended to `keep`, which must outlive the workers' mappings."""
    tensors = list(tensors)
    if len(tensors) != layout.num_buffers():
        raise LayoutError(f"{len(tensors)} tensors for a layout of {layout.num_buffers()} buffers")
    if tensors[0].is_cuda:
        return _describe_cuda(tensors, keep)
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


def worker_memory(tensors: Sequence[Any], layout, shared: SharedBuffers | None, shares: list):
    """What TransferManager.register takes for the engine's KV buffers: CPU tensors, their memory
    description; CUDA tensors, a callable giving each path worker a share of its own (the aliases
    go into `shares`, which the caller keeps and releases with release_ipc_shares)."""
    tensors = list(tensors)
    if not getattr(tensors[0], "is_cuda", False):
        return describe_memory(tensors, layout, shared)
    if len(tensors) != layout.num_buffers():   # describe_memory's check, before anything is shared
        raise LayoutError(f"{len(tensors)} tensors for a layout of {layout.num_buffers()} buffers")
    return lambda: describe_memory(tensors, layout, shared, keep=shares)


def _share(storage, keep: list | None) -> tuple:
    """_share_cuda_ of a non-owning alias of `storage` ((alias, storage) kept in `keep`), or of
    the storage itself."""
    if keep is not None:
        import torch
        construct = getattr(torch._C, "_construct_storage_from_data_pointer", None)
        try:
            if construct is not None:
                alias = construct(storage.data_ptr(), storage.device, storage.nbytes())
                fields = alias._share_cuda_()
                keep.append((alias, storage))
                return fields
        except (RuntimeError, TypeError, ValueError) as err:
            logger.debug("CUDA IPC through an alias refused (%s); sharing the storage itself", err)
    return storage._share_cuda_()


def _describe_cuda(tensors: Sequence[Any], keep: list | None = None) -> dict:
    buffers = []
    for t in tensors:
        storage = t.untyped_storage()
        (device, handle, storage_size, storage_offset, ref_handle, ref_offset, event_handle,
         event_sync) = _share(storage, keep)
        buffers.append({"offset": t.data_ptr() - storage.data_ptr(), "nbytes": t.numel() * t.element_size(),
                        "ipc": {"device": int(device), "handle": bytes(handle), "storage_size": int(storage_size),
                                "storage_offset": int(storage_offset), "ref_counter_handle": bytes(ref_handle),
                                "ref_counter_offset": int(ref_offset),
                                "event_handle": bytes(event_handle) if event_handle else b"",
                                "event_sync_required": bool(event_sync)}})
    return {"kind": "cuda_ipc", "device": int(tensors[0].device.index or 0), "buffers": buffers}


class HeldShares:
    """One path's CUDA registration messages: the shares each carried, and which worker generation
    holds which (built on the thread that calls register(), then used by the manager's I/O thread
    only).

    A generation that takes a message holds its shares until it drops the registration (unregister,
    its own exit, or a later message it takes: each releases what it held). A generation killed by
    a signal releases nothing: its shares are released here once its death is confirmed (`died`
    with `killed`), and those of a message it is found to have taken afterwards (its REGISTERED
    read after the death) at once. Wherever the record cannot tell, it leaks rather than release
    twice (a leak makes torch keep that memory and warn at exit; a second release wraps the counter
    below zero, with the same result for every share of it): a message never answered; a refused
    one (the worker dropped its previous registration before refusing: nothing of that generation
    is released then); the held message of a generation killed while a later message to it was
    unanswered (it may have taken that one, releasing the held one, its answer lost or still
    unread).
    Limitation: a worker that still had the same storage mapped from an earlier registration of
    this process (an unregister it never got) releases the new share at once (torch's cache), and
    a release here after its death counts twice."""

    def __init__(self, source: Callable[[], dict], previous: HeldShares | None = None) -> None:
        self.source = source
        self.ready: dict | None = source()    # the next message's, made where errors reach register()
        # register id -> (the generation it was sent to, its memory description), not answered yet
        self.sent: dict[int, tuple[int, dict]] = {}
        self.held: dict[int, dict] = {}       # generation -> the message it took last
        self.killed: set[int] = set()
        if previous is not None:   # register() again: what the old book knows still holds
            self.sent, self.held, self.killed = dict(previous.sent), dict(previous.held), set(previous.killed)
            if previous.ready is not None:
                release_shares(previous.ready, opened=False)   # made, never sent

    def send(self, rid: int, gen: int) -> dict:
        """The memory description of registration `rid`, sent to generation `gen` (the newest
        known): shares no other message carried. Raises what making them raised (nothing is
        recorded then)."""
        memory = self.ready if self.ready is not None else self.source()
        self.ready = None
        self.sent[rid] = (gen, memory)
        return memory

    def refused(self, rid: int, gen: int | None) -> None:
        """Generation `gen` refused registration `rid`; it dropped what it held before refusing."""
        self.sent.pop(rid, None)
        if gen is not None:
            self.held.pop(gen, None)

    def accepted(self, rid: int, gen: int) -> None:
        """Generation `gen` took registration `rid` (any id this book sent; others are ignored).
        The message it held before, it released on taking this one."""
        sent = self.sent.pop(rid, None)
        if sent is None:
            return
        # Older messages were handled before this one (one connection, answered in order): taken
        # and replaced, refused, or lost with a dead generation; none is left to answer.
        self.sent = {r: m for r, m in self.sent.items() if r > rid}
        memory = sent[1]
        if gen in self.killed:
            release_shares(memory)
        else:
            self.held[gen] = memory

    def died(self, gen: int, killed: bool) -> None:
        """Generation `gen` is confirmed gone. `killed` (a signal): nothing of it ran its release, so
        the shares it held are released in its place; otherwise it released them itself."""
        memory = self.held.pop(gen, None)
        if killed:
            self.killed.add(gen)
            unsure = any(to == gen for to, _ in self.sent.values())
            if memory is not None and not unsure:
                release_shares(memory)


def release_shares(memory: dict, opened: bool = True) -> None:
    """Releases torch's consumer count of each share in `memory` (one message's description) that
    no worker will release. By default the message a dead worker opened, as its own release would
    have: torch's rebuild opens a buffer whose (handle, offset) it already opened for an earlier
    buffer of the message from its cache and releases that share at once, so only the first of
    each is still counted. `opened=False`: a description no worker ever got, every share counted."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    seen = set()
    for buf in memory.get("buffers", ()):
        ipc = buf["ipc"]
        key = (ipc["handle"], ipc["storage_offset"])
        if opened and key in seen:
            continue
        seen.add(key)
        try:
            torch.UntypedStorage._release_ipc_counter(ipc["ref_counter_handle"], ipc["ref_counter_offset"],
                                                      device=ipc["device"])
        except (RuntimeError, OSError) as err:   # best effort, as torch's own release
            logger.warning("releasing a CUDA IPC share no worker will release failed: %s", err)


def release_ipc_shares(shares: list, safe: bool) -> None:
    """The last step of the IPC order. Once the workers dropped their mappings (unregister) or
    exited (`safe`), the shared aliases go, which frees torch's records of them and their
    ref-counter offsets (none is left for torch to warn about at exit), and ipc_collect frees any
    that a worker killed before its release left pending. Not safe (a worker of an instance we did
    not start did not answer): they stay referenced until exit, with the engine's storages, so
    that memory is never handed out again while mapped. Empties `shares`."""
    if not shares:
        return
    if not safe:
        _UNRELEASED.extend(shares)
        logger.warning("%d CUDA IPC share(s) kept until exit: a worker did not confirm it dropped them", len(shares))
        shares.clear()
        return
    shares.clear()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.ipc_collect()
