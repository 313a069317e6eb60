"""Token blocks -> block hashes and sequence hashes (DESIGN.md "Hashing"), computed in C.

  seed            = salted_seed(salt): BASE_SEED, or xxh3_64(salt bytes, BASE_SEED) with a salt
  block_hash[i]   = xxh3_64(tokens of block i as little-endian u32, seed)
  sequence_hash   = block_hash[0] for the first block,
                    xxh3_64(parent sequence hash ‖ block_hash[i] as little-endian u64, seed) after it

A sequence hash names a whole prefix, so equal hashes mean identical KV in every tier.
`fold_external_hash` turns a framework's own block hash (vLLM's bytes) into a 64-bit key.
`layout_fingerprint` and `model_id` name what a G3 block on disk was written for (its journal keeps
both): the KV layout of a block, and the model/salt its hashes were computed under.

  key             = salt_keys(hashes, salt): what a KvBlockManager stores and matches for the
                    hashes it is given, xxh3_64(hash as little-endian u64, salted_seed(salt)), or
                    the hash itself without a salt

The config's salt (KvbmConfig.salt, KVBM_SALT) is folded in at the manager's boundary, whoever
computed the hashes (this module, with or without its own salt, or the engine), so two managers
of different salts never hold a block under the same key: a model's or a LoRA's blocks are never
another's, in any tier or store they share. Without one the keys are the hashes, so the golden
values (and Dynamo's) hold.
"""
from __future__ import annotations

import numpy as np

from kvbm._fast import native
from kvbm.errors import KvbmError

# Dynamo KVBM v1's seed, so that our events can be compared with its router.
BASE_SEED = 1337


def salted_seed(salt: str | bytes | None = None) -> int:
    """The hash seed for a model/LoRA/cache salt; no salt gives BASE_SEED."""
    if salt is None or salt == "" or salt == b"":
        return BASE_SEED
    data = salt.encode() if isinstance(salt, str) else bytes(salt)
    return native.xxh3_64(data, BASE_SEED)


def hash_token_blocks(tokens, block_size: int, salt: str | bytes | None = None,
                      parent: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(block_hashes, sequence_hashes) as uint64 arrays for the full blocks of `tokens`.

    `parent` continues a chain: the sequence hash of the block before tokens[0]. A trailing partial
    block is left out (it has no identity until it is full).
    """
    if parent is not None and not (0 <= int(parent) < 2**64):
        raise KvbmError(f"parent sequence hash must be a u64, got {parent!r}")
    return native.hash_blocks(tokens, block_size, salted_seed(salt), parent)


def salt_keys(hashes: np.ndarray, salt: str | bytes | None) -> np.ndarray:
    """The keys a manager of `salt` stores for `hashes` (u64 array): the hashes themselves without a
    salt, else each hash re-hashed under the salted seed (one C call for the whole array)."""
    if salt is None or salt == "" or salt == b"":
        return hashes
    words = np.ascontiguousarray(hashes, dtype="<u8").view("<u4")   # each hash as two LE u32 "tokens"
    return native.hash_blocks(words, 2, salted_seed(salt))[0]


def fold_external_hash(value: bytes | int, salt: str | bytes | None = None) -> int:
    """A framework's block hash (bytes, or an int of any size) as a 64-bit sequence key."""
    if isinstance(value, int) and 0 <= value < 2**64:
        return value
    if isinstance(value, int):
        value = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise KvbmError(f"external block hash must be bytes or int, got {type(value).__name__}")
    return native.xxh3_64(bytes(value), salted_seed(salt))


def layout_fingerprint(layout) -> int:
    """u64 naming the bytes of one block: layers, K/V (or MLA), tokens per block, elements per token
    and dtype (a G2/G3 block is always fully contiguous, so the engine's layout type does not count)."""
    desc = f"kvbm-block:{layout.num_layers}/{layout.outer_dim}/{layout.page_size}/{layout.inner_dim}/{layout.dtype}"
    return native.xxh3_64(desc.encode(), BASE_SEED)


def model_id(salt: str | bytes | None = None) -> int:
    """u64 naming the model/salt blocks are hashed under (the hash seed itself)."""
    return salted_seed(salt)
