"""KV events for KV-aware routers, in vLLM's msgpack shape, and their ZeroMQ publisher.

Parts:
  BlockStored, BlockRemoved, AllBlocksCleared, KVEventBatch
                     the events and their batch, field for field as vLLM defines them
                     (vllm/distributed/kv_events.py), with a `medium` per event: TIER_MEDIUM
  encode_batch       a batch to msgpack bytes (msgpack, no msgspec): the "map" encoding vLLM
                     sends today, or the "array" encoding of earlier releases
  decode_batch       msgpack bytes to a batch, accepting both encodings; EventDecodeError otherwise
  KvEventPublisher   a PUB socket sending vLLM's frames, a ROUTER socket answering replay requests
                     from a bounded buffer, and the thread that owns both
  PoolEventRecorder  pool activity -> events: registrations (BlockStored, one per hash chain),
                     evictions (BlockRemoved, from the caller or drained from a pool), clears;
                     `take()` once per engine step
  to_vllm            events as vLLM's own structs, for a connector's take_events() (vLLM's
                     scheduler publishes them with its own events); the module is passed in

The shape (vLLM's msgspec structs; EventBatch is `array_like`, the events are `tag=True` and
`omit_defaults=True` but not `array_like`):
  batch    [ts, [event, ...], data_parallel_rank]                     (a 3-element array)
  event    {"type": "BlockStored", "block_hashes": [...], "parent_block_hash": h | nil,
            "token_ids": [...], "block_size": n, "lora_id": nil, "medium": "CPU", "lora_name": nil,
            then each later field (extra_keys, group_idx, ...) only when set}
           {"type": "BlockRemoved", "block_hashes": [...], "medium": "GPU", later fields when set}
           {"type": "AllBlocksCleared"}
  Earlier vLLM releases declared KVCacheEvent `array_like` too: an event was the tag and then its
  fields by position, ["BlockStored", hashes, parent, token_ids, block_size, lora_id, medium]
  (vLLM's examples/online_serving/kv_events_subscriber.py of that time copies those classes;
  the first ones had no medium). decode_batch takes either, and a batch written as a map of its
  field names.
A hash is an int (kvbm's u64 sequence hashes) or bytes (vLLM's sha256 hashes), as vLLM's
ExternalBlockHash.

Frames (vLLM's ZmqEventPublisher): PUB sends (topic, seq, payload), seq an 8-byte big-endian
count from 0. Replay: a REQ or DEALER client sends (b"", start seq as 8 bytes big-endian) to the
ROUTER; the answer is (b"", topic, seq, payload) for every buffered batch with seq >= start, then
the end marker (b"", b"", -1 as 8 signed bytes, b"").

Order: during an engine step the connector records pool activity (stored, removed, drain,
cleared) -> `take()` hands the step's events to vLLM (take_events) or to `publish()` -> the
publisher thread numbers, encodes, sends and buffers each batch, and between batches answers
replay requests. Sockets are touched only by that thread; `publish` never blocks (a full queue
drops the batch and counts it).
"""
from __future__ import annotations

import ipaddress
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from kvbm.errors import ConfigError, EventDecodeError, LifecycleError, PermissionRefusedError
from kvbm.pools import BlockPool, Tier

logger = logging.getLogger(__name__)

# vLLM's medium names (MEDIUM_GPU, MEDIUM_CPU, MEDIUM_STORAGE in kv_events.py); vLLM's own
# offloading connector reports its disk tier as "STORAGE", so G3 does too.
MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"
TIER_MEDIUM = {Tier.G1: MEDIUM_GPU, Tier.G2: MEDIUM_CPU, Tier.G3: MEDIUM_STORAGE}

ENCODINGS = ("map", "array")
END_SEQ = (-1).to_bytes(8, "big", signed=True)

# vLLM's declaration order. The first ones have no default (always written); the rest are
# written only when set. The array encoding of earlier releases stopped at "medium".
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                  "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window",
                  "locality", "ownership", "session_id", "lookahead_token_ids")
