"""Wire protocol between the engine (TransferManager) and kvbm-workers (supervisor, path workers).

Parts:
  Path, Status, MsgType   IntEnums / strings that cross the wire as plain values
  encode / decode         msgpack (never pickle) with a size cap; `decode` returns a dict or raises
                          ProtocolError
  validate_*              one validator per message type: types, ranges, array lengths, caps
  pack_blocks / unpack_blocks
                          block index arrays as packed little-endian int64 bytes
  make_*                  constructors for each message, so both sides spell fields the same way

Every message is a msgpack map with "v" (PROTOCOL_VERSION) and "t" (its type). The order of a
conversation:
  1. engine -> supervisor control socket   {t: hello}            -> {t: welcome, workers, host, ...}
  2. engine -> each path worker            {t: register, ...}    -> {t: registered, gen, ...}
     (and {t: unregister} at close; a worker also drops the registration of an engine pid that died)
     The TP ranks of one engine register one by one, each with {group: the engine's name,
     host_offset: where its region of G2 starts}; one engine's ranks may share the workers, their
     G2 ranges disjoint.
  3. engine -> path worker                 {t: xfer, id, gen, src, dst, ...}
                                           -> {t: layer, id, layer}* (layers=True: every layer <= layer
                                              has landed; landed layers are reported together)
                                           -> {t: done, id, status, error, bytes, timings}
  4. supervisor -> engines (PUB events)    {t: event, kind: started|died|stopping, path, gen, ...}
The disk worker (one process serving H2DISK and DISK2H, when a disk tier is configured) speaks the
same conversation. Its register carries {disk: {blocks, fingerprint, model, cold}} (the G3 store it
opens) and may leave out `memory` (it maps no engine memory; the D2H/H2D workers require it); its
xfer requests carry per-block arrays (BLOCK_FIELDS: the sequence hashes of a write, the expected
checksums and owners of a read) and its done replies per-block outcomes ("state",
"sums") and the read path that ran. {t: entries} asks it for the G3 blocks it holds (its own, and
other instances' in a shared directory): answered by {t: entries, part...}* then {t: entries, last}.
A request that cannot be parsed is answered {t: done, id: -1 or its id, status: ERROR, error: ...};
a worker never dies of bad input.
"""
from __future__ import annotations

import sys
from array import array
from enum import IntEnum
from typing import Any

import msgpack
import numpy as np

from kvbm.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 16 << 20        # soft cap checked before decoding; ZMQ's hard cap is 4x this
MAX_BATCH_BLOCKS = 1 << 16          # block pairs per request, whatever the config says
MAX_STRING = 4096                   # any string field
MAX_ERROR_TEXT = 2000
MAX_ENGINE_ID = 256                 # the "engine" field of every message
MAX_LAYERS = 1024                   # KVBM_MAX_LAYERS of csrc/include/kvbm.h
MAX_DEVICE = 1023                   # CUDA device ordinal in memory.device
SMALL_ARRAY = 64                    # block arrays up to this many are checked with plain ints (numpy's
                                    # reductions cost ~10 us a request, most of a 1-block request's checks)
ENGINE_REQUIRED = frozenset({"register", "unregister", "xfer"})
XFER_FIELDS = frozenset({"v", "t", "id", "engine", "gen", "path", "src", "dst", "prio", "layers", "gate"})


class Path(IntEnum):
    D2H = 0       # device (G1) -> host pool (G2): offload
    H2D = 1       # host pool -> device: onboard
    H2DISK = 2    # host pool -> disk (G3): the disk worker writes G2 blocks to slots
    DISK2D = 3    # disk -> device: what the engine's onboard future of a G3 prefix reports (staged
                  # read then H2D); never sent on the wire by this version (no GDS direct read)
    DISK2H = 4    # disk -> host pool: the disk worker reads slots into G2 (staging) blocks

    @property
    def label(self) -> str:
        return self.name.lower()


WORKER_PATHS = (Path.D2H, Path.H2D)      # paths that have a process of their own
DISK_PATHS = (Path.H2DISK, Path.DISK2H)  # served by the one disk worker process (H2DISK is its slot)
PROCESS_PATHS = WORKER_PATHS + (Path.H2DISK,)  # paths naming a worker process (and an endpoint)
NO_DISK_TIER = "no disk tier: kvbm-workers runs without one (give it disk_path and disk_size or disk_blocks)"

