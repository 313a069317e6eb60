"""One tensor-parallel rank of a vLLM engine, in its own process (tests/vllm/test_kvbm_connector_tp.py).

It initialises vLLM's own distributed state (gloo over 127.0.0.1), builds the WORKER-role connector
through vLLM's factory, registers plain CPU tensors of this rank's shard (the connector moves them
into shared memory), then serves the test's commands over a multiprocessing pipe, as vLLM's
executor would drive a worker each step: ("step", metadata, writes, finished) -> KVConnectorOutput;
("check", blocks) -> mismatches; ("poison",); ("close",).

The bytes a "forward pass" writes are `content(hash, layer, rank)`: every rank's shard of a block
differs, so a load that mixed up two ranks' G2 regions is caught.
"""
from __future__ import annotations

import traceback

import numpy as np

BS = 16


def content(key: int, layer: int, rank: int, heads: int, head_size: int):
    import torch
    seed = (key ^ (layer * 0x9E3779B97F4A7C15) ^ (rank * 0xC2B2AE3D27D4EB4F)) & (2**63 - 1)
    data = np.random.default_rng(seed).integers(0, 2**16, size=(2, BS, heads, head_size), dtype=np.uint16)
    return torch.from_numpy(data.view(np.float16))


def serve(rank: int, world_size: int, port: int, model_dir: str, extra: dict, num_blocks: int, conn,
          dp: tuple[int, int] = (1, 0)) -> None:
    try:
        _serve(rank, world_size, port, model_dir, extra, num_blocks, conn, dp)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def _serve(rank, world_size, port, model_dir, extra, num_blocks, conn, dp) -> None:
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from vllm.v1.outputs import KVConnectorOutput

    from tests.vllm import harness as H

    def vllm_config(dp_size: int, dp_rank: int):
        return H.make_vllm_config(model_dir, kv_connector="KvbmConnector",
                                  kv_connector_module_path="kvbm.integrations.vllm",
                                  kv_connector_extra_config=extra, tensor_parallel_size=world_size,
                                  data_parallel_size=dp_size, data_parallel_rank=dp_rank)

    config = vllm_config(*dp)
    kv_cache_config = H.make_kv_cache_config(config, num_blocks)
    # A data-parallel replica's ranks form their own tensor-parallel group here: vLLM's
    # cross-replica group (which a DP > 1 config would make init_distributed_environment build
    # over every replica's ranks) is not run. The connector reads the replica's rank from `config`.
    with set_current_vllm_config(vllm_config(1, 0)):
        init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(tensor_model_parallel_size=world_size)
    with set_current_vllm_config(config):
        worker = H.make_connector(config, KVConnectorRole.WORKER, kv_cache_config)
        shape = (2, num_blocks, BS, H.NUM_KV_HEADS, H.HEAD_SIZE)
        kv = {name: torch.zeros(shape, dtype=torch.float16) for name in H.LAYER_NAMES}
        worker.register_kv_caches(kv)
        conn.send(("ready", rank))
        try:
            while True:
                cmd = conn.recv()
                if cmd[0] == "close":
                    break
                if cmd[0] == "poison":
                    for t in kv.values():
                        t.view(torch.uint16).fill_(0xFFFF)
                    conn.send(("ok",))
                elif cmd[0] == "check":
                    bad = 0
                    for block, key in cmd[1]:
                        for layer, name in enumerate(H.LAYER_NAMES):
                            want = content(key, layer, rank, H.NUM_KV_HEADS, H.HEAD_SIZE).view(torch.uint16)
                            bad += not torch.equal(kv[name][:, block].view(torch.uint16), want)
                    conn.send(("ok", bad))
                elif cmd[0] == "step":
                    _, meta, writes, finished = cmd
                    worker.bind_connector_metadata(meta)
                    worker.handle_preemptions(meta)
                    worker.start_load_kv(None)
                    for layer, name in enumerate(H.LAYER_NAMES):
                        worker.wait_for_layer_load(name)
                        for block, key in writes:
                            kv[name][:, block] = content(key, layer, rank, H.NUM_KV_HEADS, H.HEAD_SIZE)
                    worker.wait_for_save()
                    worker.worker.wait_all(30)
                    results = worker.get_transfer_results(finished)
                    out = KVConnectorOutput(finished_sending=results.finished_sending,
                                            finished_recving=results.finished_recving,
                                            failed_recving=results.failed_recving,
                                            invalid_block_ids=worker.get_block_ids_with_load_errors(),
                                            kv_connector_worker_meta=worker.build_connector_worker_meta())
                    worker.clear_connector_metadata()
                    conn.send(("ok", out))
        finally:
            worker.shutdown()
