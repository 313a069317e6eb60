"""A real vLLM V1 scheduler on CPU, with a KV connector chosen by the test, and nothing of a model.

Runs in the vLLM venv only (scripts/setup_vllm.sh); the main suite never imports it (tests/conftest.py
skips tests/vllm where vLLM is not installed).

Parts, in the order a test uses them:
- `write_model_dir(path)`: a Llama config.json of a few layers in a local folder. vLLM's `ModelConfig`
  reads it with transformers and needs no weights, no tokenizer (skip_tokenizer_init) and no network.
- `make_vllm_config(model_dir, kv_connector=..., kv_connector_module_path=..., kv_connector_extra_config=...)`:
  the real `VllmConfig` (device cpu, prefix caching on, chunked prefill on, a KVTransferConfig).
- `make_kv_cache_config(vllm_config, num_blocks)`: a `KVCacheConfig` of one full-attention group over
  the model's layers, `num_blocks` blocks of `block_size` tokens (what the engine would have profiled).
- `make_scheduler(vllm_config, kv_cache_config)`: vLLM's own `Scheduler`, which creates the
  SCHEDULER-role connector itself (`scheduler.connector`), as the engine core does.
- `make_connector(vllm_config, role, kv_cache_config)`: another role's connector (WORKER) through
  vLLM's `KVConnectorFactory`, for tests of the worker side.
- `make_request(scheduler, prompt_token_ids, request_id)`: a `Request` whose block hashes come from
  vLLM's own block hasher with the configured algorithm, as `EngineCore` sets it up.
- `step(scheduler, kv_connector_output=...)`: one engine step: `schedule()` -> a `ModelRunnerOutput`
  (one sampled token per request whose prompt is all computed; nothing for a partial prefill, as the
  GPU runner discards it) carrying the given `KVConnectorOutput` -> `update_from_output()`. Returns a
  `Step` with the scheduler output (the connector metadata is `step.scheduler_output.kv_connector_metadata`)
  and the engine outputs (new tokens, finish reasons).
- `aggregate_kv_outputs(scheduler, per_rank)`: several TP ranks' `KVConnectorOutput` merged by vLLM's
  own `KVOutputAggregator`, as the executor does before the scheduler sees them.
- `run_until_finished`, `finish_reasons`, `tokens`, `abort`, `assert_scheduler_empty`: loops,
  results over several steps, a client abort, leak checks.

Learned from vLLM's tests/v1/kv_connector/unit/utils.py (same objects, built our way: a local model
folder instead of a hub model, a scheduler-bound hasher, partial prefills that sample nothing).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The machine may have no network: transformers must not look for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.config import (  # noqa: E402
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_utils import (  # noqa: E402
    get_request_block_hasher,
    init_none_hash,
    resolve_kv_cache_block_sizes,
)
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.engine import EngineCoreOutput, FinishReason  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

# The tiny model: 2 layers, 2 KV heads of 16 (the FullAttentionSpec below must agree with it).
VOCAB_SIZE = 1024
EOS_TOKEN_ID = VOCAB_SIZE - 1
SAMPLED_TOKEN_ID = 7  # what step() "samples" unless told otherwise; never EOS
NUM_LAYERS = 2
NUM_KV_HEADS = 2
HEAD_SIZE = 16
LAYER_NAMES = tuple(f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS))


def write_model_dir(path: Path | str, *, max_model_len: int = 4096) -> Path:
    """Write a Llama config.json (no weights, no tokenizer) into `path` and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4 * HEAD_SIZE,
        "intermediate_size": 8 * HEAD_SIZE,
        "num_attention_heads": 4,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": max_model_len,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float16",
        "eos_token_id": EOS_TOKEN_ID,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def make_vllm_config(
    model_dir: Path | str,
    *,
    kv_connector: str,
    kv_connector_module_path: str | None = None,
    kv_connector_extra_config: dict[str, Any] | None = None,
    kv_role: str = "kv_both",
    kv_load_failure_policy: str = "recompute",
    block_size: int = 16,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 256,
    max_model_len: int = 2048,
    enable_prefix_caching: bool = True,
    prefix_caching_hash_algo: str = "sha256",
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    data_parallel_rank: int = 0,
) -> VllmConfig:
    """The engine's VllmConfig on CPU with the given connector (`--kv-transfer-config` as objects).

    kv_load_failure_policy defaults to "recompute" (vLLM's default is "fail"): a failed load is then
    rescheduled from the first bad block, which is what the connector's load-failure tests expect.
    """
    model_config = ModelConfig(
        model=str(model_dir),
        skip_tokenizer_init=True,
        dtype="float16",
        seed=0,
        max_model_len=max_model_len,
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=True,
        is_encoder_decoder=model_config.is_encoder_decoder,
    )
    cache_config = CacheConfig(
        block_size=block_size,
        enable_prefix_caching=enable_prefix_caching,
        prefix_caching_hash_algo=prefix_caching_hash_algo,
    )
    kv_transfer_config = KVTransferConfig(
        kv_connector=kv_connector,
        kv_connector_module_path=kv_connector_module_path,
        kv_role=kv_role,
        kv_connector_extra_config=dict(kv_connector_extra_config or {}),
        kv_load_failure_policy=kv_load_failure_policy,
    )
    return VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        kv_transfer_config=kv_transfer_config,
        device_config=DeviceConfig("cpu"),
        parallel_config=ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                                       data_parallel_size=data_parallel_size, data_parallel_rank=data_parallel_rank),
    )


