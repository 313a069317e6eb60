"""Copy handlers of the path workers: the memory an engine registered, and the block copies over it.

Parts:
  DeviceMemory   the engine's KV buffers as this process sees them: a mapped CPU-mode shared
                 segment, or CUDA tensors rebuilt from CUDA IPC handles (no pickle: the handle
                 fields arrive as msgpack bytes/ints and go to torch's rebuild_cuda_tensor)
  Copier         one (source layout, destination layout) pair with native RegionLayouts, whole and
                 per layer; `copy(src, dst, on_layer)` runs the CPU routine (memcpy threads) or the
                 CUDA one on the worker's own stream, layer by layer when progress is asked for.
                 The one copy path: path workers, tests and bench/bench_transfer.py all copy here

Order inside a worker: attach + pin G2 (supervisor args) -> an engine registers (DeviceMemory,
Copier per path) -> copies. CUDA copies are enqueued for all layers at once with an event after
each layer; the worker waits on the events in order and reports each layer as it lands.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np

from kvbm._fast import native
from kvbm.errors import LayoutError, ProtocolError
from kvbm.layout import BlockLayout
from kvbm.shm import Segment

logger = logging.getLogger(__name__)

# CPU mode: the smallest copy between two layer-progress reports (one call per layer costs a
# thread fan-out each). CUDA keeps an event per layer: groups of >= 8 MiB were tried on the H200 and
# the 64-block onboard with progress stayed at 58% of the copy alone (bench/RESULTS.md, "Lanes"),
# so the finer progress that layer-wise loading wants costs nothing measurable.
PROGRESS_BYTES = 8 << 20
# CUDA copies up to this size are waited on by spinning (the event's default sync): they land within
# tens of microseconds, less than a blocking event's sleep and wake-up costs the round trip; larger
# ones sleep on a blocking event rather than keep a core busy for milliseconds.
SPIN_WAIT_BYTES = 4 << 20
SPARE_EVENTS = 256       # events kept for reuse per kind (MAX_IN_FLIGHT layered requests of up to 64 layers)


class DeviceMemory:
    """Base addresses of the engine's buffers in this process, kept mapped while registered."""

    def __init__(self, memory: dict, layout: BlockLayout, cuda: bool) -> None:
        self.kind = memory["kind"]
        self._keep: list = []
        self.segment: Segment | None = None
        need = layout.buffer_bytes
        buffers = memory["buffers"]
        if len(buffers) != layout.num_buffers():
            raise ProtocolError(f"memory has {len(buffers)} buffers, the device layout needs {layout.num_buffers()}")
        for i, buf in enumerate(buffers):
            if buf["nbytes"] < need:
                raise ProtocolError(f"buffer {i} holds {buf['nbytes']} bytes, the layout needs {need}")
        if self.kind == "shm":
            name = memory.get("segment")
            if not isinstance(name, str) or "/" in name or not name.startswith("kvbm-"):
                raise ProtocolError(f"memory.segment: expected a kvbm-* segment name, got {name!r:.80}")
            self.segment = Segment.attach(name, populate=True)
            try:
                for i, buf in enumerate(buffers):
                    if buf["offset"] + need > self.segment.size:
                        raise ProtocolError(f"buffer {i} [{buf['offset']}, +{need}) outside segment of "
                                            f"{self.segment.size} bytes")
                if cuda:
                    self.segment.pin()
                self.ptrs = [self.segment.address + buf["offset"] for buf in buffers]
            except BaseException:
                self.close()  # the caller never gets this object: unmap and close the fd now
                raise
        elif self.kind == "cuda_ipc":
            if not cuda:
                raise ProtocolError("cuda_ipc memory registered with a worker running in CPU mode")
            try:
                self.ptrs = [self._open_ipc(buf) for buf in buffers]
            except BaseException:
                self.close()  # drop the handles opened before the failing one
                raise
        else:
            raise ProtocolError(f"memory.kind {self.kind!r}")

    def _open_ipc(self, buf: dict) -> int:
        import torch
        from torch.multiprocessing.reductions import rebuild_cuda_tensor
        h = buf.get("ipc")
        if not isinstance(h, dict):
            raise ProtocolError("cuda_ipc buffer lacks its 'ipc' map")
        try:
            storage_size = int(h["storage_size"])
            tensor = rebuild_cuda_tensor(
                torch.Tensor, (storage_size,), (1,), 0, torch.UntypedStorage, torch.uint8,
                int(h["device"]), bytes(h["handle"]), storage_size, int(h["storage_offset"]), False,
                bytes(h["ref_counter_handle"]), int(h["ref_counter_offset"]),
                bytes(h["event_handle"]), bool(h["event_sync_required"]))  # always bytes, as _share_cuda_ gives it
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ProtocolError(f"cannot open CUDA IPC handle: {err}") from err
        self._keep.append(tensor)
        if buf["offset"] + buf["nbytes"] > storage_size:
            raise ProtocolError(f"buffer [{buf['offset']}, +{buf['nbytes']}) outside its storage of {storage_size}")
        return tensor.data_ptr() + buf["offset"]

    def close(self) -> None:
        self._keep.clear()
        if self.segment is not None:
            self.segment.close()
            self.segment = None


