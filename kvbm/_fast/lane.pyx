# cython: language_level=3
"""The lane: one engine's shared-memory hot path to one path worker (issue 12).

A request ring (engine -> worker) and a completion ring (worker -> engine) in a 0600 segment the
engine creates (kvbm.transfer.lane), each single-producer single-consumer, with the cursors and the
two "sleeping" words on their own cache lines. ZeroMQ stays the control channel: registration,
errors (with their text), STALE answers and everything a lane cannot carry; the lane carries only
fixed-size records, so a request costs no msgpack, no ZeroMQ I/O thread and no queue hand-off.

Parts:
  layout        LaneHeader (magic, version, sizes, the engine id; then the cursors, one cache line
                each), `req_slots` request records (rid, gen, priority, flags, n, src[max], dst[max])
                and `done_slots` completion records (rid, kind, layer, bytes, queue/copy us)
  Lane          a view of such a segment (by address and size), used from both sides:
                engine: post() a request, take_done() the completions, sleep()/wake() around its
                        blocking poll; worker: take() the requests, put_done(), sleep()/wake().
Ordering: a producer writes the record, then publishes its cursor with a release store; a consumer
reads the cursor with an acquire load, then the records, then publishes its own cursor. Sleeping:
the consumer stores sleeping = 1, fences (seq_cst), re-checks its ring and only then blocks; the
producer publishes, fences, and rings the doorbell when it reads sleeping = 1. One of the two
always sees the other's store, so no wake-up is lost (a spare doorbell only costs a wake-up).
Ringing ahead: a request flagged FLAG_RING_AHEAD asks the worker to ring a sleeping engine as its
copy starts (ring_engine_ahead), so the engine's wake-up overlaps the copy; the engine asks it only
when no thread of its own waits on the lane for that completion. The ring marks `engine_rung`, and
the DONE then skips a second ring while the mark stands. The engine clears the mark after every
drain of its doorbell (take_engine_rung): a mark is set only before its ring is sent, so a mark
that stands has a ring behind it that is not drained yet, and a DONE that trusts it loses no
wake-up. A ring that was never sent (the worker killed between the mark and the ring, or its send
failing) would leave a mark with nothing behind it: the worker clears it when its send fails, and
the engine when a new generation takes the lane.
Nothing read from the segment is trusted: cursors that run backwards or ahead of the ring, counts
past `max_blocks`, kinds out of range raise LaneError; the peer then drops the lane (the engine
falls back to ZeroMQ), it never indexes out of the segment.
"""
from libc.errno cimport EINTR, errno
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset, strncpy

import os

import numpy as np

from kvbm.errors import KvbmError


class LaneError(KvbmError):
    """A lane segment holds what no peer of ours writes: the lane is dropped, ZeroMQ carries on."""


cdef extern from *:
    """
    #include <stdint.h>
    static inline uint64_t lane_load(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void lane_store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline void lane_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    static inline uint64_t lane_swap(uint64_t *p, uint64_t v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
    #include <time.h>
    static inline double lane_now_us(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
    }
    static inline void lane_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }
    """
    uint64_t lane_load(uint64_t *p) nogil
    void lane_store(uint64_t *p, uint64_t v) nogil
    void lane_fence() nogil
    uint64_t lane_swap(uint64_t *p, uint64_t v) nogil
    double lane_now_us() nogil
    void lane_relax() nogil


cdef enum:
    LANE_MAGIC_LO = 0x4e414c4d42564b    # "KVBMLAN" (little endian), the low 56 bits
    LANE_VERSION = 2     # 2: engine_rung (ringing ahead)
    ENGINE_ID_BYTES = 96
    LINE = 64
    MAX_SPIN_LANES = 64     # lanes one spin() watches (a worker serves a few engines' TP ranks)