def make_kv_cache_config(
    vllm_config: VllmConfig, num_blocks: int, *, dtype: torch.dtype = torch.float16
) -> KVCacheConfig:
    """`num_blocks` blocks of the config's block_size in one full-attention group over LAYER_NAMES.

    kv_cache_tensors stays empty: no process here allocates KV memory (worker tests bring tensors).
    """
    spec = FullAttentionSpec(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=NUM_KV_HEADS,
        head_size=HEAD_SIZE,
        dtype=dtype,
    )
    # The engine writes the profiled count back into the cache config; connectors may read it there.
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(list(LAYER_NAMES), spec)],
    )


def make_scheduler(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> Scheduler:
    """vLLM's V1 Scheduler as EngineCore builds it; it creates the SCHEDULER-role connector itself."""
    block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
    return Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        hash_block_size=hash_block_size,
        log_stats=True,
    )


def make_connector(
    vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
) -> KVConnectorBase_V1:
    """A connector of `role` built the way vLLM builds it (factory, kv_connector_module_path)."""
    connector = KVConnectorFactory.create_connector(vllm_config, role, kv_cache_config)
    assert isinstance(connector, KVConnectorBase_V1)
    return connector


def block_hasher(scheduler: Scheduler) -> Callable[[Request], list]:
    """vLLM's request block hasher for this scheduler's config, set up as EngineCore does."""
    config = scheduler.vllm_config
    hash_fn = get_hash_fn_by_name(config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)  # global in vLLM; idempotent for a fixed algorithm and PYTHONHASHSEED
    return get_request_block_hasher(scheduler.hash_block_size, hash_fn, config.num_hash_lookahead_tokens)


def make_request(
    scheduler: Scheduler,
    prompt_token_ids: Sequence[int],
    request_id: str,
    *,
    max_tokens: int = 4,
    kv_transfer_params: dict[str, Any] | None = None,
    cache_salt: str | None = None,
) -> Request:
    """A Request as EngineCore makes one: vLLM's block hasher fills `request.block_hashes`, one per
    full block of the prompt. Finishes after `max_tokens` generated tokens (EOS is never sampled by
    `step` unless asked)."""
    if any(not 0 <= t < VOCAB_SIZE for t in prompt_token_ids):
        raise ValueError(f"prompt token ids must lie in [0, {VOCAB_SIZE})")
    params = SamplingParams(max_tokens=max_tokens)
    params.update_from_generation_config({}, EOS_TOKEN_ID)
    request = Request(
        request_id=request_id,
        prompt_token_ids=list(prompt_token_ids),
        sampling_params=params,
        pooling_params=None,
        cache_salt=cache_salt,
        block_hasher=block_hasher(scheduler),
    )
    request.kv_transfer_params = kv_transfer_params
    return request


def prompt(n_tokens: int, *, seed: int = 0) -> list[int]:
    """`n_tokens` deterministic token ids (distinct seeds give distinct prefixes from token 0)."""
    return [(seed * 7919 + i * 31 + 1) % (VOCAB_SIZE - 1) for i in range(n_tokens)]


def model_runner_output(
    scheduler: Scheduler,
    scheduler_output: SchedulerOutput,
    *,
    kv_connector_output: KVConnectorOutput | None = None,
    token_id: int = SAMPLED_TOKEN_ID,
) -> ModelRunnerOutput:
    """What the GPU runner would return for `scheduler_output`: one sampled token per scheduled
    request whose tokens are all computed after this step, none for a partial (chunked) prefill."""
    req_ids = list(scheduler_output.num_scheduled_tokens)
    sampled: list[list[int]] = []
    for req_id in req_ids:
        request = scheduler.requests[req_id]
        # schedule() has already advanced num_computed_tokens by this step's tokens.
        done = request.num_computed_tokens >= request.num_tokens
        sampled.append([token_id] if done else [])
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=sampled,
        kv_connector_output=kv_connector_output,
    )


KvOutputArg = KVConnectorOutput | Callable[[SchedulerOutput], KVConnectorOutput | None] | None


