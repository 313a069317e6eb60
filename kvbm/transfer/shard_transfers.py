"""ShardTransfers: the transfer runtime of one tensor-parallel rank (runs in that rank's worker process).

vLLM's KV connector has a worker-role object per TP rank, each owning that rank's shard of the KV
cache (its heads). The block metadata lives elsewhere (the scheduler side's KvBlockManager, which
chooses G2 host block ids and device block ids); this moves the bytes of this rank's shard between
them, with raw block ids and no registry.

G2 with TP ranks: one G2 segment of `world_size` regions, one per rank, each `host_blocks` blocks of
this rank's shard: rank r's FULLY_CONTIGUOUS host layout starts at byte r * host_blocks * (shard
block stride). Host block id h names block h of every rank's region, so the scheduler's one registry
manages every rank's shard of a block at once.

Order:
  1. ShardTransfers(config, rank, world_size, group, host_blocks): `group` names the engine (its
     ranks register as "<group>/r<rank>" under that group, and the workers let them coexist)
  2. CPU engines and tests: shared_tensors(shape, dtype, count) places the KV tensors in a shared
     segment the workers can map (CUDA tensors need nothing: they go as CUDA IPC handles)
  3. attach(tensors): the layout is detected (vLLM's per-layer [2, num_blocks, block_size, heads,
     head_dim] list, or one cross-layer tensor); rank 0 finds the instance's kvbm-workers or starts
     one with a G2 of world_size regions, the other ranks wait for it; then a TransferManager
     connects and registers the tensors at the rank's host offset with the D2H and H2D workers
     (not the disk worker: the engine's G2 registry, which decides what goes to G3, registers there)
  4. store(device_blocks, host_blocks) -> D2H future; load(host_blocks, device_blocks) -> H2D future
     with per-layer progress (future.wait_layer(l)); bad block ids raise LayoutError and submit nothing
  5. close(): unregisters, stops the kvbm-workers this rank started (rank 0 only: close it last),
     then drops the CUDA IPC shares of the tensors (memory_map: each path worker maps a share of
     its own, dropped only once the workers dropped their mappings, so torch has nothing to warn
     about at exit), frees the shared tensors

Data-parallel replicas (shared_g2=True): several engines' ranks on one kvbm-workers and one G2 of a
region per tensor-parallel rank, each region a shard of every block of the shared registry
(kvbm.shared_g2). The instance is started with a rank's shard layout by whichever replica's rank 0
comes first, the others find it (one that lost the race to start it waits for the winner's); it
does not follow the replica that started it (a crash of that one leaves the others their cache),
and stops shared_idle_exit_s after the last engine left, or at once when its starter closes last.
Each rank joins the namespace of its layout and salt as an engine of its own (its pid, for the path
workers' admission) and registers that namespace's part of its region, where its replica's
scheduler side (KvBlockManager.join_shared_g2) picks block ids: every replica's blocks are then
every replica's hits.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError, KvbmError, LayoutError, LifecycleError
from kvbm.layout import BlockLayout, LayoutType, detect_layout
from kvbm.shm import SharedBuffers
from kvbm.transfer.futures import TransferFuture
from kvbm.transfer.launcher import WorkersProcess, connect_workers, find_instance
from kvbm.transfer.manager import TransferManager
from kvbm.transfer.memory_map import release_ipc_shares, worker_memory
from kvbm.wire import protocol as P

logger = logging.getLogger(__name__)


class ShardTransfers:
    """D2H / H2D copies between one TP rank's KV shard and its region of the instance's G2."""

    def __init__(self, config: KvbmConfig, rank: int, world_size: int, group: str, host_blocks: int,
                 shared_g2: bool = False) -> None:
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ConfigError(f"rank {rank!r} of world_size {world_size!r}: expected 0 <= rank < world_size")
        if not isinstance(group, str) or not 0 < len(group) <= P.MAX_ENGINE_ID - 16:
            raise ConfigError(f"group must name the engine in 1..{P.MAX_ENGINE_ID - 16} chars, got {group!r:.80}")
        if not isinstance(host_blocks, int) or host_blocks < 1:
            raise ConfigError(f"host_blocks must be a positive block count, got {host_blocks!r}")
        if world_size > 1 and config.disk_path and (config.disk_blocks or config.disk_size):
            raise ConfigError(f"the disk tier with tensor parallelism is not supported yet (world_size "
                              f"{world_size}, disk_path {config.disk_path}): a G3 block would hold one rank's "
                              f"shard only; run TP > 1 without a disk tier (G2 only), or the disk tier with TP 1")
        self.config = config
        self.shared_g2 = shared_g2
        self._g2 = None      # the shared G2 (SharedG2) and this rank's Lease of it, with shared_g2
        self._lease = None
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.host_blocks = host_blocks
        self.engine_id = f"{group}/r{rank}"
        self.device_layout: BlockLayout | None = None
        self.host_layout: BlockLayout | None = None
        self._tm: TransferManager | None = None
        self._workers: WorkersProcess | None = None   # the kvbm-workers this rank started (rank 0)
        self._shared: SharedBuffers | None = None     # CPU-mode tensors made by shared_tensors()
        self._ipc_shares: list = []   # CUDA: the aliases the workers map (memory_map); dropped after them
        self._closed = False
        self._host_offset = 0

    # ---- set-up ------------------------------------------------------------------------------
    def shared_tensors(self, shape: tuple[int, ...], dtype, count: int = 1) -> list:
        """`count` CPU tensors of `shape` and `dtype` in a shared segment the workers can map: what a
        CPU-mode rank registers (vLLM's per-layer cache: count = layers, shape [2, num_blocks,
        block_size, heads, head_dim]; a cross-layer cache: count 1). Freed by close()."""
        self._check_open()
        if self._shared is not None:
            raise LifecycleError(f"rank {self.rank} already made its shared tensors")
        self._shared = SharedBuffers.emulated_device(tuple(shape), dtype, count, self.config.instance_id,
                                                     f"the CPU-mode KV shard of rank {self.rank} ({count} x "
                                                     f"{tuple(shape)} {dtype})")
        return list(self._shared.tensors)

    def attach(self, tensors, layout: BlockLayout | None = None, timeout: float = 60.0,
               shared: SharedBuffers | None = None) -> None:
        """Registers this rank's KV tensors (a list of per-layer tensors, or one cross-layer tensor)
        with the instance's kvbm-workers: rank 0 starts it when none runs, the others wait up to
        `timeout` for it. CPU tensors must live in `shared` (default: those of shared_tensors())."""
        self._check_open()
        if self._tm is not None:
            raise LifecycleError(f"rank {self.rank} of {self.group!r} is attached already")
        if layout is None:
            layout = detect_layout(tensors)
        buffers = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
        shares: list = []
        memory = worker_memory(buffers, layout, shared if shared is not None else self._shared, shares)
        host_layout = BlockLayout(layout.config, LayoutType.FULLY_CONTIGUOUS, self.host_blocks)
        g2_bytes = self.world_size * host_layout.total_bytes
        tm, workers = self._connect(layout, g2_bytes, timeout)
        host_offset = self.rank * host_layout.total_bytes
        try:
            if self.shared_g2:
                host_layout, host_offset = self._join(tm, layout, host_layout)
            # D2H and H2D only: a rank copies between its device and G2. The disk worker sees one
            # engine of the group, the one that owns the G2 registry (the vLLM connector's
            # scheduler side, through KvBlockManager.attach_disk_tier).
            tm.register(layout, host_layout, memory, timeout, group=self.group,
                        host_offset=host_offset, paths=(P.Path.D2H, P.Path.H2D))
        except BaseException:
            tm.close()
            others = self._others_attached()
            self._leave()
            if workers is not None and not others:
                workers.stop()   # shared: other replicas keep it (it stops when idle)
            release_ipc_shares(shares, tm.unregistered or (workers is not None and not others))
            raise
        self._tm, self._workers = tm, workers
        self._ipc_shares = shares
        self._host_offset = host_offset
        self.device_layout, self.host_layout = layout, host_layout
        logger.info("rank %d/%d of %s attached: %d device blocks, G2 blocks %d at byte %d (%d bytes a block)",
                    self.rank, self.world_size, self.group, layout.num_blocks, self.host_blocks, self.host_offset,
                    layout.config.block_bytes)

    @property
    def host_offset(self) -> int:
        """The byte of the G2 segment where this rank's region starts (with shared_g2: where its
        namespace's part of G2 does)."""
        if self.host_layout is None:
            raise LifecycleError("attach() first: the region's size comes from the tensors' layout")
        return self._host_offset

    def _connect(self, layout: BlockLayout, g2_bytes: int, timeout: float):
        what = f"G2 ({self.world_size} ranks x {self.host_blocks} blocks of {layout.config.block_bytes} bytes)"
        if not self.shared_g2 or self.rank != 0:
            return connect_workers(self.config, g2_bytes, what, start=self.rank == 0, wait=self.rank != 0,
                                   timeout=timeout, engine_id=self.engine_id)
        # Replicas start at once: one rank 0 starts the instance (with a rank's shard layout, for the
        # shared registry, and a region per rank), one that lost the race to its lock waits for the
        # winner's.
        try:
            return connect_workers(self.config, g2_bytes, what, timeout=timeout, engine_id=self.engine_id,
                                   layout=layout.config, idle_exit_s=self.config.shared_idle_exit_s,
                                   g2_ranks=self.world_size)
        except KvbmError as err:
            if find_instance(self.config).state not in ("running", "starting"):
                raise
            logger.info("rank %s: another replica started kvbm-workers %s first (%s); joining it", self.engine_id,
                        self.config.instance_id, err)
            return connect_workers(self.config, g2_bytes, what, start=False, wait=True, timeout=timeout,
                                   engine_id=self.engine_id)

    def _join(self, tm: TransferManager, layout: BlockLayout, host_layout: BlockLayout) -> tuple[BlockLayout, int]:
        """shared_g2: joins the namespace of this model's layout and salt (as an engine of its own:
        the path workers admit a registration that the engine table backs) and returns the host
        layout and G2 offset of that namespace's part of G2."""
        from kvbm.shared_g2 import join_segment, welcome_registry
        info = welcome_registry(tm.welcome, host_layout.block_stride, self.config.instance_id, self.world_size)
        if info is None:
            raise ConfigError(f"kvbm-workers {self.config.instance_id} runs without the shared G2 registry (started "
                              f"without the model's layout, or by an engine that shares nothing): data-parallel "
                              f"replicas cannot share its G2; give each replica its own instance_id")
        g2, lease = join_segment(info["segment"], self.engine_id, layout.config, self.config.salt, self.host_blocks)
        self._g2, self._lease = g2, lease
        part = BlockLayout(layout.config, LayoutType.FULLY_CONTIGUOUS, lease.num_blocks)
        logger.info("rank %s shares G2 %s: namespace %d, blocks [%d, %d)", self.engine_id, g2.name, lease.namespace,
                    lease.block_offset, lease.block_offset + lease.num_blocks)
        # G2 is a region per rank, each a shard of every registry block: this rank's part of the
        # namespace, in its own region.
        region = int(info["blocks"]) * part.block_stride
        return part, self.rank * region + lease.block_offset * part.block_stride

    def _others_attached(self) -> int:
        """shared_g2: live engines of the shared G2 of other replicas (this rank's own group, its
        other ranks and its scheduler side, goes down with it)."""
        if self._g2 is None or self._lease is None:
            return 0
        mine = f"{self.group}/"
        try:
            return sum(1 for e in self._g2.engines() if e["state"] == "live" and not e["engine_id"].startswith(mine))
        except KvbmError:
            return 1   # cannot tell: leave it running (it stops when idle)

    def _leave(self) -> None:
        from kvbm.shared_g2 import leave_segment
        lease, g2, self._lease, self._g2 = self._lease, self._g2, None, None
        leave_segment(g2, lease, f"rank {self.engine_id}")

    @property
    def transfers(self) -> TransferManager:
        if self._tm is None:
            raise LifecycleError(f"rank {self.rank} of {self.group!r}: attach() first")
        return self._tm

    @property
    def workers_process(self) -> WorkersProcess | None:
        return self._workers

    # ---- transfers ---------------------------------------------------------------------------
    def store(self, device_blocks, host_blocks, *, priority: int = 0) -> TransferFuture:
        """Device blocks -> this rank's G2 region (D2H): device_blocks[i] to host block host_blocks[i]."""
        src, dst = self._pairs("store", device_blocks, host_blocks)
        return self.transfers.submit(P.Path.D2H, src, dst, priority=priority)

    def load(self, host_blocks, device_blocks, *, layers: bool = True, priority: int = 1) -> TransferFuture:
        """This rank's G2 region -> device blocks (H2D); with `layers`, future.wait_layer(l) returns
        once layer l has landed in every destination block."""
        src, dst = self._pairs("load", host_blocks, device_blocks)
        return self.transfers.submit(P.Path.H2D, src, dst, priority=priority, layers=layers)

    def _pairs(self, what: str, src, dst) -> tuple[np.ndarray, np.ndarray]:
        """1-D integer block id arrays of one length; the ranges and distinct destinations are
        checked by TransferManager.submit against the registered layouts, before it takes anything."""
        self._check_open()
        arrays = []
        for name, ids in (("source", src), ("destination", dst)):
            arr = np.asarray(ids)
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                raise LayoutError(f"{what}: {name} block ids must be a 1-D sequence of integers, got "
                                  f"{arr.dtype} of shape {arr.shape}")
            arrays.append(arr.astype(np.int64, copy=False))
        if arrays[0].shape != arrays[1].shape:
            raise LayoutError(f"{what}: {arrays[0].shape[0]} source blocks but {arrays[1].shape[0]} destination blocks")
        return arrays[0], arrays[1]

    def stats(self) -> dict[str, Any]:
        return self.transfers.stats()

    # ---- lifetime ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise LifecycleError(f"rank {self.rank} of {self.group!r} is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        dropped = stopped = False
        if self._tm is not None:
            self._tm.close()
            dropped = self._tm.unregistered
            self._tm = None
        others = self._others_attached()
        self._leave()   # after the workers dropped the registration: nothing is held for it
        if self._workers is not None:
            if others:
                # Other replicas use it: it stays, and stops by itself once none is attached.
                logger.info("rank %s: kvbm-workers %s stays for %d other engine(s); it stops %d s after the "
                            "last leaves", self.engine_id, self.config.instance_id, others,
                            self.config.shared_idle_exit_s)
            else:
                self._workers.stop()
                stopped = True   # no worker maps our memory any more
            self._workers = None
        release_ipc_shares(self._ipc_shares, dropped or stopped)
        if self._shared is not None:
            self._shared.close()
            self._shared = None

    def __enter__(self) -> ShardTransfers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