ctypedef struct LaneHeader:
    uint64_t magic
    uint64_t version
    uint64_t req_slots           # request records (a power of two)
    uint64_t done_slots          # completion records (a power of two)
    uint64_t max_blocks          # block pairs a request record holds
    uint64_t req_bytes           # bytes of one request record
    char engine[ENGINE_ID_BYTES]  # the engine that created it (the worker checks its registration's)
    char pad0[LINE * 4 - 48 - ENGINE_ID_BYTES]
    uint64_t req_tail            # engine: requests posted (a count; slot = count & (req_slots - 1))
    char pad1[LINE - 8]
    uint64_t req_head            # worker: requests taken
    char pad2[LINE - 8]
    uint64_t done_tail           # worker: completions posted
    char pad3[LINE - 8]
    uint64_t done_head           # engine: completions taken
    char pad4[LINE - 8]
    uint64_t worker_sleeping     # 1 while the worker blocks in its poll: post() rings its doorbell
    char pad5[LINE - 8]
    uint64_t engine_sleeping     # 1 while the engine's I/O thread blocks: put_done() rings its doorbell
    uint64_t engine_rung         # 1: the worker rang ahead and the engine has not drained it yet
    char pad6[LINE - 16]


ctypedef struct ReqHead:        # followed by src[max_blocks], dst[max_blocks] (int64 each)
    uint64_t rid
    uint32_t gen
    int32_t prio
    uint32_t flags               # FLAG_LAYERS
    uint32_t n                   # block pairs used


ctypedef struct DoneRec:
    uint64_t rid
    uint32_t kind                # DONE_OK or DONE_LAYER
    uint32_t layer               # DONE_LAYER: layers 0..layer have landed
    uint64_t nbytes
    uint32_t queue_us
    uint32_t copy_us


FLAG_LAYERS = 1
FLAG_RING_AHEAD = 2     # ring the engine ahead of this request's completion (see ring_engine_ahead)
DONE_OK = 1
DONE_LAYER = 2


def bytes_needed(int64_t req_slots, int64_t done_slots, int64_t max_blocks) -> int:
    return sizeof(LaneHeader) + req_slots * _req_bytes(max_blocks) + done_slots * sizeof(DoneRec)


cdef inline int64_t _req_bytes(int64_t max_blocks) noexcept nogil:
    return (sizeof(ReqHead) + 16 * max_blocks + LINE - 1) // LINE * LINE


cdef inline bint _pow2(int64_t x) noexcept nogil:
    return x > 0 and (x & (x - 1)) == 0


