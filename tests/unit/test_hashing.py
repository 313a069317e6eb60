"""Block and sequence hashes: equal to the xxhash package (the oracle) and pinned by golden values."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash

from kvbm.errors import KvbmError
from kvbm.hashing import BASE_SEED, fold_external_hash, hash_token_blocks, salt_keys, salted_seed


def oracle(tokens: np.ndarray, block_size: int, seed: int, parent: int | None = None):
    block_hashes, seq_hashes = [], []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        bh = xxhash.xxh3_64_intdigest(tokens[start:start + block_size].astype("<u4").tobytes(), seed)
        sh = bh if parent is None else xxhash.xxh3_64_intdigest(struct.pack("<QQ", parent, bh), seed)
        block_hashes.append(bh)
        seq_hashes.append(sh)
        parent = sh
    return block_hashes, seq_hashes


def test_golden_values_unsalted():
    bh, sh = hash_token_blocks(np.arange(64, dtype=np.uint32), 16)
    assert [hex(int(x)) for x in bh] == ["0xd47a8f41c833328a", "0xd43939178abd00db",
                                         "0x4cc8f942aaf401a2", "0xcf2d99a33cc42682"]
    assert [hex(int(x)) for x in sh] == ["0xd47a8f41c833328a", "0xbf15dffb16447f38",
                                         "0xa4dda066f3c1e1a0", "0x35f7c0d119848950"]


def test_golden_values_salted():
    assert salted_seed("llama-3-8b") == 0xD78A35AA447FDE13
    _, sh = hash_token_blocks(np.arange(64, dtype=np.uint32), 16, salt="llama-3-8b")
    assert [hex(int(x)) for x in sh] == ["0xff92c711f88aaf08", "0x3552db409c8ec4a",
                                         "0x64ed73a0b4646a3e", "0xd5f6b64ceb58f04c"]


def test_salt_keys_golden_and_oracle(rng):
    """A manager's keys for hashes under a salt (KvbmConfig.salt): pinned, and equal to xxh3_64 of each
    hash's 8 little-endian bytes under the salted seed; no salt leaves the hashes as they are."""
    hashes = np.array([0xD47A8F41C833328A, 0xBF15DFFB16447F38], dtype=np.uint64)
    assert [hex(int(x)) for x in salt_keys(hashes, "llama-3-8b")] == ["0xa7ea0aa9e530dd42", "0xb093dffa806f81f"]
    many = rng.integers(0, 2**64, size=1000, dtype=np.uint64)
    seed = salted_seed("lora-7")
    assert salt_keys(many, "lora-7").tolist() == [xxhash.xxh3_64_intdigest(struct.pack("<Q", int(h)), seed)
                                                  for h in many]
    assert salt_keys(many, "") is many and salt_keys(many, None) is many
    assert salt_keys(np.empty(0, np.uint64), "x").shape == (0,)


def test_every_block_size_matches_oracle(rng):
    from kvbm._fast import native
    for block_size in range(1, 1025):
        n_blocks = 1 + block_size % 3
        tokens = rng.integers(0, 2**32, size=n_blocks * block_size + block_size // 2,
                              dtype=np.uint64).astype(np.uint32)
        seed = BASE_SEED if block_size % 2 else int(rng.integers(0, 2**63))
        bh, sh = native.hash_blocks(tokens, block_size, seed)
        assert (list(map(int, bh)), list(map(int, sh))) == oracle(tokens, block_size, seed), block_size


def test_parent_continues_chain(rng):
    tokens = rng.integers(0, 50_000, size=160, dtype=np.int64)
    _, whole = hash_token_blocks(tokens, 16)
    _, head = hash_token_blocks(tokens[:80], 16)
    _, tail = hash_token_blocks(tokens[80:], 16, parent=int(head[-1]))
    assert list(whole) == list(head) + list(tail)


def test_partial_trailing_block_is_not_hashed():
    bh, sh = hash_token_blocks(np.arange(40, dtype=np.uint32), 16)
    assert len(bh) == len(sh) == 2
    bh, sh = hash_token_blocks(np.arange(10, dtype=np.uint32), 16)
    assert len(bh) == len(sh) == 0


def test_salt_separates_models():
    tokens = np.arange(32, dtype=np.uint32)
    assert hash_token_blocks(tokens, 16, salt="a")[1][0] != hash_token_blocks(tokens, 16, salt="b")[1][0]
    assert salted_seed(None) == salted_seed("") == BASE_SEED


def test_int_tokens_equal_uint32_tokens():
    as_int = hash_token_blocks(np.arange(32, dtype=np.int64), 16)[1]
    as_list = hash_token_blocks(list(range(32)), 16)[1]
    assert list(as_int) == list(as_list) == list(hash_token_blocks(np.arange(32, dtype=np.uint32), 16)[1])


@pytest.mark.parametrize("tokens, block_size, message", [
    (np.arange(16), 0, "block_size"),
    (np.arange(16), -4, "block_size"),
    (np.arange(16).reshape(4, 4), 4, "1-D"),
    (np.array([-1, 2, 3, 4]), 2, "integers in"),
    (np.array([2**32, 2, 3, 4], dtype=np.int64), 2, "integers in"),
    (np.array([1.5, 2.0]), 2, "integers in"),
])
def test_bad_input(tokens, block_size, message):
    with pytest.raises(KvbmError, match=message):
        hash_token_blocks(tokens, block_size)


def test_bad_parent():
    with pytest.raises(KvbmError, match="u64"):
        hash_token_blocks(np.arange(16), 16, parent=-1)


def test_fold_external_hash():
    assert fold_external_hash(12345) == 12345
    folded = fold_external_hash(b"\x01" * 32)
    assert folded == xxhash.xxh3_64_intdigest(b"\x01" * 32, BASE_SEED)
    assert 0 <= fold_external_hash(2**200) < 2**64
    with pytest.raises(KvbmError):
        fold_external_hash("not a hash")  # type: ignore[arg-type]
