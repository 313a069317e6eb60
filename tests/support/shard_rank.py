"""One TP rank in a process of its own, for tests/integration/test_shard_transfers.py.

    python -m tests.support.shard_rank RUN_DIR INSTANCE GROUP RANK WORLD HOST_BLOCKS KIND DTYPE SEED OUT_DIR [DEVICE]

Makes its shard (tests/support/shard_helpers.py, contents from SEED), attaches (rank 0 starts
kvbm-workers, the others wait for it), stores DEVICE_BLOCKS into HOST_BLOCKS_USED, saves the G2
image of those blocks under OUT_DIR and prints a JSON line {"stored": ...}; on the line "load" from
stdin it poisons other device blocks, loads them back and prints {"loaded": ...}; on "close" it
closes and exits 0. Any failure prints {"error": ...} and exits 1.
"""
from __future__ import annotations

import json
import sys
import traceback

import numpy as np
import torch

from kvbm.transfer.shard_transfers import ShardTransfers
from tests.support.shard_helpers import fill, host_image, make_shard, round_trip, shard_config

DEVICE_BLOCKS = [5, 0, 9, 2]
HOST_BLOCKS_USED = [1, 6, 3, 7]
INTO = [11, 12, 13, 14]
NUM_BLOCKS = 16


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main(argv: list[str]) -> int:
    run_dir, instance, group, rank, world, host_blocks, kind, dtype, seed, out_dir, *rest = argv
    rank, world, host_blocks, seed = int(rank), int(world), int(host_blocks), int(seed)
    device = rest[0] if rest else "cpu"     # "cuda": the shard on the GPU, reached through CUDA IPC
    st = ShardTransfers(shard_config(run_dir, instance, device=device), rank, world, group, host_blocks)
    try:
        tensors = make_shard(st, kind, getattr(torch, dtype), NUM_BLOCKS, device=device)
        fill(tensors, kind, seed)
        st.attach(tensors, timeout=60.0)
        image = host_image(st, tensors, DEVICE_BLOCKS)
        st.store(DEVICE_BLOCKS, HOST_BLOCKS_USED).result(60.0)
        np.save(f"{out_dir}/rank{rank}.npy", np.stack([np.frombuffer(b, dtype=np.uint8) for b in image]))
        host = st.transfers.welcome["host"]
        say(stored=True, offset=st.host_offset, stride=st.host_layout.config.block_stride,
            block_bytes=st.host_layout.config.block_bytes, segment=host["segment"], size=host["size"],
            workers_pid=st.workers_process.pid if st.workers_process else None)
        if sys.stdin.readline().strip() != "load":
            return 1
        out = round_trip(st, tensors, kind, DEVICE_BLOCKS, HOST_BLOCKS_USED, INTO)
        say(loaded=True, equal=out["before"] == out["after"], layers=out["layers"], blocks=out["blocks"])
        if sys.stdin.readline().strip() != "close":
            return 1
    except Exception:  # noqa: BLE001 - the test reads the reason
        say(error=traceback.format_exc())
        return 1
    finally:
        st.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