# Per-block arrays a disk request or reply carries, packed little-endian: name -> dtype.
BLOCK_FIELDS = {"hashes": "<u8",   # H2DISK: sequence hash of each block written
                "sums": "<u8",     # DISK2H: expected checksum of each block; H2DISK done: checksum written
                "owner": "<u4",    # DISK2H: 0 this instance's store, i >= 1 the store of peers[i - 1]
                "state": "u1"}     # done of a disk request: BlockState of each block


# The fields a disk request may carry besides a copy's: its per-block arrays and the instances its
# reads name (a shared disk_path holds at most this many).
def connection_of(ident: bytes) -> bytes:
    """The engine connection a routing id belongs to: an engine's sockets to the disk worker (one
    per disk path, at one endpoint) carry "/<path>" after the id of its other sockets."""
    return ident.partition(b"/")[0]


DISK_XFER_FIELDS = XFER_FIELDS | frozenset(BLOCK_FIELDS) | {"peers"}
MAX_PEERS = 4096


class BlockState(IntEnum):
    """Outcome of one block of a disk request (the "state" array of its done reply)."""
    OK = 0
    FAILED = 1    # not written / not read: I/O error, no space, vanished or truncated file, stale
    CORRUPT = 2   # read, but its bytes did not match its checksum (dropped from that store)


class Status(IntEnum):
    OK = 0
    ERROR = 1        # the copy failed or the request was invalid; no destination block is valid
    STALE = 2        # the request names another worker generation; nothing was copied


class MsgType:
    HELLO = "hello"
    WELCOME = "welcome"
    REGISTER = "register"
    REGISTERED = "registered"
    UNREGISTER = "unregister"  # engine -> path worker at close: drop its mappings (CUDA IPC, shm)
    XFER = "xfer"
    LAYER = "layer"
    DONE = "done"
    EVENT = "event"
    STATUS = "status"
    STATS = "stats"
    PING = "ping"
    PONG = "pong"
    READY = "ready"        # path worker -> supervisor once mapped, pinned and bound
    RESTART = "restart"    # engine -> supervisor: a worker missed a deadline, replace it
    ENTRIES = "entries"    # engine <-> disk worker: the G3 blocks its store (and its peers') hold


# ---- encoding ---------------------------------------------------------------------------------

def encode(msg: dict[str, Any]) -> bytes:
    msg.setdefault("v", PROTOCOL_VERSION)
    return msgpack.packb(msg, use_bin_type=True)


def decode(frame: bytes | memoryview, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """A msgpack map of the current version, or ProtocolError naming what is wrong."""
    size = len(frame)
    if size > max_bytes:
        raise ProtocolError(f"message of {size} bytes exceeds the {max_bytes} byte cap")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=max_bytes,
                              max_str_len=max_bytes, max_array_len=MAX_BATCH_BLOCKS * 2,
                              max_map_len=64, max_ext_len=0)
    except Exception as err:  # msgpack raises a zoo of types (ExtraData, ValueError, ...)
        raise ProtocolError(f"undecodable message of {size} bytes: {type(err).__name__}: {err}") from err
    if not isinstance(msg, dict):
        raise ProtocolError(f"expected a msgpack map, got {type(msg).__name__}")
    version = msg.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    if not isinstance(msg.get("t"), str):
        raise ProtocolError(f"message type 't' missing or not a string: {msg.get('t')!r}")
    return msg


def request_id_of(msg: Any) -> int:
    """The id of a (possibly invalid) request, or -1, for answering it."""
    if isinstance(msg, dict):
        rid = msg.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**63:
            return rid
    return -1


# ---- block arrays -----------------------------------------------------------------------------

def pack_blocks(blocks) -> bytes:
    if type(blocks) is array and blocks.typecode == "q" and sys.byteorder == "little":
        return blocks.tobytes()   # the engine's short submissions (kvbm.transfer.records.Blocks)
    arr = np.ascontiguousarray(np.asarray(blocks, dtype="<i8"))
    if arr.ndim != 1:
        raise ProtocolError(f"block array must be 1-D, got shape {arr.shape}")
    return arr.tobytes()


