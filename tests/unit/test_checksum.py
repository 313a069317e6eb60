"""Per-block checksums of the disk tier (kvbm_checksum_blocks): equal to the xxhash package (the
oracle) for addresses and for strided buffers, with every argument error refused before the native
loop runs."""
from __future__ import annotations

import numpy as np
import pytest
import xxhash

from kvbm._fast import native
from kvbm.errors import LayoutError


def oracle(blocks: np.ndarray) -> list[int]:
    return [xxhash.xxh3_64_intdigest(b.tobytes()) for b in blocks]


@pytest.mark.parametrize("nbytes", [1, 7, 64, 4096, 65536 + 3, 1 << 20])
def test_addresses_match_oracle(rng, nbytes):
    buf = rng.integers(0, 256, 5 * nbytes + 11, dtype=np.uint8)
    base = buf.ctypes.data
    offsets = np.array([3 * nbytes + 11, 0, nbytes, 11, 2 * nbytes + 5], dtype=np.uint64)
    got = native.checksum_blocks(base + offsets, nbytes, base, buf.nbytes)
    assert got.dtype == np.uint64
    want = oracle(np.stack([buf[int(o):int(o) + nbytes] for o in offsets]))
    assert [int(x) for x in got] == want


def test_golden_values():
    data = np.arange(8192, dtype=np.uint8)  # 0..255 repeated
    got = native.checksum_buffer(data, 4096)
    assert [hex(int(x)) for x in got] == [hex(xxhash.xxh3_64_intdigest(data[:4096].tobytes()))] * 2
    assert int(native.checksum_buffer(b"kvbm", 4)[0]) == xxhash.xxh3_64_intdigest(b"kvbm")


@pytest.mark.parametrize(("nbytes", "stride"), [(56, 64), (4096, 4096), (100, 0), (3, 1)])
def test_strided_buffer_matches_oracle(rng, nbytes, stride):
    buf = rng.integers(0, 256, 10_000, dtype=np.uint8)
    step = stride or nbytes
    count = (buf.size - nbytes) // step + 1
    got = native.checksum_buffer(buf, nbytes, stride)
    assert got.shape == (count,)
    assert [int(x) for x in got] == oracle(np.stack([buf[i * step:i * step + nbytes] for i in range(count)]))


def test_a_flipped_byte_changes_the_checksum(rng):
    buf = rng.integers(0, 256, 3 * 4096, dtype=np.uint8)
    before = native.checksum_buffer(buf, 4096)
    buf[4096 + 17] ^= 0x01
    after = native.checksum_buffer(buf, 4096)
    assert before[0] == after[0] and before[2] == after[2] and before[1] != after[1]


def test_empty_inputs():
    assert native.checksum_blocks(np.empty(0, np.uint64), 4096, 0, 0).shape == (0,)
    assert native.checksum_buffer(b"abc", 4).shape == (0,)


def test_blocks_outside_the_region_are_refused(rng):
    buf = rng.integers(0, 256, 3 * 4096, dtype=np.uint8)
    base = buf.ctypes.data
    with pytest.raises(LayoutError, match=r"block 1 at .* outside the region .*1 of 2 blocks"):
        native.checksum_blocks(np.array([base, base + 2 * 4096 + 1], np.uint64), 4096, base, buf.nbytes)
    with pytest.raises(LayoutError, match="outside the region"):
        native.checksum_blocks(np.array([base - 1], np.uint64), 4096, base, buf.nbytes)
    with pytest.raises(LayoutError, match="cannot hold a 4096-byte block"):
        native.checksum_blocks(np.array([base], np.uint64), 4096, base, 4095)
    with pytest.raises(LayoutError, match="nbytes must be >= 1"):
        native.checksum_blocks(np.array([base], np.uint64), 0, base, buf.nbytes)
    with pytest.raises(LayoutError):
        native.checksum_blocks(np.array([-1]), 4096, base, buf.nbytes)
    with pytest.raises(LayoutError, match="nbytes 0, stride 0"):
        native.checksum_buffer(buf, 0)