class Copier:
    """Copies blocks from one registered layout to another, on the CPU or on a CUDA stream.

    method and max_sms choose the CUDA routine (kvbm.h; the workers keep AUTO, benches and tests
    pick each one); the CPU routine has only one and ignores them."""

    def __init__(self, src: BlockLayout, src_ptrs: list[int], dst: BlockLayout, dst_ptrs: list[int],
                 cuda: bool, threads: int = 0, device: int = 0, method: int = native.CopyMethod.AUTO,
                 max_sms: int = 0) -> None:
        if (src.config.num_layers, src.config.outer_dim, src.config.region_bytes) != \
                (dst.config.num_layers, dst.config.outer_dim, dst.config.region_bytes):
            raise LayoutError(f"source and destination layouts disagree: {src.config} vs {dst.config}")
        try:
            self.method = native.CopyMethod(method)
        except ValueError as err:
            raise LayoutError(f"copy method {method!r}; expected one of {[int(m) for m in native.CopyMethod]}") from err
        self.max_sms = max_sms
        self.src, self.dst = src, dst
        self._src_ptrs, self._dst_ptrs = list(src_ptrs), list(dst_ptrs)
        self.src_region = src.region_layout(src_ptrs)
        self.dst_region = dst.region_layout(dst_ptrs)
        layers = range(src.config.num_layers)
        self.src_layers = [src.region_layout(src_ptrs, layer) for layer in layers]
        self.dst_layers = [dst.region_layout(dst_ptrs, layer) for layer in layers]
        self._groups: dict[tuple[int, int], tuple] = {}   # (lo, hi) -> layouts of layers lo..hi-1 (CPU progress)
        self.cuda = cuda
        self.threads = threads
        self.block_bytes = src.config.block_bytes
        self._stream = None
        if cuda:
            import torch
            # The SM kernel checks every layer pointer on every call unless the layout was vouched
            # for once (kvbm.h, KVBM_LAYOUT_UVA_CHECKED): a registration's buffers stay as they are
            # for this Copier's life. Pageable memory stays unvouched: the kernel refuses it per
            # call, as before, and the DMA methods take it.
            for lay in (self.src_region, self.dst_region, *self.src_layers, *self.dst_layers):
                try:
                    lay.vouch_uva()
                except LayoutError:
                    pass
            # Each path worker has its own stream: D2H and H2D overlap on the two copy directions.
            self._torch = torch
            self._device = torch.device("cuda", device)
            self._stream = torch.cuda.Stream(device=self._device)
        # Spare events by `blocking`, reused once their request is answered (recycle): creating
        # one costs ~1.5 us of cudaEventCreate on its first record, and a layered request takes one
        # per layer (16 of them were most of a 1-block layered launch's 115 us on the H200).
        self._spare_events: dict[bool, list] = {True: [], False: []}

    @property
    def stream(self):
        """The torch CUDA stream every copy is enqueued on; None in CPU mode."""
        return self._stream

    def copy(self, src: np.ndarray, dst: np.ndarray, on_layer: Callable[[int], None] | None = None) -> int:
        """Copies every region of src[i] to dst[i]; calls on_layer(l) when layers 0..l have all landed
        (not necessarily for every l: landed layers are reported together). Returns bytes."""
        if self.cuda:
            self._copy_cuda(src, dst, on_layer)
        elif on_layer is None:
            native.copy_blocks_cpu(self.src_region, self.dst_region, src, dst, self.threads)
        else:
            for s, d, last in self._progress_groups(len(src)):
                native.copy_blocks_cpu(s, d, src, dst, self.threads)
                on_layer(last)  # every layer <= last has landed
        return len(src) * self.block_bytes

    def _progress_groups(self, nblocks: int) -> list[tuple]:
        """(source layout, destination layout, last layer) of each group of layers copied between
        two progress reports: consecutive layers of at least PROGRESS_BYTES together."""
        layers = len(self.src_layers)
        per_layer = nblocks * self.block_bytes // layers
        group = max(1, min(layers, -(-PROGRESS_BYTES // max(per_layer, 1))))
        out = []
        for lo in range(0, layers, group):
            hi = min(layers, lo + group)
            s, d = (self.src_layers[lo], self.dst_layers[lo]) if hi - lo == 1 else self._group(lo, hi)
            out.append((s, d, hi - 1))
        return out

    def _group(self, lo: int, hi: int) -> tuple:
        """Region layouts of layers lo..hi-1, built once (~14 us each to build, per copy before)."""
        pair = self._groups.get((lo, hi))
        if pair is None:
            pair = self._groups[(lo, hi)] = (self.src.region_layout(self._src_ptrs, range(lo, hi)),
                                             self.dst.region_layout(self._dst_ptrs, range(lo, hi)))
        return pair

    def launch(self, src: np.ndarray, dst: np.ndarray, layers: bool) -> list:
        """CUDA only: enqueues the copy on this worker's stream and returns at once with the events
        to wait on (launch_groups without the layers)."""
        return [event for event, _ in self.launch_groups(src, dst, layers)]

    def launch_groups(self, src: np.ndarray, dst: np.ndarray, layers: bool) -> list[tuple]:
        """CUDA only: enqueues the copy on this worker's stream and returns at once with the events
        to wait on, as (event, last layer landed when it fires): one per layer when `layers`, else
        one for the whole copy. The worker keeps several
        launched requests in flight so its own per-request work (receive, validate, reply) overlaps
        the copies instead of leaving the copy engines idle between requests."""
        torch = self._torch
        handle = self._stream.cuda_stream
        blocking = len(src) * self.block_bytes > SPIN_WAIT_BYTES
        events = []
        # The device guard only where another device is current (~2 us a copy otherwise).
        with (contextlib.nullcontext() if torch.cuda.current_device() == self._device.index
              else torch.cuda.device(self._device)):
            if layers and self.method in (native.CopyMethod.AUTO, native.CopyMethod.KERNEL) and \
                    self.src_region.uva_checked and self.dst_region.uva_checked:
                # One call, a kernel and an event per layer (kvbm_cuda_copy_layers): 16 calls of
                # their own ran at 52 % (AUTO) / 82 % (kernel) of the whole copy on the H200. Only
                # over memory the kernel may touch (vouched for): else a call per layer, AUTO's way.
                events = [(self._event(blocking), layer) for layer in range(len(self.src_layers))]
                native.copy_layers_cuda(self.src_region, self.dst_region, src, dst,
                                        [event.cuda_event for event, _ in events], self.max_sms, handle)
                return events
            groups = [(s, d, i) for i, (s, d) in enumerate(zip(self.src_layers, self.dst_layers))] if layers \
                else [(self.src_region, self.dst_region, len(self.src_layers) - 1)]
            for s, d, last in groups:
                native.copy_blocks_cuda(s, d, src, dst, self.method, self.max_sms, handle)
                event = self._event(blocking)
                event.record(self._stream)
                events.append((event, last))
        return events

    def _event(self, blocking: bool):
        """A spare event, or a new one (blocking: synchronize() sleeps on it instead of spinning a
        core), recorded once so that it exists: the library records events torch created, and
        torch creates one at its first record."""
        spare = self._spare_events[blocking]
        if spare:
            return spare.pop()
        event = self._torch.cuda.Event(blocking=blocking)
        event.record(self._stream)
        return event

    def recycle(self, events: list[tuple], nbytes: int) -> None:
        """The events of an answered request of `nbytes` (launch_groups'), every one fired, for
        later copies; up to SPARE_EVENTS of each kind are kept."""
        spare = self._spare_events[nbytes > SPIN_WAIT_BYTES]
        if len(spare) < SPARE_EVENTS:
            spare.extend(event for event, _ in events)

    def enqueue(self, src: np.ndarray, dst: np.ndarray) -> None:
        """CUDA only: the copy of every layer enqueued on this copier's stream with nothing recorded
        after it, i.e. the bare copy routine; a benchmark's baseline (bench_pipeline) enqueues its
        batches back to back and then synchronizes the stream."""
        native.copy_blocks_cuda(self.src_region, self.dst_region, src, dst, self.method, self.max_sms,
                                self._stream.cuda_stream)

    def drain(self) -> None:
        """CUDA only: waits until nothing this worker enqueued is still running. After a launch
        that failed part-way, the layers already enqueued must land before the request is
        answered ERROR (the engine reuses those blocks at once). The stream's own error, if any,
        is the one being reported already: logged, not raised."""
        if self._stream is None:
            return
        try:
            self._stream.synchronize()
        except Exception:  # noqa: BLE001 - the launch error is what the request fails with
            logger.warning("stream synchronize after a failed launch failed too", exc_info=True)

    def _copy_cuda(self, src: np.ndarray, dst: np.ndarray, on_layer) -> None:
        events = self.launch_groups(src, dst, on_layer is not None)
        if on_layer is None:
            events[0][0].synchronize()
            return
        i = 0
        while i < len(events):
            events[i][0].synchronize()
            while i + 1 < len(events) and events[i + 1][0].query():
                i += 1  # report every group that has landed in one message
            on_layer(events[i][1])
            i += 1