@dataclass
class Step:
    """One engine step: what was scheduled, what the runner returned, what the engine emitted."""

    scheduler_output: SchedulerOutput
    model_runner_output: ModelRunnerOutput
    outputs: list[EngineCoreOutput] = field(default_factory=list)

    @property
    def scheduled(self) -> dict[str, int]:
        """request id -> tokens scheduled this step."""
        return dict(self.scheduler_output.num_scheduled_tokens)

    @property
    def new_tokens(self) -> dict[str, list[int]]:
        return {o.request_id: list(o.new_token_ids) for o in self.outputs}

    @property
    def finished(self) -> dict[str, FinishReason]:
        """request id -> finish reason, for the requests this step finished."""
        return {o.request_id: o.finish_reason for o in self.outputs if o.finish_reason is not None}

    @property
    def kv_connector_metadata(self) -> Any:
        return self.scheduler_output.kv_connector_metadata


def step(
    scheduler: Scheduler,
    kv_connector_output: KvOutputArg = None,
    *,
    token_id: int = SAMPLED_TOKEN_ID,
) -> Step:
    """schedule() -> ModelRunnerOutput -> update_from_output(), as EngineCore.step does.

    kv_connector_output: the (already aggregated) workers' KVConnectorOutput for this step, or a
    function of this step's SchedulerOutput returning it (so a test can answer the connector
    metadata just built), or None (no connector output, as a runner without one sends).
    """
    scheduler_output = scheduler.schedule()
    kv_out = kv_connector_output(scheduler_output) if callable(kv_connector_output) else kv_connector_output
    runner_output = model_runner_output(
        scheduler, scheduler_output, kv_connector_output=kv_out, token_id=token_id
    )
    engine_outputs = scheduler.update_from_output(scheduler_output, runner_output)
    outputs = [o for eco in engine_outputs.values() for o in eco.outputs]
    return Step(scheduler_output, runner_output, outputs)


def run_until_finished(
    scheduler: Scheduler,
    kv_connector_output: KvOutputArg = None,
    *,
    max_steps: int = 100,
) -> list[Step]:
    """Step until the scheduler holds no request; fails after `max_steps` (a stuck request).

    As EngineCore does, a step runs while `has_requests()`: that includes finished requests whose ids
    the workers have not yet been told (the next SchedulerOutput carries them) and requests whose
    blocks a connector still reads (delayed free), so the last steps may schedule nothing."""
    steps: list[Step] = []
    while scheduler.has_requests():
        if len(steps) >= max_steps:
            raise AssertionError(
                f"{len(scheduler.requests)} requests still unfinished after {max_steps} steps: "
                f"{sorted(scheduler.requests)}"
            )
        steps.append(step(scheduler, kv_connector_output))
    return steps


def finish_reasons(steps: Iterable[Step]) -> dict[str, FinishReason]:
    """request id -> finish reason over several steps."""
    return {r: reason for s in steps for r, reason in s.finished.items()}


def tokens(steps: Iterable[Step], request_id: str) -> list[int]:
    """The tokens the engine emitted for `request_id` over several steps, in order."""
    return [t for s in steps for t in s.new_tokens.get(request_id, [])]


def abort(scheduler: Scheduler, request_ids: str | Iterable[str]) -> None:
    """Abort requests as the API server does when a client goes away."""
    scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)


def aggregate_kv_outputs(
    scheduler: Scheduler, per_rank: Sequence[KVConnectorOutput | None], aggregator: KVOutputAggregator | None = None
) -> KVConnectorOutput | None:
    """Merge TP ranks' KVConnectorOutput with vLLM's KVOutputAggregator (finished sets count down
    per rank, worker metadata `.aggregate()`d). Pass one `aggregator` across steps, made with
    `KVOutputAggregator.from_connector(scheduler.connector, world_size)`, when completions may
    arrive on different steps from different ranks."""
    if aggregator is None:
        aggregator = KVOutputAggregator.from_connector(scheduler.connector, len(per_rank))
    outputs = [
        ModelRunnerOutput(req_ids=[], req_id_to_index={}, kv_connector_output=o) for o in per_rank
    ]
    merged = aggregator.aggregate(outputs)
    return None if merged is None else merged.kv_connector_output


def assert_scheduler_empty(scheduler: Scheduler) -> None:
    """No request left and every GPU block back in the free queue (vLLM keeps block 0 as the null
    block, so all but one are free)."""
    assert not scheduler.requests, sorted(scheduler.requests)
    assert not scheduler.waiting and not scheduler.running
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1, (
        f"{pool.get_num_free_blocks()} of {pool.num_gpu_blocks - 1} blocks free"
    )
    assert all(b.ref_cnt == 0 for b in pool.blocks if not b.is_null)