def unpack_blocks(data: Any, field: str, limit: int, max_count: int = MAX_BATCH_BLOCKS) -> np.ndarray:
    """int64 array from packed LE bytes, every index in [0, limit)."""
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(f"{field}: expected packed int64 bytes, got {type(data).__name__}")
    if len(data) % 8:
        raise ProtocolError(f"{field}: {len(data)} bytes is not a whole number of int64")
    return check_blocks(np.frombuffer(data, dtype="<i8").astype(np.int64, copy=False), field, limit, max_count)


def check_blocks(arr: np.ndarray, field: str, limit: int, max_count: int = MAX_BATCH_BLOCKS) -> np.ndarray:
    """`arr` (int64) when it holds 1..max_count block indices, every one in [0, limit): what an
    xfer's packed bytes unpack to, or a lane record's arrays (kvbm.workers.lanes)."""
    count = arr.shape[0]
    if count == 0 or count > max_count:
        raise ProtocolError(f"{field}: {count} blocks, expected 1..{max_count}")
    if count <= SMALL_ARRAY:
        values = arr.tolist()
        lo, hi = min(values), max(values)
    else:
        lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= limit:
        raise ProtocolError(f"{field}: block index range [{lo}, {hi}] outside [0, {limit})")
    return arr


def pack_field(name: str, values) -> bytes:
    """A per-block array of BLOCK_FIELDS as packed little-endian bytes."""
    return np.ascontiguousarray(np.asarray(values).astype(BLOCK_FIELDS[name], copy=False)).tobytes()


def unpack_field(msg: dict, name: str, count: int) -> np.ndarray:
    """The per-block array `name` of a message: exactly `count` items of its BLOCK_FIELDS dtype."""
    data = msg.get(name)
    dtype = np.dtype(BLOCK_FIELDS[name])
    if not isinstance(data, (bytes, bytearray)) or len(data) != count * dtype.itemsize:
        got = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise ProtocolError(f"{name}: expected {count} packed {dtype.str} values, got {got}")
    return np.frombuffer(data, dtype=dtype)


# ---- field checks -----------------------------------------------------------------------------

def _int(msg: dict, key: str, lo: int, hi: int, default: int | None = None) -> int:
    value = msg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"{key}: expected an int in [{lo}, {hi}], got {value!r}")
    return value


def _str(msg: dict, key: str, default: str | None = None) -> str:
    value = msg.get(key, default)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_STRING:
        raise ProtocolError(f"{key}: expected a non-empty string of <= {MAX_STRING} chars, got {value!r:.80}")
    return value


def _map(msg: dict, key: str) -> dict:
    value = msg.get(key)
    if not isinstance(value, dict):
        raise ProtocolError(f"{key}: expected a map, got {type(value).__name__}")
    return value


def _list(msg: dict, key: str, max_len: int) -> list:
    value = msg.get(key)
    if not isinstance(value, list) or len(value) > max_len:
        raise ProtocolError(f"{key}: expected a list of <= {max_len} items, got {type(value).__name__}")
    return value


def engine_of(msg: dict) -> str | None:
    """The message's engine id, checked before anything uses it as a key: a str of 1..MAX_ENGINE_ID
    chars, required by register/unregister/xfer, optional (None) elsewhere."""
    value = msg.get("engine")
    if value is None and msg.get("t") not in ENGINE_REQUIRED:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ENGINE_ID:
        raise ProtocolError(f"engine: expected a non-empty string of <= {MAX_ENGINE_ID} chars, got "
                            f"{type(value).__name__} {value!r:.80}")
    return value


# ---- messages ---------------------------------------------------------------------------------

def make_xfer(rid: int, engine: str, gen: int, path: Path, src, dst, priority: int = 0,
              layers: bool = False, gate: list | None = None, **fields: Any) -> dict:
    """`fields`: per-block arrays of BLOCK_FIELDS (packed here) and plain message fields."""
    msg = {"v": PROTOCOL_VERSION, "t": MsgType.XFER, "id": rid, "engine": engine, "gen": gen,
           "path": int(path), "src": pack_blocks(src), "dst": pack_blocks(dst), "prio": priority,
           "layers": bool(layers), "gate": gate}
    for key, value in fields.items():
        msg[key] = pack_field(key, value) if key in BLOCK_FIELDS else value
    return msg