_STORED_REQUIRED = 7
_STORED_MIN = 4            # the first array releases: hashes, parent, token ids, block size
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx", "locality", "ownership")
_REMOVED_REQUIRED = 2
_REMOVED_MIN = 1

Hash = int | bytes


@dataclass(frozen=True, slots=True)
class BlockStored:
    """A chain of blocks now held in `medium`: block_hashes[0]'s parent is parent_block_hash, each
    later block's parent is the one before it. token_ids: the tokens of all of them
    (len(block_hashes) * block_size) or empty when the publisher has none."""

    block_hashes: list[Hash]
    parent_block_hash: Hash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # vLLM's later optional fields, by name


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks no longer held in `medium`."""

    block_hashes: list[Hash]
    medium: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every block of this publisher is gone (a reset, or a recorder that overflowed)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    ts: float                                   # time.time() when the batch was published
    events: list[KVEvent]
    data_parallel_rank: int | None = None


# ---- encoding -----------------------------------------------------------------------------------
def _stored_values(ev: BlockStored) -> list[Any]:
    return [list(ev.block_hashes), ev.parent_block_hash, list(ev.token_ids), ev.block_size, ev.lora_id,
            ev.medium, ev.lora_name]


def _event_obj(ev: KVEvent, encoding: str) -> Any:
    if isinstance(ev, BlockStored):
        tag, names, values, required = "BlockStored", _STORED_FIELDS, _stored_values(ev), _STORED_REQUIRED
    elif isinstance(ev, BlockRemoved):
        tag, names, values, required = ("BlockRemoved", _REMOVED_FIELDS, [list(ev.block_hashes), ev.medium],
                                        _REMOVED_REQUIRED)
    elif isinstance(ev, AllBlocksCleared):
        return {"type": "AllBlocksCleared"} if encoding == "map" else ["AllBlocksCleared"]
    else:
        raise TypeError(f"not a KV event: {type(ev).__name__}")
    extra = ev.extra
    later = names[required:]
    if encoding == "map":
        obj = {"type": tag, **dict(zip(names, values))}
        for name in later:
            if extra.get(name) is not None:
                obj[name] = extra[name]
        for name, value in extra.items():   # fields this module does not know yet, kept by name
            if name not in obj and value is not None:
                obj[name] = value
        return obj
    if tag == "BlockStored" and ev.lora_name is None and not any(extra.get(n) is not None for n in later):
        values = values[:6]   # the array releases stopped at medium
    tail = [extra.get(n) for n in later]
    while tail and tail[-1] is None:    # msgspec's omit_defaults drops trailing defaults only
        tail.pop()
    return [tag, *values, *tail] if tail else [tag, *values]


def encode_batch(batch: KVEventBatch, encoding: str = "map") -> bytes:
    """msgpack bytes of a batch: vLLM's current "map" events, or the "array" events of earlier
    releases. Hashes must be ints in [-2**63, 2**64) or bytes (msgpack's range)."""
    if encoding not in ENCODINGS:
        raise ConfigError(f"kv events encoding: expected one of {ENCODINGS}, got {encoding!r}")
    events = [_event_obj(ev, encoding) for ev in batch.events]
    return msgpack.packb([float(batch.ts), events, batch.data_parallel_rank], use_bin_type=True)


# ---- decoding -----------------------------------------------------------------------------------
def decode_batch(payload: bytes) -> KVEventBatch:
    """A batch from msgpack bytes in either encoding. Anything else raises EventDecodeError naming
    the field and what was there."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise EventDecodeError(f"kv event payload: expected bytes, got {type(payload).__name__}")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError,
            UnicodeDecodeError) as err:
        raise EventDecodeError(f"kv event payload of {len(payload)} bytes is not one msgpack value: {err}") from err
    if isinstance(obj, dict):
        unknown = set(obj) - {"ts", "events", "data_parallel_rank"}
        if unknown or "ts" not in obj or "events" not in obj:
            raise EventDecodeError(f"kv event batch map: expected keys ts, events[, data_parallel_rank], got "
                                   f"{sorted(map(str, obj))}")
        ts, events, rank = obj["ts"], obj["events"], obj.get("data_parallel_rank")
    elif isinstance(obj, list):
        if len(obj) not in (2, 3):
            raise EventDecodeError(f"kv event batch: expected [ts, events, data_parallel_rank] (2 or 3 "
                                   f"elements), got {len(obj)} elements")
        ts, events = obj[0], obj[1]
        rank = obj[2] if len(obj) == 3 else None
    else:
        raise EventDecodeError(f"kv event batch: expected an array or a map, got {type(obj).__name__}")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise EventDecodeError(f"kv event batch: ts must be a number, got {ts!r}")
    if not isinstance(events, list):
        raise EventDecodeError(f"kv event batch: events must be an array, got {type(events).__name__}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise EventDecodeError(f"kv event batch: data_parallel_rank must be an int or nil, got {rank!r}")
    return KVEventBatch(float(ts), [_decode_event(ev, i) for i, ev in enumerate(events)], rank)


def _decode_event(obj: Any, i: int) -> KVEvent:
    if isinstance(obj, dict):
        tag = obj.get("type")
        fields_ = {k: v for k, v in obj.items() if k != "type"}
        positional = False
    elif isinstance(obj, list) and obj:
        tag = obj[0]
        fields_ = obj[1:]
        positional = True
    else:
        raise EventDecodeError(f"kv event {i}: expected a tagged map or a tagged array, got {obj!r:.80}")
    if tag == "BlockStored":
        names, required, minimum = _STORED_FIELDS, _STORED_REQUIRED, _STORED_MIN
    elif tag == "BlockRemoved":
        names, required, minimum = _REMOVED_FIELDS, _REMOVED_REQUIRED, _REMOVED_MIN
    elif tag == "AllBlocksCleared":
        if fields_:
            raise EventDecodeError(f"kv event {i}: AllBlocksCleared has no fields, got {fields_!r:.80}")
        return AllBlocksCleared()
    else:
        raise EventDecodeError(f"kv event {i}: unknown type {tag!r} (known: BlockStored, BlockRemoved, "
                               "AllBlocksCleared)")
    if positional:
        if not minimum <= len(fields_) <= len(names):
            raise EventDecodeError(f"kv event {i} ({tag}): expected {minimum} to {len(names)} fields, got "
                                   f"{len(fields_)}")
        values = dict(zip(names, fields_))
    else:
        missing = [n for n in names[:required] if n not in fields_]
        # a map with the first release's fields only (no medium, no lora_name) is accepted too
        if [n for n in missing if n not in ("medium", "lora_name", "lora_id")]:
            raise EventDecodeError(f"kv event {i} ({tag}): missing {', '.join(missing)}")
        values = fields_
    hashes = _hashes(values["block_hashes"], i, tag, "block_hashes")
    medium = _opt(values.get("medium"), str, i, tag, "medium")
    extra = {k: v for k, v in values.items() if k not in names[:required] and v is not None}
    if tag == "BlockRemoved":
        return BlockRemoved(hashes, medium, extra)
    parent = values["parent_block_hash"]
    if parent is not None:
        parent = _hashes([parent], i, tag, "parent_block_hash")[0]
    tokens = values["token_ids"]
    if not isinstance(tokens, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in tokens):
        raise EventDecodeError(f"kv event {i} ({tag}): token_ids must be an array of ints, got {tokens!r:.80}")
    size = values["block_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise EventDecodeError(f"kv event {i} ({tag}): block_size must be an int >= 0, got {size!r}")
    return BlockStored(hashes, parent, tokens, size, _opt(values.get("lora_id"), int, i, tag, "lora_id"), medium,
                       _opt(values.get("lora_name"), str, i, tag, "lora_name"), extra)


def _hashes(value: Any, i: int, tag: str, name: str) -> list[Hash]:
    if not isinstance(value, list):
        raise EventDecodeError(f"kv event {i} ({tag}): {name} must be an array, got {type(value).__name__}")
    for h in value:
        if isinstance(h, bool) or not isinstance(h, (int, bytes)):
            raise EventDecodeError(f"kv event {i} ({tag}): {name}: a hash is an int or bytes, got {h!r:.40}")
    return value


def _opt(value: Any, kind: type, i: int, tag: str, name: str) -> Any:
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
        raise EventDecodeError(f"kv event {i} ({tag}): {name} must be {kind.__name__} or nil, got {value!r:.40}")
    return value


def decode_frames(frames: Sequence[bytes]) -> tuple[bytes, int, KVEventBatch]:
    """(topic, seq, batch) from one PUB message or one replay answer without its empty delimiter."""
    if len(frames) != 3:
        raise EventDecodeError(f"kv event message: expected 3 frames (topic, seq, payload), got {len(frames)}")
    topic, seq, payload = (bytes(f) for f in frames)
    if len(seq) != 8:
        raise EventDecodeError(f"kv event message: seq must be 8 bytes, got {len(seq)}")
    return topic, int.from_bytes(seq, "big"), decode_batch(payload)


# ---- publisher ----------------------------------------------------------------------------------
def _check_endpoint(endpoint: str, what: str, allow_remote: bool) -> str:
    """tcp://HOST:PORT (PORT 0 or *: a free port), ipc://PATH or inproc://NAME. A tcp host other
    than a loopback address needs allow_remote: events carry the prompts' token ids."""
    if not isinstance(endpoint, str):
        raise ConfigError(f"{what}: expected a string endpoint, got {endpoint!r}")
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise ConfigError(f"{what}: expected tcp://HOST:PORT, ipc://PATH or inproc://NAME, got {endpoint!r}")
    if scheme != "tcp":
        return endpoint
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not (port == "*" or port.isdigit() and int(port) < 65536):
        raise ConfigError(f"{what}: expected tcp://HOST:PORT with PORT in 0..65535 or *, got {endpoint!r}")
    bare = host.strip("[]")
    if not allow_remote and bare != "localhost":
        try:
            loopback = ipaddress.ip_address(bare).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise PermissionRefusedError(f"{what}: {endpoint!r} is not a loopback address; KV events carry "
                                         "token ids: pass allow_remote=True to publish beyond this host")
    return f"tcp://{host}:*" if port in ("0", "*") else endpoint


class KvEventPublisher:
    """vLLM's ZmqEventPublisher, for kvbm's events: PUB on `endpoint`, replay ROUTER on
    `replay_endpoint` (None: no replay), the last `buffer_steps` batches kept for replay.
    `endpoint` / `replay_endpoint` attributes hold the bound addresses (a free port resolved)."""

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5557", replay_endpoint: str | None = None, *,
                 topic: str = "", buffer_steps: int = 10_000, hwm: int = 100_000, max_queue: int = 100_000,
                 data_parallel_rank: int = 0, encoding: str = "map", allow_remote: bool = False,
                 context=None) -> None:
        import zmq
        for name, value in (("buffer_steps", buffer_steps), ("hwm", hwm), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"kv event publisher: {name} must be an int >= 1, got {value!r}")
        if encoding not in ENCODINGS:
            raise ConfigError(f"kv events encoding: expected one of {ENCODINGS}, got {encoding!r}")
        pub_at = _check_endpoint(endpoint, "kv events endpoint", allow_remote)
        replay_at = None if replay_endpoint is None else _check_endpoint(replay_endpoint, "kv events replay endpoint",
                                                                        allow_remote)
        self.topic = topic.encode()
        self.encoding = encoding
        self.data_parallel_rank = data_parallel_rank
        self.published = 0          # batches sent
        self.dropped = 0            # batches refused by a full queue
        self.replays = 0            # replay requests answered
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._closed = False
        ctx = context or zmq.Context.instance()
        self._pub = ctx.socket(zmq.PUB)
        self._replay = None
        try:
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.setsockopt(zmq.SNDHWM, hwm)
            self.endpoint = self._bind(self._pub, pub_at)
            self.replay_endpoint = None
            if replay_at is not None:
                self._replay = ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                # a full replay plus its end marker fits (vLLM: ZMQ acks reads every HWM/2 messages)
                self._replay.setsockopt(zmq.SNDHWM, 2 * (buffer_steps + 1))
                self.replay_endpoint = self._bind(self._replay, replay_at)
        except zmq.ZMQError as err:
            self._close_sockets()
            raise ConfigError(f"kv events: cannot bind {endpoint!r} / {replay_endpoint!r}: {err}") from err
        self._thread = threading.Thread(target=self._run, name="kvbm-kv-events", daemon=True)
        self._thread.start()
        logger.info("kv events: publishing on %s (replay: %s, topic %r, %s encoding)", self.endpoint,
                    self.replay_endpoint, topic, encoding)

    @staticmethod
    def _bind(sock, endpoint: str) -> str:
        import zmq
        sock.bind(endpoint)
        return sock.getsockopt(zmq.LAST_ENDPOINT).decode() if endpoint.startswith("tcp://") else endpoint

    def publish(self, events: list[KVEvent], ts: float | None = None) -> bool:
        """Queues one batch (an empty list sends nothing). False when the queue is full: the batch
        is dropped and counted, and subscribers do not see it (no sequence number was spent)."""
        if self._closed:
            raise LifecycleError("kv event publisher is closed")
        if not events:
            return True
        try:
            self._queue.put_nowait((time.time() if ts is None else ts, events))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("kv events: queue full (%d batches); %d batches dropped so far",
                               self._queue.maxsize, self.dropped)
            return False
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Sends what is queued (within `timeout`), then closes the sockets."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._queue.put(None, timeout=0.05)   # after the queued batches: FIFO
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    break
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            logger.warning("kv events: publisher thread still running after %.1f s; %d batches unsent",
                           timeout, self._queue.qsize())

    def __enter__(self) -> KvEventPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the publisher thread ----
    def _run(self) -> None:
        try:
            while True:
                if self._replay is not None and self._replay.poll(0):
                    self._serve_replay()
                try:
                    item = self._queue.get(timeout=0.01)
                except queue.Empty:
                    if self._closed and self._queue.empty():
                        break
                    continue
                if item is None:
                    break
                ts, events = item
                try:
                    payload = encode_batch(KVEventBatch(ts, events, self.data_parallel_rank), self.encoding)
                except (TypeError, ValueError, OverflowError) as err:   # one bad batch: the stream goes on
                    logger.error("kv events: a batch of %d events cannot be encoded; dropped", len(events),
                                 exc_info=err)
                    self.dropped += 1
                    continue
                seq = self._seq
                self._seq += 1
                self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
                self._buffer.append((seq, payload))
                self.published += 1
        except Exception:   # the thread's boundary: log, stop publishing
            logger.error("kv events: publisher thread failed", exc_info=True)
        finally:
            self._close_sockets()

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
            logger.warning("kv events: replay request of %d frames (%s bytes) ignored; expected (empty, 8-byte "
                           "seq)", len(frames), [len(f) for f in frames])
            return
        client, _, start = frames
        first = int.from_bytes(start, "big")
        self.replays += 1     # before the answer: a client that has the end marker sees the count
        for seq, payload in self._buffer:
            if seq >= first:
                self._replay.send_multipart((client, b"", self.topic, seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", b"", END_SEQ, b""))

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)


# ---- pool activity -> events --------------------------------------------------------------------
class PoolEventRecorder:
    """Events of one engine's pools, gathered through a step and taken once per step.

    `stored(tier, hashes, parents, has_parent, token_ids)` after a registration (the hashes that
    were new there: a deduplicated block was announced when it was first stored), split into
    chains where parents[i] != hashes[i - 1]; `removed(tier, hashes)` with evicted hashes;
    `drain(pool)` reads a pool's evicted-hash ring itself (only for a pool nobody else drains:
    the disk tier's victim cleaner drains G2's, to count the victims it lost); `cleared()` after a
    reset. Each call is a few numpy operations and one event per chain, never a Python object per
    block besides the event lists.
    Past `max_pending` recorded hashes without a take, the pending events are replaced by one
    AllBlocksCleared (routers forget this engine's blocks rather than believe a gap)."""

    def __init__(self, block_size: int, max_pending: int = 1 << 20) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"kv events: block_size must be an int >= 1, got {block_size!r}")
        self.block_size = block_size
        self.max_pending = max_pending
        self.overflows = 0
        self._events: list[KVEvent] = []
        self._pending = 0

    def stored(self, tier: Tier | int, hashes, parents=None, has_parent=None,
               token_ids: Sequence[int] | None = None, lora_name: str | None = None) -> int:
        """BlockStored events for hashes now held in `tier`; returns how many events."""
        h = np.asarray(hashes, dtype=np.uint64).ravel()
        n = h.size
        if n == 0:
            return 0
        if token_ids is not None and len(token_ids) != n * self.block_size:
            raise ConfigError(f"kv events: {len(token_ids)} token ids for {n} blocks of {self.block_size} tokens")
        medium = TIER_MEDIUM[Tier(tier)]
        if parents is None:
            starts = np.zeros(1, dtype=np.int64)
            p = hp = None
        else:
            p = np.asarray(parents, dtype=np.uint64).ravel()
            hp = np.ones(n, dtype=bool) if has_parent is None else np.asarray(has_parent, dtype=bool).ravel()
            if p.size != n or hp.size != n:
                raise ConfigError(f"kv events: {n} hashes but {p.size} parents and {hp.size} has_parent flags")
            chained = hp[1:] & (p[1:] == h[:-1])
            starts = np.concatenate(([0], np.flatnonzero(~chained) + 1))
        ends = np.append(starts[1:], n)
        hashes_list = h.tolist()
        bs = self.block_size
        for s, e in zip(starts.tolist(), ends.tolist()):
            parent = int(p[s]) if p is not None and hp[s] else None
            tokens = list(token_ids[s * bs:e * bs]) if token_ids is not None else []
            self._events.append(BlockStored(hashes_list[s:e], parent, tokens, bs, None, medium, lora_name))
        self._grew(n)
        return len(starts)

    def removed(self, tier: Tier | int, hashes) -> None:
        h = np.asarray(hashes, dtype=np.uint64).ravel()
        if h.size:
            self._events.append(BlockRemoved(h.tolist(), TIER_MEDIUM[Tier(tier)]))
            self._grew(h.size)

    def drain(self, pool: BlockPool) -> int:
        """BlockRemoved for the hashes `pool` evicted since its last drain; returns how many."""
        evicted = pool.registry.drain_evicted()
        self.removed(pool.tier, evicted)
        return int(evicted.size)

    def cleared(self) -> None:
        self._events.append(AllBlocksCleared())

    def take(self) -> list[KVEvent]:
        """The events since the last take, oldest first."""
        events, self._events, self._pending = self._events, [], 0
        return events

    def _grew(self, n: int) -> None:
        self._pending += n
        if self._pending > self.max_pending:
            self.overflows += 1
            logger.warning("kv events: %d hashes recorded without a take (limit %d); replaced by AllBlocksCleared",
                           self._pending, self.max_pending)
            self._events = [AllBlocksCleared()]
            self._pending = 0


def to_vllm(events: Iterable[KVEvent], kv_events) -> list[Any]:
    """The events as vLLM's structs; `kv_events` is the module vllm.distributed.kv_events (passed
    in: nothing here imports vLLM)."""
    out = []
    for ev in events:
        if isinstance(ev, BlockStored):
            out.append(kv_events.BlockStored(block_hashes=ev.block_hashes, parent_block_hash=ev.parent_block_hash,
                                             token_ids=ev.token_ids, block_size=ev.block_size, lora_id=ev.lora_id,
                                             medium=ev.medium, lora_name=ev.lora_name, **ev.extra))
        elif isinstance(ev, BlockRemoved):
            out.append(kv_events.BlockRemoved(block_hashes=ev.block_hashes, medium=ev.medium, **ev.extra))
        elif isinstance(ev, AllBlocksCleared):
            out.append(kv_events.AllBlocksCleared())
        else:
            raise TypeError(f"not a KV event: {type(ev).__name__}")
    return out


def events_of(batches: Iterable[KVEventBatch]) -> list[KVEvent]:
    """Every event of several batches, in order (for subscribers and tests)."""
    return [ev for b in batches for ev in b.events]
