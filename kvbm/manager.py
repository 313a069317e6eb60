"""KvBlockManager: the public facade an engine (or its connector) talks to.

Parts:
  KvBlockManager   builds one BlockPool per configured tier from a KvbmConfig, answers `match`
                   per tier through the cross-tier TierView, and passes allocate/register/release to
                   the pool of the tier asked for; `stats()` reports every tier; `close()` (or the
                   context manager) shuts down whatever the manager started.
  TierMatch        the answer of `match`: the longest prefix each tier holds.
  Queue hint       `hint_waiting(request_id, hashes)` when a request enters the engine's waiting
                   queue, `hint_done(request_id)` when it is scheduled or dropped: cached blocks
                   that waiting requests will read are evicted after all others, in every tier
                   (kvbm.pools.WaitingHints; research/eviction/POLICY_ROUND2.md section 5).

Workflow of one request: hash its token blocks (kvbm.hashing) -> `match` -> onboard the prefix the
fastest tier holds -> allocate device blocks for the rest -> register them once computed -> release
when the request ends; the runtime (kvbm.transfer, kvbm.workers) moves the bytes between tiers.

Keys: every hash the manager is given (match, register and its parents, hint_waiting, offload,
onboard) becomes a key with the config's salt folded in (kvbm.hashing.salt_keys; `keys(hashes)`
shows them), so managers of different salts never match each other's blocks; without a salt the
keys are the hashes.

Transfers (the runtime's part of this facade): `register_device_tensors(tensors)` connects to the
instance's running kvbm-workers, or starts one as a child for the embedded default, and registers
the engine's KV tensors with its path workers (CUDA IPC handles, or in CPU mode the shared segment
that `create_device_tensors()` placed them in). Then `offload(device_blocks, hashes)` (G1 -> G2,
deduplicated) and `onboard(hashes, device_blocks)` (G2 -> G1, layer progress) return futures;
`scheduler.reached(...)` opens gated transfers. See kvbm/transfer/host_offload.py for the order of
registry calls around each copy.

Shared G2: when kvbm-workers has the shared G2 registry (it runs with the model's layout; the
embedded default does), register_device_tensors joins it right after connecting (`shared_g2` is the
Lease): the namespace is the layout's fingerprint (kvbm.hashing.layout_fingerprint, the disk tier's)
and the salt, the G2 pool becomes the namespace's registry, shared with the other engines of the
namespace, and the host layout its part of G2 (host_offset = block_offset x block stride). close()
leaves it after the workers dropped this engine's registration. With a disk tier the engine joins
the shared G3 too (kvbm.shared_g3: the instance's one store, one slot table for every engine of the
model), and its G3 pool becomes that table.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError, KvbmError, LayoutError, LifecycleError
from kvbm.hashing import salt_keys
from kvbm.pools import BlockPool, Tier, TierView, WaitingHints, only_u64

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TierMatch:
    prefix: dict[Tier, int]  # longest prefix of the asked hashes that each tier holds (G3: own or a peer's)
    onboardable: int = 0     # what onboard(hashes) would load now: G2's prefix, then the G3 run after it
                             # when loading it beats recomputing it (load_rule)
    load_rule: dict | None = None   # the G3 decision: blocks, expected load and recompute seconds, offered

    def best(self) -> tuple[Tier | None, int]:
        """The tier holding the longest prefix (the fastest one on ties) and its length."""
        tier, length = None, 0
        for t in sorted(self.prefix):
            if self.prefix[t] > length:
                tier, length = t, self.prefix[t]
        return tier, length


def _hashes(hashes) -> np.ndarray:
    arr = np.asarray(hashes)
    if arr.ndim != 1:
        raise LayoutError(f"hashes must be a 1-D sequence of u64, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise LayoutError(f"hashes must be integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise LayoutError("hashes must be non-negative u64 values")
    return arr.astype(np.uint64, copy=False)


class KvBlockManager:
    """Tiers G1/G2/G3 of one engine: block metadata here, bytes in the engine and in kvbm-workers."""

    def __init__(self, config: KvbmConfig | None = None, **overrides) -> None:
        if config is None:
            config = KvbmConfig.load(**overrides)
        elif overrides:
            raise ConfigError("pass a KvbmConfig or keyword arguments, not both")
        self.config = config
        self.pools: dict[Tier, BlockPool] = {}
        layout = config.layout
        sizes = {Tier.G1: config.device_blocks}
        if config.host_blocks is not None or config.host_size is not None:
            if config.host_blocks is None and layout is None:
                raise ConfigError("host_size needs a layout to turn bytes into blocks; give host_blocks or layout")
            sizes[Tier.G2] = config.host_blocks if layout is None else config.host_blocks_for(layout)
        if config.disk_blocks or config.disk_size:
            if config.disk_blocks is None and layout is None:
                raise ConfigError("disk_size needs a layout to turn bytes into blocks; give disk_blocks or layout")
            sizes[Tier.G3] = config.disk_blocks if layout is None else config.disk_blocks_for(layout)
        for tier, blocks in sizes.items():
            if blocks:
                self.pools[tier] = BlockPool(tier, blocks, config.policy,
                                             ghost_blocks=config.ghost_blocks_for(blocks))
        if not self.pools:
            raise ConfigError("no tier has any blocks: set device_blocks, host_blocks/host_size "
                              "or disk_blocks/disk_size")
        self.tiers = TierView(self.pools)
        self._hints = WaitingHints(self.pools)
        for pool in self.pools.values():
            pool.hints = self._hints
        self._closed = False
        # Transfer runtime (created by register_device_tensors). The lock guards every pool call:
        # transfer completions register/release G2 blocks on the transfer manager's I/O thread.
        # Code that reaches a registry directly (kv.pool(t).registry) while transfers run holds kv.lock.
        self._lock = threading.RLock()
        self.lock = self._lock
        self._workers = None       # WorkersProcess this manager started, if any
        self._transfers = None     # TransferManager
        self._host = None          # HostTransfers over the G2 pool
        self._shared = None        # SharedBuffers of CPU-mode device tensors
        self._ipc_shares: list = []  # CUDA: the aliases the workers map (memory_map); dropped after them
        self._disk = None          # DiskTransfers over the G3 pool (with a disk tier)
        self._g2 = None            # the shared G2 registry (SharedG2), when kvbm-workers has one
        self._lease = None         # this engine's membership of it: its G2 pool is the namespace's
        self._g3 = None            # its membership of the shared G3 (SharedG3): its G3 pool is the store's table
        self.device_layout = None

    # ---- metadata API ---------------------------------------------------------------------------
    def keys(self, hashes) -> np.ndarray:
        """The keys this manager stores for sequence hashes: the config's salt folded in
        (kvbm.hashing.salt_keys); the hashes themselves without a salt."""
        return salt_keys(_hashes(hashes), self.config.salt)

    def pool(self, tier: Tier | int) -> BlockPool:
        self._check_open()
        try:
            return self.pools[Tier(tier)]
        except (KeyError, ValueError) as err:
            raise ConfigError(f"tier {tier!r} is not configured; configured: {[t.name for t in self.pools]}") from err

    def match(self, hashes) -> TierMatch:
        """The longest prefix of `hashes` that each tier holds (nothing is acquired), and what
        onboard would load: G2's prefix, then the run G3 holds after it, where the load rule says
        reading it is faster than recomputing it."""
        self._check_open()
        keys = self.keys(hashes)
        disk = self._disk
        with self._lock:
            prefix = self.tiers.prefix_lengths(keys)
            if disk is None:
                return TierMatch(prefix, prefix.get(Tier.G2, 0))
            prefix[Tier.G3] = disk.prefix(keys)
            k2, k3, offered = disk.plan(keys)
            rule = {"blocks": k3, "load_s": disk.rule.load_s(k3), "recompute_s": disk.rule.recompute_s(k3),
                    "offered": offered}
        disk.maybe_refresh()
        return TierMatch(prefix, k2 + (k3 if offered else 0), rule)

    def allocate(self, n: int, tier: Tier | int = Tier.G1) -> np.ndarray | None:
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise KvbmError(f"allocate needs a non-negative block count, got {n!r}")
        with self._lock:
            return self.pool(tier).allocate(int(n))

    def register(self, blocks, hashes, parents=None, tier: Tier | int = Tier.G1,
                 has_parent=None) -> np.ndarray:
        """Registers freshly filled blocks under their sequence hashes; returns the canonical block per slot.

        `parents` (u64 per block) links each block to its parent's sequence hash for lineage-aware
        eviction; `has_parent` (bool per block) marks which slots have one (default: all, when
        parents are given). A hash the tier already holds answers with the existing block and frees
        the duplicate.
        """
        pool = self.pool(tier)
        with self._lock:
            # Everything register could refuse is checked before complete(): a refused call leaves
            # the blocks PARTIAL, as they were, so the caller can retry.
            hashes = self.keys(hashes)
            if len(np.atleast_1d(blocks)) != len(hashes):
                raise LayoutError(f"register got {len(np.atleast_1d(blocks))} blocks and {len(hashes)} hashes")
            if parents is not None:
                parents = self.keys(parents)
                if len(parents) != len(hashes):
                    raise LayoutError(f"register got {len(parents)} parents for {len(hashes)} hashes")
            if has_parent is not None:
                if parents is None:
                    raise LayoutError("register got has_parent without parents")
                has_parent = np.asarray(has_parent)
                if has_parent.shape != hashes.shape or has_parent.dtype != np.bool_:
                    raise LayoutError(f"has_parent must be {len(hashes)} bools, got {has_parent.dtype} "
                                    f"shape {has_parent.shape}")
            pool.complete(blocks)
            return pool.register(blocks, hashes, parents, has_parent)

    def release(self, blocks, tier: Tier | int = Tier.G1) -> None:
        with self._lock:
            self.pool(tier).release(blocks)

    # ---- queue hint -----------------------------------------------------------------------------
    def hint_waiting(self, request_id, hashes) -> int:
        """A request entered the engine's waiting queue and will read these sequence hashes.

        While at least one waiting request reads a hash, every tier's block for it has eviction
        priority 1 (evicted after every priority-0 block), and so does a block registered under it
        later (computed, offloaded or onboarded meanwhile). Call `hint_done(request_id)` when the
        request is scheduled or dropped. `request_id`: any hashable, not already waiting. Returns
        how many hashes became hinted (those no other waiting request reads). Bad input raises
        KvbmError and changes nothing.
        """
        self._check_open()
        hashes = self.keys(hashes)
        with self._lock:
            return self._hints.add(request_id, hashes)

    def hint_done(self, request_id) -> int:
        """The request left the waiting queue: hashes no other waiting request reads go back to
        priority 0 (their blocks are evicted in policy order again). Returns how many did.
        KvbmError if the request is not waiting."""
        self._check_open()
        with self._lock:
            return self._hints.done(request_id)

    @property
    def num_waiting(self) -> int:
        """Requests hinted as waiting (hint_waiting without hint_done yet)."""
        return len(self._hints.waiting)

    def stats(self) -> dict[str, dict]:
        self._check_open()
        with self._lock:
            out = {tier.name: pool.snapshot() for tier, pool in self.pools.items()}
        if self._transfers is not None:
            out["transfers"] = self._transfers.stats()
        if self._disk is not None:
            out["disk"] = self._disk.stats()
        return out

    # ---- transfers (runtime) --------------------------------------------------------------------
    def create_device_tensors(self, layout=None, device: str | None = None) -> list:
        """KV buffers the workers can reach: CUDA tensors on `device`, or, in CPU mode (no CUDA,
        or force_cpu), uint8 tensors in a 0600 shared segment (the emulated device)."""
        from kvbm.layout import BlockLayout, LayoutType
        from kvbm.shm import SharedBuffers
        self._check_open()
        if layout is None:
            if self.config.layout is None or not self.config.device_blocks:
                raise ConfigError("create_device_tensors needs a layout, or config.layout and device_blocks")
            layout = BlockLayout(self.config.layout, LayoutType.LAYER_SEPARATE, self.config.device_blocks)
        self.device_layout = layout
        if device is None:
            import kvbm
            device = "cuda" if kvbm.cuda_available() and not self.config.force_cpu else "cpu"
        if device.startswith("cuda"):
            return layout.allocate(device=device)
        if self._shared is not None:
            raise LifecycleError("CPU-mode device tensors were already created for this manager")
        self._shared = SharedBuffers.emulated_device(
            (layout.buffer_bytes,), "uint8", layout.num_buffers(), self.config.instance_id,
            f"the CPU-mode emulated device ({layout.num_blocks} blocks of {layout.config.block_bytes} bytes)")
        return list(self._shared.tensors)

    def register_device_tensors(self, tensors, layout=None, start: bool | None = None,
                                timeout: float = 60.0) -> None:
        """Connects to kvbm-workers (starting one unless start=False, when none runs) and registers
        the engine's KV tensors with every path worker."""
        from kvbm.layout import BlockLayout, LayoutType, detect_layout
        from kvbm.transfer.disk_offload import DiskTransfers
        from kvbm.transfer.host_offload import HostTransfers
        from kvbm.transfer.launcher import connect_workers
        from kvbm.transfer.memory_map import worker_memory
        from kvbm.wire import protocol as P
        self._check_open()
        if Tier.G2 not in self.pools:
            raise ConfigError("transfers need a host tier: set host_blocks or host_size")
        if layout is None:
            layout = self.device_layout if self.device_layout is not None else detect_layout(tensors)
        tensors = [tensors] if not isinstance(tensors, (list, tuple)) else list(tensors)
        if self.config.layout is not None and self.config.layout.block_bytes != layout.config.block_bytes:
            raise ConfigError(f"device tensors hold {layout.config.block_bytes}-byte blocks, config.layout "
                              f"{self.config.layout.block_bytes}")
        self.device_layout = layout
        host_pool = self.pools[Tier.G2]
        host_layout = BlockLayout(layout.config, LayoutType.FULLY_CONTIGUOUS, host_pool.num_blocks)
        shares: list = []
        memory = worker_memory(tensors, layout, self._shared, shares)
        if self._transfers is None:
            tm, self._workers = connect_workers(
                self.config, host_layout.total_bytes,
                f"G2 ({host_layout.num_blocks} blocks of {layout.config.block_bytes} bytes)",
                start=start is not False, timeout=timeout, stats_fn=self._pool_report, layout=layout.config)
            self._transfers = tm
            try:
                self._join_shared_g2(tm, layout.config)
            except BaseException:
                self._leave_shared_g2()
                tm.close()
                self._transfers = None
                self._stop_workers()
                raise
            self._host = HostTransfers(tm, self.pools[Tier.G2], self._lock)
        host_pool = self.pools[Tier.G2]      # the shared G2's namespace, when it joined one
        host_layout = BlockLayout(layout.config, LayoutType.FULLY_CONTIGUOUS, host_pool.num_blocks)
        host_offset = self._lease.block_offset * host_layout.block_stride if self._lease is not None else 0
        disk = self._disk_store(layout)
        if disk is not None and P.Path.H2DISK not in self._transfers.paths:
            raise ConfigError(f"this engine has a disk tier but kvbm-workers {self.config.instance_id} runs without "
                              f"one: start it with the same disk_path and disk_size/disk_blocks")
        try:
            self._transfers.register(layout, host_layout, memory, timeout, disk=disk, host_offset=host_offset)
        except BaseException:
            self._ipc_shares.extend(shares)   # a worker may have opened them: dropped at close, in order
            raise
        # Every worker now maps the new shares and has dropped the previous ones (a worker closes
        # an engine's old memory before opening the new; a later generation gets only the new).
        self._ipc_shares, old = shares, self._ipc_shares
        del old
        if disk is not None and self._disk is None:
            self._disk = DiskTransfers(self._transfers, self._host, host_pool, self.pools[Tier.G3], self._lock,
                                       page_size=layout.config.page_size, admission=self.config.disk_admission,
                                       prefill_tokens_per_s=self.config.prefill_tokens_per_s,
                                       max_batch_blocks=self._transfers.max_batch_blocks,
                                       chunk_blocks=self.config.disk_onboard_chunk_blocks
                                       or self.config.disk_read_blocks * self.config.disk_read_inflight,
                                       shared=self._g3)
            self._disk.sync(timeout)
        if self._disk is not None:
            self._disk.worker_info = self._transfers.worker_info(P.Path.H2DISK)

    def _join_shared_g2(self, tm, layout) -> None:
        """With the shared G2 registry (named in kvbm-workers' welcome), this engine joins the
        namespace of its layout and salt, and its G2 pool becomes that namespace's registry: the
        blocks, and the cache, that every engine of the namespace shares (kvbm.shared_g2). Without
        one, the engine keeps its own G2 registry and is alone on the instance."""
        from kvbm.shared_g2 import welcome_registry
        info = welcome_registry(tm.welcome, layout.block_stride, self.config.instance_id)
        if info is not None:
            self._join_registry(info["segment"], tm.engine_id, layout, tm.welcome or {})

    def join_shared_g2(self, layout, *, engine_id: str, timeout: float = 60.0) -> None:
        """Metadata-only engines (the vLLM connector's scheduler side of a data-parallel replica):
        joins the shared G2 of the instance's running kvbm-workers (waiting up to `timeout` for it:
        the engine's device side starts it) in the namespace of `layout` (the model's LayoutConfig)
        and the salt, so that this manager's G2 pool is the namespace's registry, as a device-side
        engine's is after register_device_tensors. ConfigError when the instance has no shared
        registry (it was started without the model's layout)."""
        from kvbm.shared_g2 import welcome_registry
        from kvbm.transfer.launcher import connect_workers
        self._check_open()
        if self._lease is not None:
            raise LifecycleError(f"engine {self._lease.engine_id} has joined the shared G2 already")
        # The welcome names the registry; this manager moves no bytes, so the connection goes again.
        tm, _ = connect_workers(self.config, 0, "G2", start=False, wait=True, timeout=timeout,
                                engine_id=f"{engine_id}/hello")
        try:
            welcome = dict(tm.welcome or {})
        finally:
            tm.close()
        info = welcome_registry(welcome, layout.block_stride, self.config.instance_id)
        if info is None:
            raise ConfigError(f"kvbm-workers {self.config.instance_id} runs without the shared G2 registry (started "
                              f"without the model's layout): engines cannot share its G2")
        self._join_registry(info["segment"], engine_id, layout, welcome)

    def _join_registry(self, segment: str, engine_id: str, layout, welcome: dict) -> None:
        from kvbm.shared_g2 import join_segment
        own = self.pools[Tier.G2]
        g2, lease = join_segment(segment, engine_id, layout, self.config.salt, own.num_blocks)
        self._g2, self._lease = g2, lease
        if welcome.get("disk") and Tier.G3 in self.pools:
            self._join_g3(welcome, engine_id, layout)
        if own.registry.num_free != own.num_blocks:
            logger.warning("engine %s: its own G2 registry held %d blocks; they are dropped for the shared G2's",
                           engine_id, own.num_blocks - own.registry.num_free)
        pool = BlockPool.over(Tier.G2, lease.registry, self.config.policy)
        pool.hints = self._hints
        self.pools[Tier.G2] = pool     # the same dict as self.tiers' and self._hints'
        logger.info("engine %s shares G2 %s: namespace %d, blocks [%d, %d)", engine_id, g2.name, lease.namespace,
                    lease.block_offset, lease.block_offset + lease.num_blocks)

    def _join_g3(self, welcome: dict, engine_id: str, layout) -> None:
        """The disk tier of an instance with the shared G3 (kvbm-workers started with the model's
        layout and a disk tier): the engine joins it, and its table becomes this engine's G3 pool
        (kvbm.shared_g3)."""
        import os

        from kvbm.shared_g3 import SharedG3, welcome_g3
        info = welcome_g3(welcome)
        if info is None:
            raise ConfigError(f"kvbm-workers {self.config.instance_id} has a disk tier but no shared G3 slot table "
                              f"(a kvbm-workers of another version?): restart it with this kvbm")
        own = self.pools[Tier.G3]
        g3 = SharedG3(info, engine_id, os.getpid(), layout, self.config.salt)
        if g3.num_blocks != own.num_blocks:
            g3.close()
            raise ConfigError(f"kvbm-workers {self.config.instance_id}'s disk tier has {info.get('blocks')} slots; "
                              f"this engine's G3 has {own.num_blocks} blocks: start both with the same "
                              f"disk_blocks/disk_size")
        self._g3 = g3
        pool = BlockPool.over(Tier.G3, g3.lease.registry, self.config.policy)
        pool.hints = self._hints
        self.pools[Tier.G3] = pool
        logger.info("engine %s shares G3 %s: %d slots", engine_id, info["segment"], g3.num_blocks)

    @property
    def shared_g2(self):
        """This engine's Lease of the shared G2 (kvbm.shared_g2), or None."""
        return self._lease

    def attach_disk_tier(self, layout, *, engine_id: str, group: str = "", timeout: float = 60.0):
        """Metadata-only engines (the vLLM connector's scheduler side): connects to the instance's
        running kvbm-workers (waiting up to `timeout` for it; never starts one: the engine's device
        side did) and registers with its disk worker only, over this manager's G2 (FULLY_CONTIGUOUS,
        G2's block count, `layout`'s block bytes: the layout the device side registered, whose
        fingerprint the disk store checks) without device memory. Returns the DiskTransfers over
        G2 and G3, synced with the store (a warm restart's blocks are in G3): stage() reads G3 into
        G2; whoever copies G2 to the device is not this manager. When the instance shares its G3
        (kvbm.shared_g3) the manager joins it as `engine_id` first, unless join_shared_g2 (call it
        first, with the same engine_id) did; with the shared G2 it registers its namespace's part."""
        from kvbm.layout import BlockLayout, LayoutType
        from kvbm.transfer.disk_offload import DiskTransfers
        from kvbm.transfer.launcher import connect_workers
        from kvbm.wire import protocol as P
        self._check_open()
        if Tier.G2 not in self.pools or Tier.G3 not in self.pools:
            raise ConfigError("attach_disk_tier needs a host tier (host_blocks) and a disk tier (disk_path and "
                              "disk_blocks/disk_size)")
        if self._transfers is not None:
            raise LifecycleError("this manager already has a transfer runtime")
        host_pool = self.pools[Tier.G2]
        host_layout = BlockLayout(layout.config, LayoutType.FULLY_CONTIGUOUS, host_pool.num_blocks)
        host_offset = self._lease.block_offset * host_layout.block_stride if self._lease is not None else 0
        tm, _ = connect_workers(self.config, host_layout.total_bytes, "G2", start=False, wait=True,
                                timeout=timeout, engine_id=engine_id, stats_fn=self._pool_report)
        joined, own_g3 = False, self.pools[Tier.G3]
        try:
            if P.Path.H2DISK not in tm.paths:
                raise ConfigError(f"this engine has a disk tier but kvbm-workers {self.config.instance_id} runs "
                                  f"without one: start it with the same disk_path and disk_size/disk_blocks")
            if self._g3 is None and (tm.welcome or {}).get("g3"):
                self._join_g3(tm.welcome, engine_id, layout.config)
                joined = True
            tm.register(layout, host_layout, None, timeout, disk=self._disk_store(layout), group=group,
                        paths=P.DISK_PATHS, host_offset=host_offset)
            disk = DiskTransfers(tm, None, host_pool, self.pools[Tier.G3], self._lock,
                                 page_size=layout.config.page_size, admission=self.config.disk_admission,
                                 prefill_tokens_per_s=self.config.prefill_tokens_per_s,
                                 max_batch_blocks=tm.max_batch_blocks, shared=self._g3)
            disk.sync(timeout)
            disk.worker_info = tm.worker_info(P.Path.H2DISK)
        except BaseException:
            tm.close()
            if joined:
                self._g3, g3 = None, self._g3
                g3.close()
                self.pools[Tier.G3] = own_g3     # this manager's own G3 pool again
            raise
        self._transfers, self._disk = tm, disk
        self.device_layout = layout
        return disk

    @property
    def disk(self):
        """The DiskTransfers of this manager's G3 (None without a connected disk tier)."""
        return self._disk

    def _disk_store(self, layout) -> dict | None:
        """What the disk worker opens for this engine's G3: slots, layout fingerprint, model id."""
        if Tier.G3 not in self.pools:
            return None
        from kvbm.hashing import layout_fingerprint, model_id
        return {"blocks": self.pools[Tier.G3].num_blocks, "fingerprint": layout_fingerprint(layout.config),
                "model": model_id(self.config.salt), "cold": self.config.disk_cold_start}

    def flush_disk(self, timeout: float = 30.0) -> None:
        """Waits until the G3 writes in flight (admitted G2 blocks on their way to disk) have landed."""
        self._check_open()
        if self._disk is not None:
            self._disk.flush(timeout)

    def refresh_disk(self, timeout: float = 10.0) -> None:
        """Reads the journals of the other instances in disk_path again (those that changed) and
        waits; match() also does it, without waiting, every few seconds."""
        self._check_open()
        if self._disk is None:
            raise LifecycleError("no disk tier is connected (disk_path and disk_size/disk_blocks, then "
                                 "register_device_tensors)")
        self._disk.refresh(timeout)

    def _pool_report(self) -> dict:
        with self._lock:
            return {tier.name.lower(): {"blocks": pool.num_blocks,
                                         "used": pool.num_blocks - pool.registry.num_free,
                                         "inactive": pool.registry.num_inactive}
                    for tier, pool in self.pools.items()}

    def _transfer_api(self):
        self._check_open()
        if self._host is None:
            raise LifecycleError("register_device_tensors() first: no transfer runtime is connected")
        return self._host

    def offload(self, device_blocks, hashes, **kwargs: Any):
        """G1 -> G2. A future whose result().value is an OffloadResult (moved vs already held);
        TransferError when the copy failed (nothing was registered). kwargs: parents, priority,
        gate, block, timeout."""
        transfers = self._transfer_api()
        if kwargs.get("parents") is not None:
            kwargs["parents"] = self._one_key(kwargs["parents"]) or self.keys(kwargs["parents"])
        return transfers.offload(device_blocks, self._one_key(hashes) or self.keys(hashes), **kwargs)

    def _one_key(self, hashes) -> list[int] | None:
        """keys() of one hash (a one-int list or tuple, or a one-element integer array) as a
        one-int list: the offload's plain-int path (kvbm.transfer.host_offload._one_block); None
        for anything else."""
        h = only_u64(hashes)
        if h is None:
            return None
        if not self.config.salt:
            return [h]
        return [int(salt_keys(np.array((h,), np.uint64), self.config.salt)[0])]

    def onboard(self, hashes, device_blocks, **kwargs: Any):
        """G2 -> G1 for the longest prefix of hashes G2 holds, and with a disk tier G3 -> G1 for the
        run G3 holds after it (where the load rule offers it): one future (wait_layer(l) for layer
        progress) whose result().value is an OnboardResult (from_host, from_disk, read_path);
        TransferError when any part failed (nothing is reported loaded then). kwargs: priority,
        gate, layers, block, timeout."""
        api = self._transfer_api()
        if self._disk is not None:
            return self._disk.onboard(self.keys(hashes), device_blocks, **kwargs)
        return api.onboard(self.keys(hashes), device_blocks, **kwargs)

    @property
    def scheduler(self):
        """The Scheduler of gated transfers: scheduler.reached(iteration=...) / (layer=...)."""
        if self._transfers is None:
            raise LifecycleError("register_device_tensors() first: no transfer runtime is connected")
        return self._transfers.scheduler

    @property
    def transfers(self):
        return self._transfers

    @property
    def workers_process(self):
        return self._workers

    def _stop_workers(self) -> None:
        if self._workers is not None:
            self._workers.stop()
            self._workers = None

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        dropped = False
        if self._transfers is not None:
            self._transfers.close()
            dropped = self._transfers.unregistered
            self._transfers = None
            self._host = None
            self._disk = None
        self._leave_shared_g2()   # after the workers dropped our registration: nothing is quarantined
        stopped = self._workers is not None   # ours: stopped below, so no worker maps our memory after
        self._stop_workers()
        from kvbm.transfer.memory_map import release_ipc_shares
        release_ipc_shares(self._ipc_shares, dropped or stopped)
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        logger.debug("KvBlockManager %s closed", self.config.instance_id)

    def _leave_shared_g2(self) -> None:
        from kvbm.shared_g2 import leave_segment
        lease, g2, self._lease, self._g2 = self._lease, self._g2, None, None
        g3, self._g3 = self._g3, None
        try:
            leave_segment(g2, lease, f"engine {lease.engine_id if lease is not None else ''}")
        finally:
            if g3 is not None:
                g3.close()

    def _check_open(self) -> None:
        if self._closed:
            raise LifecycleError("KvBlockManager is closed")

    def __enter__(self) -> KvBlockManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