def _check_gate(msg: dict) -> None:
    gate = msg.get("gate")
    if gate is not None and not (isinstance(gate, list) and len(gate) == 2
                                 and all(g is None or (isinstance(g, int) and not isinstance(g, bool))
                                         for g in gate)):
        raise ProtocolError(f"gate: expected nil or [iteration|nil, layer|nil], got {gate!r:.80}")


def check_xfer_fields(msg: dict, fields: frozenset = XFER_FIELDS) -> None:
    """Before an xfer is queued: only its own fields (`fields`: DISK_XFER_FIELDS at the disk
    worker), block arrays as bytes, a small gate and peer list. What a queued request keeps is then
    about its frame's size (a map of nested lists decodes to many times its frame), so a byte bound
    on queued frames bounds the memory they hold."""
    extra = msg.keys() - fields
    if extra:
        raise ProtocolError(f"xfer: unknown fields {sorted(map(str, extra))[:5]!r:.120}")
    for key in ("src", "dst"):
        if not isinstance(msg.get(key), (bytes, bytearray)):
            raise ProtocolError(f"{key}: expected packed int64 bytes, got {type(msg.get(key)).__name__}")
    for key in BLOCK_FIELDS.keys() & msg.keys():
        if not isinstance(msg[key], (bytes, bytearray)):
            raise ProtocolError(f"{key}: expected packed bytes, got {type(msg[key]).__name__}")
    peers = msg.get("peers")
    if peers is not None and (not isinstance(peers, list) or len(peers) > MAX_PEERS):
        raise ProtocolError(f"peers: expected a list of at most {MAX_PEERS} instance ids, got "
                            f"{type(peers).__name__} of {len(peers) if isinstance(peers, list) else '?'}")
    _check_gate(msg)


