"""KvbmConnector: kvbm as a vLLM V1 KV connector (KVConnectorBase_V1, vLLM 0.33's three-argument form).

    vllm serve MODEL --kv-transfer-config '{"kv_connector":"KvbmConnector",
        "kv_connector_module_path":"kvbm.integrations.vllm","kv_role":"kv_both"}'

Parts:
  KvbmConnector          one class, two roles. SCHEDULER: a SchedulerSide over a metadata-only
                         KvBlockManager (the G2 pool; with a disk tier also G3, registered with the
                         engine's disk worker). WORKER (one per TP rank): a WorkerSide over a
                         ShardTransfers registered with the engine's kvbm-workers (rank 0 starts it
                         when none runs).
  KvbmConnectorMetadata  the StepPlan vLLM carries from the scheduler to every rank
  KvbmWorkerMetadata     a rank's RankReport; vLLM merges the ranks' with `aggregate`
  connector_settings     the KvbmConfig of an engine: KVBM_* / DYN_KVBM_* / config file, then the
                         connector's kv_connector_extra_config (its keys are KvbmConfig fields)

Loads are asynchronous by default (vLLM's WAITING_FOR_REMOTE_KVS): a request with a G2 hit waits
until every rank's H2D has landed, then runs; a failed load names its device blocks (vLLM recomputes
them) and is still reported finished, as vLLM requires. With `"vllm_load": "layerwise"` in
kv_connector_extra_config the request runs in the step its load starts: the H2D is submitted in
start_load_kv and each attention layer waits in wait_for_layer_load for that layer only (kvbm's
per-layer progress), so the copy of layer l+1 overlaps the compute of layer l; a failed layer-wise
load names its blocks in the same step. Stores run after each forward pass (wait_for_save) for
every block that became full; vLLM keeps a finished request's blocks until its stores are done
(request_finished -> True, then finished_sending), and waits for the stores of a preempted request
before reusing its blocks (handle_preemptions).

The disk tier (G3: disk_path and disk_size/disk_blocks, e.g. in kv_connector_extra_config; TP 1):
the workers' kvbm-workers runs the disk worker; the scheduler side, created after the workers
registered (vLLM builds its scheduler once the KV caches exist), connects to it, registers with
the disk worker only (KvBlockManager.attach_disk_tier, over G2's layout from kv_cache_config's
spec: the layout the rank registered, which the rank checks) and keeps G3's registry. G2 blocks go
to G3 by the admission rule (disk_admission); a lookup offers G3's run after G2's prefix (when the
LoadRule says loading beats recomputing); such a load waits asynchronously for the G3 read into
G2 (checksums verified), then runs as a G2 load. A G3 read that is not intact is never loaded:
vLLM recomputes those blocks.

Keys: vLLM's block hashes (request.block_hashes, one per hash_block_size tokens; the hash at a
block's last sub-block names the block) folded to u64 the way vLLM folds them for its own KV events
(the low 64 bits, big-endian: `vllm_key`), so without a salt kvbm's events name blocks as vLLM's
do; salted by the manager. They survive a restart (and match across engines sharing kvbm) only when vLLM's hash
is reproducible: sha256 / sha256_cbor, or a fixed PYTHONHASHSEED with xxhash; the start-up log
says so when it is not.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError
from kvbm.integrations.events import KvEventPublisher, PoolEventRecorder, to_vllm
from kvbm.integrations.vllm.plan import RankReport, StepPlan
from kvbm.integrations.vllm.scheduler_side import SchedulerSide
from kvbm.integrations.vllm.worker_side import WorkerSide
from kvbm.pools import Tier

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

DEFAULT_HOST_BYTES = 4 << 30   # G2 when nothing sets it (vLLM's own CPU offloading defaults to 8 GB)


class KvbmConnectorMetadata(KVConnectorMetadata):
    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class KvbmWorkerMetadata(KVConnectorWorkerMetadata):
    def __init__(self, report: RankReport) -> None:
        self.report = report

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, KvbmWorkerMetadata):
            return self
        return KvbmWorkerMetadata(self.report.merge(other.report))


def vllm_key(block_hash: bytes) -> int:
    """vLLM's block hash as the u64 vLLM's KV events use (maybe_convert_block_hash)."""
    return int.from_bytes(block_hash[-8:], "big")


def connector_settings(vllm_config: VllmConfig, extra: dict[str, Any] | None) -> KvbmConfig:
    """The engine's KvbmConfig. kv_connector_extra_config entries that name KvbmConfig fields are
    keyword arguments (above the environment); the instance id defaults to one per vLLM engine,
    so the scheduler and every rank of it meet the same kvbm-workers."""
    fields = {f.name for f in dataclasses.fields(KvbmConfig)}
    extra = dict(extra or {})
    unknown = sorted(k for k in extra if k not in fields and not k.startswith("vllm_"))
    if unknown:
        raise ConfigError(f"kv_connector_extra_config: unknown kvbm settings {unknown}; known: {sorted(fields)}")
    overrides = {k: v for k, v in extra.items() if k in fields}
    derived = "instance_id" not in overrides and not os.environ.get("KVBM_INSTANCE_ID")
    if derived:
        engine = "".join(c for c in str(vllm_config.instance_id) if c.isalnum())[-20:] or "0"
        overrides["instance_id"] = f"vllm-{engine}"
    return KvbmConfig.load(**overrides)


def dp_shares_g2(vllm_config: VllmConfig, config: KvbmConfig) -> bool:
    """Data-parallel replicas share one kvbm-workers, one G2 and its registry (kvbm.shared_g2): a
    block any replica offloaded is a hit for every replica (with tensor parallelism, G2 holds a
    region per rank, and rank r of every replica uses region r). With a disk tier they share its
    store and slot table too (kvbm.shared_g3)."""
    return vllm_config.parallel_config.data_parallel_size > 1


def _attention_shape(kv_cache_config: KVCacheConfig) -> tuple[int, list[str], int]:
    """(tokens per block, layer names in order, bytes of one block of this rank, all layers)."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ConfigError(f"kvbm's vLLM connector supports models with one KV cache group (full attention or "
                          f"MLA); this one has {len(groups)}")
    spec = groups[0].kv_cache_spec
    layers = list(groups[0].layer_names)
    return spec.block_size, layers, spec.page_size_bytes * len(layers)