cdef class Lane:
    """A lane segment mapped at `address` (`size` bytes; the caller keeps the mapping alive).
    Lane.init() formats a new one (engine side); Lane(address, size) checks an existing one."""
    cdef LaneHeader *h
    cdef char *reqs
    cdef DoneRec *done
    cdef readonly int64_t req_slots, done_slots, max_blocks
    cdef int64_t req_bytes
    cdef object _keep

    def __cinit__(self, size_t address, int64_t size, keep=None):
        self._keep = keep
        if size < <int64_t>sizeof(LaneHeader):
            raise LaneError(f"lane segment of {size} bytes; the header alone is {sizeof(LaneHeader)}")
        self.h = <LaneHeader *>address
        if self.h.magic != LANE_MAGIC_LO or self.h.version != LANE_VERSION:
            raise LaneError(f"not a lane segment of version {LANE_VERSION} (magic {self.h.magic:#x}, "
                            f"version {self.h.version})")
        cdef int64_t rs = <int64_t>self.h.req_slots, ds = <int64_t>self.h.done_slots
        cdef int64_t mb = <int64_t>self.h.max_blocks
        if not (_pow2(rs) and _pow2(ds) and 0 < mb <= 65536 and rs <= 65536 and ds <= 65536
                and <int64_t>self.h.req_bytes == _req_bytes(mb)):
            raise LaneError(f"lane header out of range: {rs} request slots, {ds} completion slots, "
                            f"{mb} blocks per request, {self.h.req_bytes}-byte records")
        if size < bytes_needed(rs, ds, mb):
            raise LaneError(f"lane segment of {size} bytes; its header describes {bytes_needed(rs, ds, mb)}")
        self.req_slots, self.done_slots, self.max_blocks = rs, ds, mb
        self.req_bytes = _req_bytes(mb)
        self.reqs = <char *>address + sizeof(LaneHeader)
        self.done = <DoneRec *>(self.reqs + rs * self.req_bytes)

    @staticmethod
    def init(size_t address, int64_t size, str engine, int64_t req_slots, int64_t done_slots,
             int64_t max_blocks, keep=None) -> Lane:
        if not (_pow2(req_slots) and _pow2(done_slots) and done_slots >= 2 * req_slots and 0 < max_blocks <= 65536):
            raise LaneError(f"lane of {req_slots} request slots, {done_slots} completion slots, {max_blocks} "
                            f"blocks: slots must be powers of two with at least twice as many completions")
        if size < bytes_needed(req_slots, done_slots, max_blocks):
            raise LaneError(f"lane needs {bytes_needed(req_slots, done_slots, max_blocks)} bytes, got {size}")
        cdef LaneHeader *h = <LaneHeader *>address
        memset(h, 0, sizeof(LaneHeader))
        raw = engine.encode()[:ENGINE_ID_BYTES - 1]
        strncpy(h.engine, raw, ENGINE_ID_BYTES - 1)
        h.req_slots, h.done_slots, h.max_blocks = req_slots, done_slots, max_blocks
        h.req_bytes = _req_bytes(max_blocks)
        h.version = LANE_VERSION
        lane_fence()
        h.magic = LANE_MAGIC_LO
        return Lane(address, size, keep)

    @property
    def engine(self) -> str:
        return self.h.engine[:ENGINE_ID_BYTES - 1].decode("utf-8", "replace").rstrip("\0")

    # ---- engine side ---------------------------------------------------------------------------
    def post(self, uint64_t rid, uint32_t gen, int32_t prio, uint32_t flags, src, dst) -> int:
        """Writes one request. 0: the ring is full (nothing written); 1: posted; 2: posted and the
        worker sleeps (ring its doorbell). Callers serialise post() (one producer)."""
        cdef const int64_t[::1] s = src
        cdef const int64_t[::1] d = dst
        cdef int64_t n = s.shape[0]
        if n != d.shape[0] or n <= 0 or n > self.max_blocks:
            raise LaneError(f"lane request of {n} source / {d.shape[0]} destination blocks "
                            f"(1..{self.max_blocks})")
        cdef uint64_t tail = self.h.req_tail          # ours: no one else writes it
        cdef uint64_t head = lane_load(&self.h.req_head)
        if tail - head >= <uint64_t>self.req_slots:
            return 0
        cdef char *slot = self.reqs + (tail & <uint64_t>(self.req_slots - 1)) * self.req_bytes
        cdef ReqHead *r = <ReqHead *>slot
        r.rid, r.gen, r.prio, r.flags, r.n = rid, gen, prio, flags, <uint32_t>n
        cdef int64_t *blocks = <int64_t *>(slot + sizeof(ReqHead))
        memcpy(blocks, &s[0], n * 8)
        memcpy(blocks + self.max_blocks, &d[0], n * 8)
        lane_store(&self.h.req_tail, tail + 1)
        lane_fence()
        return 2 if lane_load(&self.h.worker_sleeping) else 1

    def take_done(self) -> list:
        """Every completion posted: [(rid, kind, layer, nbytes, queue_us, copy_us)]."""
        cdef uint64_t head = self.h.done_head
        cdef uint64_t tail = lane_load(&self.h.done_tail)
        if tail - head > <uint64_t>self.done_slots:
            raise LaneError(f"lane completion cursor {tail} is {tail - head} ahead of {head} "
                            f"({self.done_slots} slots)")
        out = []
        cdef DoneRec *rec
        while head != tail:
            rec = &self.done[head & <uint64_t>(self.done_slots - 1)]
            out.append((rec.rid, rec.kind, rec.layer, rec.nbytes, rec.queue_us, rec.copy_us))
            head += 1
        lane_store(&self.h.done_head, head)
        return out

    def engine_sleep(self) -> bool:
        """Before the engine blocks: True when it may (nothing posted since), else it must not."""
        self.h.engine_sleeping = 1
        lane_fence()
        if lane_load(&self.h.done_tail) != self.h.done_head:
            self.h.engine_sleeping = 0
            return False
        return True

    def engine_wake(self) -> None:
        self.h.engine_sleeping = 0

    def take_engine_rung(self) -> bool:
        """Clears the ring-ahead mark (ring_engine_ahead); True when it was set. The engine calls
        it after each drain of its doorbell; clearing is always safe (at worst one spare ring)."""
        cdef uint64_t was = lane_swap(&self.h.engine_rung, 0)
        return was != 0

    # ---- worker side ---------------------------------------------------------------------------
    def take(self, int64_t limit) -> list:
        """Up to `limit` requests: [(rid, gen, prio, flags, src int64 array, dst int64 array)]."""
        cdef uint64_t head = self.h.req_head
        cdef uint64_t tail = lane_load(&self.h.req_tail)
        if tail - head > <uint64_t>self.req_slots:
            raise LaneError(f"lane request cursor {tail} is {tail - head} ahead of {head} "
                            f"({self.req_slots} slots)")
        out = []
        cdef char *slot
        cdef ReqHead *r
        cdef int64_t n
        cdef int64_t[::1] sv, dv
        while head != tail and len(out) < limit:
            slot = self.reqs + (head & <uint64_t>(self.req_slots - 1)) * self.req_bytes
            r = <ReqHead *>slot
            n = r.n
            if n <= 0 or n > self.max_blocks:
                raise LaneError(f"lane request {r.rid} names {n} blocks (1..{self.max_blocks})")
            src = np.empty(n, dtype=np.int64)
            dst = np.empty(n, dtype=np.int64)
            sv, dv = src, dst
            memcpy(&sv[0], slot + sizeof(ReqHead), n * 8)
            memcpy(&dv[0], slot + sizeof(ReqHead) + 8 * self.max_blocks, n * 8)
            out.append((r.rid, r.gen, r.prio, r.flags, src, dst))
            head += 1
        lane_store(&self.h.req_head, head)
        return out

    def skip(self) -> int:
        """Drops every request posted so far (a new worker generation attaching: they were meant
        for its predecessor, whose death fails them). Returns how many."""
        cdef uint64_t head = self.h.req_head
        cdef uint64_t tail = lane_load(&self.h.req_tail)
        lane_store(&self.h.req_head, tail)
        return <int64_t>(tail - head)

    def put_done(self, uint64_t rid, uint32_t kind, uint32_t layer, uint64_t nbytes, uint32_t queue_us,
                 uint32_t copy_us) -> int:
        """0: no room (a layer record is simply not sent, the next one or the DONE supersedes it);
        1: posted; 2: posted and the engine sleeps (ring its doorbell). A DONE always has room while
        the engine keeps at most req_slots requests in the lane (done_slots >= 2 req_slots) and
        layer records leave req_slots free."""
        cdef uint64_t tail = self.h.done_tail
        cdef uint64_t head = lane_load(&self.h.done_head)
        cdef uint64_t used = tail - head
        if used > <uint64_t>self.done_slots:
            raise LaneError(f"lane completion cursors run backwards ({head} taken of {tail})")
        cdef uint64_t room = <uint64_t>self.done_slots - used
        if room == 0 or (kind == DONE_LAYER and room <= <uint64_t>self.req_slots):
            return 0
        cdef DoneRec *rec = &self.done[tail & <uint64_t>(self.done_slots - 1)]
        rec.rid, rec.kind, rec.layer, rec.nbytes, rec.queue_us, rec.copy_us = rid, kind, layer, nbytes, queue_us, copy_us
        lane_store(&self.h.done_tail, tail + 1)
        lane_fence()
        return 2 if lane_load(&self.h.engine_sleeping) and not lane_load(&self.h.engine_rung) else 1

    def ring_engine_ahead(self) -> bool:
        """When a flagged request's copy starts: True when the engine sleeps and no ring is
        pending, the mark now set (the caller rings its doorbell; the DONE won't ring again)."""
        return lane_load(&self.h.engine_sleeping) != 0 and lane_swap(&self.h.engine_rung, 1) == 0

    def worker_sleep(self) -> bool:
        self.h.worker_sleeping = 1
        lane_fence()
        if lane_load(&self.h.req_tail) != self.h.req_head:
            self.h.worker_sleeping = 0
            return False
        return True

    def worker_wake(self) -> None:
        self.h.worker_sleeping = 0

    def has_requests(self) -> bool:
        return lane_load(&self.h.req_tail) != self.h.req_head

    @property
    def states(self) -> tuple:
        """(worker sleeping, engine sleeping, engine rung ahead), as 0/1 (a ring ahead counts
        until the engine drains its doorbell)."""
        return (lane_load(&self.h.worker_sleeping), lane_load(&self.h.engine_sleeping),
                lane_load(&self.h.engine_rung))

    @property
    def counts(self) -> tuple:
        """(requests posted, requests taken, completions posted, completions taken) so far."""
        return (lane_load(&self.h.req_tail), lane_load(&self.h.req_head), lane_load(&self.h.done_tail),
                lane_load(&self.h.done_head))


