"""Batched hashing throughput: kvbm's C routine over whole token arrays vs the xxhash package called
per block from Python (the oracle, and what a Python-side engine would otherwise do).

Reports GB/s of token ids (4 bytes each) per block size, median of repeats, and the ratio.
  python bench/bench_hashing.py [--tokens 1048576] [--block-sizes 16 32 64 128 256 512 1024]
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import struct
import time

import numpy as np
import xxhash

from kvbm.hashing import BASE_SEED, hash_token_blocks


def python_per_block(tokens: np.ndarray, block_size: int, seed: int) -> list[int]:
    seq, parent = [], None
    raw = tokens.astype("<u4").tobytes()
    step = block_size * 4
    for start in range(0, len(raw) - step + 1, step):
        bh = xxhash.xxh3_64_intdigest(raw[start:start + step], seed)
        parent = bh if parent is None else xxhash.xxh3_64_intdigest(struct.pack("<QQ", parent, bh), seed)
        seq.append(parent)
    return seq


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    gc.collect()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    tokens = np.random.default_rng(1).integers(0, 2**32, size=args.tokens, dtype=np.uint64).astype(np.uint32)
    gbytes = tokens.nbytes / 1e9
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}; "
          f"{args.tokens} tokens ({tokens.nbytes / 2**20:.1f} MiB)")
    print(f"{'block':>6} {'kvbm GB/s':>10} {'xxhash-py GB/s':>15} {'ratio':>7}")
    for block_size in args.block_sizes:
        assert (list(map(int, hash_token_blocks(tokens, block_size)[1]))
                == python_per_block(tokens, block_size, BASE_SEED))
        fast = statistics.median(timed(lambda: hash_token_blocks(tokens, block_size), args.repeats))
        slow = statistics.median(timed(lambda: python_per_block(tokens, block_size, BASE_SEED),
                                       max(3, args.repeats // 2)))
        print(f"{block_size:>6} {gbytes / fast:>10.2f} {gbytes / slow:>15.2f} {slow / fast:>6.1f}x")


if __name__ == "__main__":
    main()