def _spec_layout(kv_cache_config: KVCacheConfig):
    """The LayoutConfig of one block of this rank, from the KV cache group's spec: what
    kvbm.layout.detect_layout finds in the tensors vLLM allocates for it (per layer [2, num_blocks,
    block_size, heads, head_dim], or MLA's [num_blocks, block_size, dim])."""
    from kvbm.layout import LayoutConfig, dtype_name
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    layers = len(kv_cache_config.kv_cache_groups[0].layer_names)
    mla = type(spec).__name__.startswith("MLA")
    return LayoutConfig(num_layers=layers, outer_dim=1 if mla else 2, page_size=spec.block_size,
                        inner_dim=spec.num_kv_heads * spec.head_size, dtype=dtype_name(spec.dtype))


def _has_disk(config: KvbmConfig) -> bool:
    return bool(config.disk_path and (config.disk_blocks or config.disk_size))


def _load_mode(extra: dict) -> str:
    mode = str(extra.get("vllm_load", "async"))
    if mode not in ("async", "layerwise"):
        raise ConfigError(f"kv_connector_extra_config.vllm_load: 'async' or 'layerwise', got {mode!r}")
    return mode


class KvbmConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.HOST

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return _load_mode(extra_config or {}) == "layerwise"   # wait_for_layer_load runs between graph pieces

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config) -> bool:
        return False   # kvbm-workers map the KV tensors through CUDA IPC: a remap behind them is not followed

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> str | None:
        return "NHD"   # contiguous per-layer tensors [2, blocks, block_size, heads, head_dim]: whole blocks copy

    def reset_cache(self) -> bool | None:
        """vLLM's reset_prefix_cache(reset_connector=True): G2 forgets every block (False while a
        transfer runs, or with a disk tier: see SchedulerSide.reset)."""
        if self.scheduler is None:
            return None
        return self.scheduler.reset()

    @property
    def requires_kv_delivery(self) -> bool:
        return False   # a cache: a dropped store is a later miss, never wrong output

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise ConfigError("kvbm's vLLM connector does not support pipeline parallelism yet (tensor parallel only)")
        self.world_size = parallel.tensor_parallel_size
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            # vLLM's default ("fail") ends a request whose load failed; for a cache a failed load
            # (a corrupt or vanished G3 block, a dead worker) is a miss: recompute it.
            logger.warning("kvbm connector: kv_load_failure_policy %r -> 'recompute' (a failed load is recomputed, "
                           "never an error to the client)", self._kv_transfer_config.kv_load_failure_policy)
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.layerwise = _load_mode(extra) == "layerwise"
        self.config = connector_settings(vllm_config, extra)
        self.block_tokens, self.layer_names, self.shard_block_bytes = _attention_shape(kv_cache_config)
        hash_tokens = kv_cache_config.hash_block_size or vllm_config.cache_config.block_size
        if self.block_tokens % hash_tokens:
            raise ConfigError(f"vLLM block of {self.block_tokens} tokens is not a multiple of its hash block "
                              f"({hash_tokens} tokens)")
        self.hashes_per_block = self.block_tokens // hash_tokens
        self.device_blocks = kv_cache_config.num_blocks
        self.disk = _has_disk(self.config)
        if self.disk and self.world_size > 1:
            raise ConfigError(f"kvbm connector: the disk tier (disk_path {self.config.disk_path}) with tensor "
                              f"parallelism is not supported yet (tensor_parallel_size {self.world_size}: a G3 "
                              f"block would hold one rank's shard); run TP > 1 without a disk tier (G2 only)")
        self.shared_g2 = dp_shares_g2(vllm_config, self.config)
        # Ranks register as "<group>/r<rank>": replicas that share the instance need groups of their own.
        self.group = f"{self.config.instance_id}-dp{parallel.data_parallel_rank}" if self.shared_g2 \
            else self.config.instance_id
        self.layout = _spec_layout(kv_cache_config) if self.disk or self.shared_g2 else None
        self.host_blocks = self._host_blocks()
        self._keys: dict[str, tuple[bytes, np.ndarray]] = {}   # req -> (hash of its last folded block, keys)
        self._requests: dict[str, Request] = {}
        self._local_tokens: dict[str, tuple[int, bool]] = {}  # req -> (vLLM's own prefix, G3 part?) at the last lookup
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        self._transfers = None
        self._collected = None
        self._manager = None
        self._cuda = False
        self._metrics_server = None
        self._publisher = None
        self.metrics = None
        self.events = None
        if role == KVConnectorRole.SCHEDULER:
            self._start_scheduler(vllm_config)
        logger.info("kvbm connector (%s): G2 %d blocks of %d bytes x %d ranks, instance %s", role.name,
                    self.host_blocks, self.shard_block_bytes, self.world_size, self.config.instance_id)

    def _host_blocks(self) -> int:
        c = self.config
        if c.host_blocks:
            return c.host_blocks
        size = c.host_size or DEFAULT_HOST_BYTES
        blocks = size // (self.shard_block_bytes * self.world_size)
        if blocks < 1:
            raise ConfigError(f"G2 of {size} bytes holds no block of {self.shard_block_bytes * self.world_size} "
                              f"bytes (all ranks)")
        return blocks

    # ---- scheduler role -------------------------------------------------------------------------
    def _start_scheduler(self, vllm_config: VllmConfig) -> None:
        from kvbm.manager import KvBlockManager
        _warn_unreproducible_hashes(vllm_config)
        c = self.config
        if self.disk:
            meta_config = dataclasses.replace(c, host_blocks=self.host_blocks, host_size=None, device_blocks=0,
                                              disk_blocks=c.disk_blocks_for(self.layout), disk_size=None)
        else:
            meta_config = dataclasses.replace(c, host_blocks=self.host_blocks, host_size=None, device_blocks=0,
                                              disk_blocks=None, disk_size=None, disk_path=None)
        self._manager = KvBlockManager(meta_config)
        disk = None
        try:
            if self.shared_g2:
                # The replica's ranks started or found the instance before vLLM builds its scheduler;
                # this side picks G2 block ids in the namespace they registered (the same layout),
                # and with a disk tier joins its shared G3 (before registering with the disk worker).
                self._manager.join_shared_g2(self.layout, engine_id=f"{self.group}/sched")
            if self.disk:
                from kvbm.layout import BlockLayout, LayoutType
                device = BlockLayout(self.layout, LayoutType.LAYER_SEPARATE, self.device_blocks)
                disk = self._manager.attach_disk_tier(device, engine_id=f"{self.group}/sched", group=self.group)
                logger.info("kvbm connector: G3 %d blocks in %s (%s admission), %d found on disk",
                            self._manager.pools[Tier.G3].num_blocks, c.disk_path, c.disk_admission,
                            self._manager.pools[Tier.G3].registry.num_inactive)
        except BaseException:
            self._manager.close()
            raise
        from kvbm.metrics import EngineMetrics, serve_engine
        self.metrics = EngineMetrics()
        self.events = PoolEventRecorder(self.block_tokens)
        self.scheduler = SchedulerSide(self._manager, self.block_tokens, self.world_size,
                                       self.shard_block_bytes * self.world_size, self.events, self.metrics, disk)
        if c.engine_metrics_port is not None:
            self._metrics_server = serve_engine(self.metrics.registry, c.engine_metrics_port, c.engine_metrics_host)
            logger.info("kvbm connector: engine metrics at %s", self._metrics_server.url)
        if c.events_endpoint:
            self._publisher = KvEventPublisher(c.events_endpoint, c.events_replay_endpoint)
            logger.info("kvbm connector: KV events on %s (replay %s)", self._publisher.endpoint,
                        self._publisher.replay_endpoint)

    def _request_keys(self, request: Request) -> np.ndarray:
        """u64 keys of the request's full blocks, folded once per hash (cached per request)."""
        hashes = request.block_hashes
        step = self.hashes_per_block
        last, keys = self._keys.get(request.request_id, (None, np.empty(0, np.uint64)))
        # vLLM recomputes a request's hashes at times (block_hashes cleared and rebuilt): the cache
        # holds only while the hash of its last folded block is still there.
        if len(keys) and (len(hashes) < len(keys) * step or hashes[len(keys) * step - 1] != last):
            keys = np.empty(0, np.uint64)
        full = len(hashes) // step
        if full > len(keys):
            new = [vllm_key(hashes[i * step + step - 1]) for i in range(len(keys), full)]
            keys = np.concatenate([keys, self._manager.keys(np.asarray(new, dtype=np.uint64))])
            self._keys[request.request_id] = (hashes[full * step - 1], keys)
        return keys

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.scheduler is None or getattr(request, "skip_reading_prefix_cache", False):
            return 0, False
        host, disk = self.scheduler.lookup_tiers(self._request_keys(request), num_computed_tokens,
                                                 request.num_tokens)
        tokens = host + disk
        self._local_tokens[request.request_id] = (num_computed_tokens, disk > 0)   # where the load starts
        # A G3 part is read into G2 before its copy: always an asynchronous load.
        return tokens, tokens > 0 and (disk > 0 or not self.layerwise)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if self.scheduler is None:
            return
        looked = self._local_tokens.pop(request.request_id, None)
        if num_external_tokens <= 0:
            return
        if looked is None:
            logger.warning("kvbm connector: request %s was allocated %d external tokens without a lookup; "
                           "nothing loaded", request.request_id, num_external_tokens)
            return
        local, from_disk = looked
        # `blocks` is the request's whole table (its local prefix, then the blocks to load into).
        self.scheduler.allocated(request.request_id, self._request_keys(request), blocks.get_block_ids()[0],
                                 local, num_external_tokens, self.layerwise and not from_disk)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict:
        if not num_external_tokens or self.scheduler is None:
            return {}
        host, disk = self.scheduler.hit_tiers(request.request_id, num_external_tokens)
        return {source: n for source, n in ((CacheHitSource.HOST, host), (CacheHitSource.DISK, disk)) if n}

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        from vllm.distributed.kv_transfer.kv_connector.utils import yield_req_data
        side = self.scheduler
        if side is None:
            return KvbmConnectorMetadata(StepPlan())
        for req_id in scheduler_output.preempted_req_ids or ():
            side.preempted(req_id)
        for req_id, new_ids, full_table in yield_req_data(scheduler_output):
            request = self._requests.get(req_id)
            if request is None:
                continue
            side.scheduled(req_id, self._request_keys(request), new_ids[0] if new_ids else None, full_table,
                           request.num_computed_tokens)
        return KvbmConnectorMetadata(side.build())

    def on_new_request(self, request: Request) -> None:
        self._requests[request.request_id] = request   # the scheduler's object: block_hashes grow with it

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self.scheduler is None:
            return
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, KvbmWorkerMetadata):
            self.scheduler.report(meta.report)
        if connector_output.finished_sending:
            self.scheduler.sent(connector_output.finished_sending)
            for req_id in connector_output.finished_sending:
                self._forget(req_id)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.scheduler is None:
            return False, None
        delay = self.scheduler.finished(request.request_id)
        if not delay:
            self._forget(request.request_id)
        return delay, None

    def _forget(self, req_id: str) -> None:
        self._keys.pop(req_id, None)
        self._local_tokens.pop(req_id, None)
        self._requests.pop(req_id, None)

    def take_events(self):
        """G2's and G3's BlockStored / BlockRemoved since the last call (media CPU, STORAGE), as
        vLLM's structs (vLLM publishes them with its own; kvbm's publisher, when configured, sends
        them too)."""
        if self.events is None:
            return ()
        events = self.events.take()
        if not events:
            return ()
        if self._publisher is not None:
            self._publisher.publish(events)
        from vllm.distributed import kv_events
        return to_vllm(events, kv_events)

    # ---- worker role ----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        from kvbm.transfer.shard_transfers import ShardTransfers
        missing = [name for name in self.layer_names if name not in kv_caches]
        if missing:
            raise ConfigError(f"register_kv_caches: no tensor for layers {missing[:4]} of the KV cache group")
        tensors = [kv_caches[name] for name in self.layer_names]
        if self.disk or self.shared_g2:
            # The scheduler side registers G2 with the disk worker in the layout of the spec; the
            # store checks its fingerprint, so the tensors must be in that very layout. A shared G2's
            # scheduler side joins the namespace of the spec's layout, which the rank joins with its
            # tensors' layout: they must be one.
            from kvbm.hashing import layout_fingerprint
            from kvbm.layout import detect_layout
            found = detect_layout(tensors).config
            if layout_fingerprint(found) != layout_fingerprint(self.layout) or \
                    found.block_bytes != self.layout.block_bytes:
                raise ConfigError(f"kvbm connector: the KV tensors hold blocks of {found}, the KV cache spec "
                                  f"says {self.layout}; the disk tier and a shared G2 need them to agree")
        rank = get_tensor_model_parallel_rank() if self.world_size > 1 else 0
        transfers = ShardTransfers(self.config, rank, self.world_size, self.group, self.host_blocks,
                                   shared_g2=self.shared_g2)
        try:
            if not tensors[0].is_cuda:
                _rehome_into_shared_memory(transfers, tensors)
            transfers.attach(tensors)
        except BaseException:
            transfers.close()
            raise
        self._transfers = transfers
        self._cuda = tensors[0].is_cuda
        self.worker = WorkerSide(transfers)
        self._layer_index = {name: i for i, name in enumerate(self.layer_names)}

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None and isinstance(connector_metadata, KvbmConnectorMetadata):
            self.worker.bind(connector_metadata.plan)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self.worker is not None and isinstance(kv_connector_metadata, KvbmConnectorMetadata):
            self.worker.flush(kv_connector_metadata.plan.flush_reqs)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.start_loads()

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Layer-wise loads: this layer has landed in every block loaded this step (asynchronous
        loads land before their request runs: nothing to wait for)."""
        if self.worker is not None and self.layerwise:
            layer = self._layer_index.get(layer_name)
            if layer is not None:   # a layer sharing another's KV (not in the group) loads nothing of its own
                self.worker.wait_layer(layer, self.worker.flush_timeout_s)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return   # stores are submitted once per step, in wait_for_save

    def wait_for_save(self) -> None:
        if self.worker is None:
            return
        if self.layerwise:
            self.worker.finish_layerwise()
        if self.worker.plan.stores and self._cuda:
            # The forward pass was only launched: its kernels may still be writing the blocks this
            # step stores, and the D2H runs in another process, unordered with vLLM's stream. The
            # stores go once the stream's work so far is done (vLLM's own offloading makes its copy
            # stream wait for the compute stream the same way).
            import torch
            done = torch.cuda.Event()
            done.record()
            done.synchronize()
        self.worker.submit_stores()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """What ended since the last call: stores of delayed requests (finished_sending), async loads
        (finished_recving), and among those the failed ones (failed_recving: vLLM recomputes those
        requests from scratch; their blocks are also named by get_block_ids_with_load_errors)."""
        if self.worker is None:
            return KVConnectorTransferResults()
        got = self._collected = self.worker.collect()
        return KVConnectorTransferResults(finished_sending=got.finished_sending, finished_recving=got.finished_recving,
                                          failed_recving=got.failed_recving)

    def get_block_ids_with_load_errors(self) -> set[int]:
        got = self._collected
        return set(got.failed_blocks) if got is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        got, self._collected = self._collected, None
        if got is None or got.report.is_empty():
            return None
        return KvbmWorkerMetadata(got.report)

    def shutdown(self) -> None:
        if self._transfers is not None:
            self._transfers.close()
            self._transfers = None
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        for closable in (self._metrics_server, self._publisher):
            if closable is not None:
                closable.close()
        self._metrics_server = self._publisher = None


def _rehome_into_shared_memory(transfers, tensors: list) -> None:
    """CPU mode: vLLM's KV tensors are private memory kvbm-workers cannot reach. Each tensor is
    moved, in place (Tensor.set_), into a shared segment of the same shapes: vLLM's model runner
    holds these very tensor objects, so it reads and writes the shared copy from now on."""
    first = tensors[0]
    if any(t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous() for t in tensors):
        raise ConfigError("kvbm connector (CPU mode): the per-layer KV tensors must be contiguous and of one "
                          "shape and dtype")
    shared = transfers.shared_tensors(tuple(first.shape), first.dtype, len(tensors))
    for tensor, home in zip(tensors, shared):
        home.copy_(tensor)
        tensor.set_(home)


def _warn_unreproducible_hashes(vllm_config: VllmConfig) -> None:
    algo = getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "sha256")
    if str(algo).startswith("xxhash") and os.environ.get("PYTHONHASHSEED") is None:
        logger.warning("kvbm connector: vLLM hashes blocks with %s and a random per-process seed "
                       "(PYTHONHASHSEED is unset): kvbm's cached blocks are found again only by this vLLM "
                       "process. Set PYTHONHASHSEED (or use sha256) to reuse them across restarts and engines.",
                       algo)