def spin(list lanes, bint completions, double max_us) -> bool:
    """Polls the lanes without the GIL for up to `max_us`: True as soon as one has completions
    (`completions`, the engine's side) or requests (the worker's). The cheap way to catch the
    next record of a busy exchange: a doorbell costs the ringer a syscall and a wake-up (~15-20 us
    each on the machines measured) and the sleeper its scheduling latency."""
    cdef LaneHeader *heads[MAX_SPIN_LANES]
    cdef int n = 0, i
    cdef Lane lane
    for obj in lanes[:MAX_SPIN_LANES]:
        lane = <Lane?>obj
        heads[n] = lane.h
        n += 1
    if n == 0 or max_us <= 0:
        return False
    cdef double until
    cdef bint found = False
    with nogil:
        until = lane_now_us() + max_us
        while not found:
            for i in range(n):
                if completions:
                    found = lane_load(&heads[i].done_tail) != heads[i].done_head
                else:
                    found = lane_load(&heads[i].req_tail) != heads[i].req_head
                if found:
                    break
            if found or lane_now_us() >= until:
                break
            lane_relax()
    return found


# ---- wake-ups that keep the GIL ----------------------------------------------------------------
# os.eventfd_write and socket.send release the GIL around their syscall. A thread submitting a
# burst wakes the TransferManager's I/O thread (eventfd) and rings workers (bells): each release
# let the freshly woken I/O thread take the GIL mid-burst, and each such hand-off cost both threads
# a futex round. These two hold it through a syscall of a few microseconds instead; the woken
# thread runs when the submitter next blocks, or at the interpreter's switch interval.
cdef extern from "<sys/eventfd.h>":
    int c_eventfd_write "eventfd_write" (int fd, uint64_t value) nogil

cdef extern from "<sys/socket.h>":
    ssize_t c_send "send" (int fd, const void *buf, size_t n, int flags) nogil
    int MSG_DONTWAIT


def eventfd_kick(int fd) -> None:
    """Adds 1 to an eventfd, holding the GIL; OSError as os.eventfd_write raises it."""
    cdef int err
    while c_eventfd_write(fd, 1) != 0:
        err = errno     # read before any Python call can change it
        if err != EINTR:
            raise OSError(err, os.strerror(err))


def send_empty(int fd) -> int:
    """Sends one empty datagram on a connected socket, holding the GIL: 0, or the errno."""
    cdef int err
    while c_send(fd, NULL, 0, MSG_DONTWAIT) < 0:
        err = errno
        if err != EINTR:
            return err
    return 0