def validate_xfer(msg: dict, src_limit: int, dst_limit: int, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The (src, dst) arrays of an xfer request, checked against the handshaken layouts."""
    _int(msg, "id", 0, 2**63 - 1)
    _int(msg, "gen", 0, 2**31)
    _int(msg, "path", 0, len(Path) - 1)
    _int(msg, "prio", -(2**31), 2**31 - 1, 0)
    _str(msg, "engine")
    if not isinstance(msg.get("layers", False), bool):
        raise ProtocolError(f"layers: expected a bool, got {msg.get('layers')!r}")
    _check_gate(msg)
    cap = min(max_blocks, MAX_BATCH_BLOCKS)
    return check_pair(unpack_blocks(msg.get("src"), "src", src_limit, cap),
                      unpack_blocks(msg.get("dst"), "dst", dst_limit, cap))


def check_pair(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) of checked block arrays (check_blocks) when they pair up: equal counts, no
    destination named twice."""
    if src.shape[0] != dst.shape[0]:
        raise ProtocolError(f"src has {src.shape[0]} blocks, dst {dst.shape[0]}; expected equal counts")
    count = dst.shape[0]
    if (len(set(dst.tolist())) if count <= SMALL_ARRAY else np.unique(dst).shape[0]) != count:
        raise ProtocolError("dst names a block twice; destinations must be distinct")
    return src, dst


def make_done(rid: int, status: Status, error: str = "", nbytes: int = 0, gen: int = 0,
              queue_us: int = 0, copy_us: int = 0, **fields: Any) -> dict:
    """`fields`: per-block arrays of BLOCK_FIELDS (packed here) and plain fields (a disk reply's)."""
    msg = {"v": PROTOCOL_VERSION, "t": MsgType.DONE, "id": rid, "status": int(status),
           "error": error[:MAX_ERROR_TEXT], "bytes": nbytes, "gen": gen, "queue_us": queue_us,
           "copy_us": copy_us}
    for key, value in fields.items():
        msg[key] = pack_field(key, value) if key in BLOCK_FIELDS else value
    return msg


def validate_done(msg: dict) -> None:
    _int(msg, "id", -1, 2**63 - 1)
    _int(msg, "status", 0, len(Status) - 1)
    if not isinstance(msg.get("error", ""), str):
        raise ProtocolError("done.error: expected a string")
    _int(msg, "bytes", 0, 2**62, 0)


def make_layer(rid: int, layer: int) -> dict:
    return {"v": PROTOCOL_VERSION, "t": MsgType.LAYER, "id": rid, "layer": layer}


def make_event(kind: str, path: Path | None, gen: int, **extra: Any) -> dict:
    msg = {"v": PROTOCOL_VERSION, "t": MsgType.EVENT, "kind": kind,
           "path": None if path is None else int(path), "gen": gen}
    msg.update(extra)
    return msg


def register_placement(msg: dict) -> tuple[str, int]:
    """(group, host_offset) of a register request: the engine a TP rank belongs to ("" when the
    registration is an engine of its own), and the byte in the G2 segment where its host layout
    starts (0 by default)."""
    group = msg.get("group", "")
    if not isinstance(group, str) or len(group) > MAX_ENGINE_ID:
        raise ProtocolError(f"group: expected a string of <= {MAX_ENGINE_ID} chars, got "
                            f"{type(group).__name__} {group!r:.80}")
    return group, _int(msg, "host_offset", 0, 2**48, 0)


def register_lane(msg: dict) -> dict | None:
    """The shared-memory lane a register request offers (kvbm._fast.lane): {segment, size, bell},
    or None. Its contents are checked again by whoever maps it (the segment's owner and mode, the
    header, the bell's place)."""
    lane = msg.get("lane")
    if lane is None:
        return None
    lane = _map(msg, "lane")
    if not _str(lane, "segment").startswith("kvbm-"):
        raise ProtocolError(f"lane.segment: expected a kvbm segment name, got {lane['segment']!r:.80}")
    _int(lane, "size", 1, 1 << 30)
    _str(lane, "bell")
    return lane


def validate_register(msg: dict, need_memory: bool = True) -> tuple[dict, dict, dict | None]:
    """(device layout map, host layout map, device memory map) of a register request; its
    placement fields (group, host_offset) are checked too and read with register_placement.
    `memory` may be absent only where the worker maps no engine memory (the disk worker: a
    metadata-only engine, the vLLM connector's scheduler side, registers without tensors); the
    memory map is None then."""
    _str(msg, "engine")
    _int(msg, "pid", 0, 2**31, 0)
    register_placement(msg)
    device = _map(msg, "device")
    host = _map(msg, "host")
    for _, lay in (("device", device), ("host", host)):
        _int(_map(lay, "config"), "num_layers", 1, MAX_LAYERS)
        _int(lay, "type", 0, 1)
        _int(lay, "order", 0, 1, 0)
        _int(lay, "num_blocks", 1, 2**40)
    if msg.get("memory") is None:
        if need_memory:
            raise ProtocolError("memory: this worker copies to and from the engine's device memory, and the "
                                "register request names none (only the disk worker takes a registration "
                                "without memory)")
        return device, host, None
    mem = _map(msg, "memory")
    kind = _str(mem, "kind")
    if kind not in ("shm", "cuda_ipc"):
        raise ProtocolError(f"memory.kind: expected 'shm' or 'cuda_ipc', got {kind!r}")
    _int(mem, "device", 0, MAX_DEVICE, 0)
    buffers = _list(mem, "buffers", 4096)
    if not buffers:
        raise ProtocolError("memory.buffers: expected at least one buffer")
    for buf in buffers:
        if not isinstance(buf, dict):
            raise ProtocolError("memory.buffers[i]: expected a map")
        _int(buf, "nbytes", 1, 2**48)
        _int(buf, "offset", 0, 2**48, 0)
    return device, host, mem


def layout_to_wire(layout) -> dict:
    """A BlockLayout as a msgpack map (LayoutConfig.to_dict, type, order, num_blocks)."""
    return {"config": layout.config.to_dict(), "type": int(layout.layout_type), "order": int(layout.order),
            "num_blocks": int(layout.num_blocks)}


def layout_from_wire(data: dict):
    from kvbm.errors import LayoutError
    from kvbm.layout import BlockLayout, InnerOrder, LayoutConfig, LayoutType
    try:
        return BlockLayout(LayoutConfig.from_dict(data["config"]), LayoutType(data["type"]), data["num_blocks"],
                           InnerOrder(data.get("order", 0)))
    except (LayoutError, KeyError, ValueError, TypeError) as err:
        raise ProtocolError(f"bad layout on the wire: {err}") from err
