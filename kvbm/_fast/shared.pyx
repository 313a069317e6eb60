# cython: language_level=3
"""The shared G2 registry's segment in C: its tables, the process-shared robust mutex, and
SharedBlockRegistry, the per-engine handle whose calls take the lock, run the namespace's
BlockRegistry and keep the engine's pins. What is per-block lives here; joining, leaving, reaping
and repairing are kvbm.shared_g2's (Python, rare paths).

Parts (the structs are in shared.pxd):
  layout               offsets and sizes of a segment for N blocks, E engines, M namespaces
  SharedTables         the header, lock line and tables of one mapped segment: `create` fills a
                       new one (mutex initialised PTHREAD_PROCESS_SHARED | PTHREAD_MUTEX_ROBUST),
                       otherwise the header is checked; numpy structured views over the tables
                       for the Python side; acquire/release of the lock
  SharedBlockRegistry  BlockRegistry's API for one engine over its namespace's table: each call
                       locks, checks the engine's lease, marks what it mutates, delegates, updates
                       the engine's pins from the call's inputs and outputs, and unlocks
  set_test_kill        a test hook: SIGKILL this process at a chosen point of the n-th call of an op
                       (`tear`: the damage of the "torn" point, without the kill)
  lock_costs           lock/unlock pairs of the robust mutex and of the alternatives, timed

The lock. A call locks with trylock first; when that fails the GIL is released while it waits
(another thread of this process may hold the mutex and need the GIL to finish), first retrying
trylock for up to `lock_spin_ns` (set from the core count by kvbm.shared_g2), then blocking. The
spin is for fairness as much as speed: a blocked waiter is woken by the unlock but runs tens of
microseconds later, by when an engine calling in a loop has taken the lock again, so with two
engines a match of 8,192 took 440 us at the median on the 16-core H200 machine against 95 us for
the same match in-process (bench/bench_shared_registry.py). When the holder
died, pthread_mutex_lock answers EOWNERDEAD: the new owner marks the mutex consistent at once and
runs `on_recover` (kvbm.shared_g2 repairs the namespace and reaps the dead). The dirty mark, not
EOWNERDEAD, says what needs repair: a mutating call sets `holder_ns` before its first write and
clears it after its last, so a mark found set at lock time means a holder died (or its repair
failed) mid-mutation, and the repair is retried by every locker until one succeeds.

Pins. pins[e][b] counts the holds engine e has on block b: allocate and match(acquire) add one per
block handed out, register moves a deduplicated slot's hold from the caller's block to the
canonical one, release takes one per occurrence and is refused (RegistryError, nothing changed)
for a block the caller does not hold that often. At every unlock, refcount[b] == sum over the
namespace's engines of pins[e][b]: that is what lets a repair recompute the refcounts without the
dead engine, and what check_invariants (kvbm.shared_g2) verifies.
"""
cimport cython
from libc.signal cimport SIGKILL
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memset, strerror
from posix.signal cimport kill
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport _SC_PAGESIZE, getpid, pause, sysconf

from kvbm._fast._convert cimport as_count, as_i64
from kvbm._fast._table cimport ST_REGISTERED

import numpy as np

from kvbm.errors import LifecycleError, RegistryError
from kvbm.policy import EvictionPolicy, has_ghost_table

cdef extern from "<errno.h>":
    enum:
        EBUSY
        EOWNERDEAD
        ENOTRECOVERABLE

cdef extern from *:
    """
    static inline void shared_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }
    """
    void shared_relax() noexcept nogil

cdef extern from "<sys/file.h>" nogil:
    int flock(int fd, int op)
    enum:
        LOCK_EX
        LOCK_UN

cdef uint64_t G2_MAGIC = 0x6B76626D47325331ULL    # "kvbmG2S1"
cdef uint64_t G2_VERSION = 6    # 2: EngineEntry.workers, ENG_RETIRED, NsEntry.drainer; 3: registry layout 4;
                                # 4: registry layout 5; 5: registry layout 6; 6: registry layout 7
cdef int64_t PAGE = sysconf(_SC_PAGESIZE)

NS_STATES = {NS_FREE: "free", NS_INIT: "init", NS_LIVE: "live"}
FREE, INIT, LIVE = NS_FREE, NS_INIT, NS_LIVE
ENGINE_FREE, ENGINE_LIVE, ENGINE_RETIRED = ENG_FREE, ENG_LIVE, ENG_RETIRED
CLEAN, TABLES, OTHER = MARK_CLEAN, MARK_TABLES, HOLDER_OTHER

if sizeof(LockLine) > 128 or sizeof(EngineEntry) != 192 or sizeof(NsEntry) != 160:
    raise ImportError(f"shared.pxd structs: LockLine {sizeof(LockLine)} (<= 128), EngineEntry "
                      f"{sizeof(EngineEntry)} (192), NsEntry {sizeof(NsEntry)} (160) bytes")


cdef inline int64_t _round_up(int64_t x, int64_t a) noexcept nogil:
    return (x + a - 1) // a * a


def layout(total_blocks, max_engines, max_namespaces, policy, ghost_per_mille) -> dict:
    """Offsets and sizes of a segment (see shared.pxd). ghost_per_mille: LINEAGE's ghost entries
    per namespace, in thousandths of its quota; the registry slot of each namespace fits the
    largest quota (all of G2)."""
    cdef int64_t n = as_count(total_blocks, "total_blocks", RegistryError)
    cdef int64_t e = as_count(max_engines, "max_engines", RegistryError)
    cdef int64_t m = as_count(max_namespaces, "max_namespaces", RegistryError)
    as_count(ghost_per_mille, "ghost_per_mille", RegistryError)
    if n < 1 or e < 1 or m < 1:
        raise RegistryError(f"shared G2 needs >= 1 block, engine and namespace; got {n}, {e}, {m}")
    g = ghost_blocks_for(n, policy, ghost_per_mille)
    from kvbm._fast.registry import BlockRegistry
    out = {}
    out["lock_off"] = _round_up(sizeof(G2Header), 64)
    out["ns_off"] = _round_up(out["lock_off"] + sizeof(LockLine), 64)
    out["engine_off"] = _round_up(out["ns_off"] + m * sizeof(NsEntry), 64)
    out["reserved_bytes"] = _round_up(out["engine_off"] + e * sizeof(EngineEntry), PAGE)
    out["pins_off"] = out["reserved_bytes"]
    out["pins_stride"] = _round_up(n * sizeof(uint32_t), PAGE)
    out["regs_off"] = out["pins_off"] + e * out["pins_stride"]
    out["reg_stride"] = _round_up(BlockRegistry.bytes_needed(n, g), PAGE)
    out["segment_bytes"] = out["regs_off"] + m * out["reg_stride"]
    return out


def ghost_blocks_for(quota, policy, ghost_per_mille) -> int:
    """Ghost entries of a namespace's registry: 0 unless LINEAGE or ADAPTIVE, else quota *
    ghost_per_mille / 1000 (kvbm.config's ghost_ratio, in thousandths)."""
    if not has_ghost_table(policy):
        return 0
    return int(quota) * int(ghost_per_mille) // 1000


# numpy views of the structs: field offsets taken from the C structs themselves
cdef G2Header _h0
cdef NsEntry _n0
cdef EngineEntry _e0

cdef inline Py_ssize_t _off(const void *field, const void *base) noexcept:
    return <Py_ssize_t>(<const char *>field - <const char *>base)

HEADER_DTYPE = np.dtype({
    "names": ["magic", "version", "segment_bytes", "reserved_bytes", "total_blocks", "max_engines",
              "max_namespaces", "policy", "ghost_per_mille", "lock_off", "ns_off", "engine_off",
              "pins_off", "pins_stride", "regs_off", "reg_stride", "generation", "repairs",
              "reaped", "created_ns"],
    "formats": ["u8", "u8"] + ["i8"] * 14 + ["u8"] * 4,
    "offsets": [_off(&_h0.magic, &_h0), _off(&_h0.version, &_h0), _off(&_h0.segment_bytes, &_h0),
                _off(&_h0.reserved_bytes, &_h0), _off(&_h0.total_blocks, &_h0),
                _off(&_h0.max_engines, &_h0), _off(&_h0.max_namespaces, &_h0),
                _off(&_h0.policy, &_h0), _off(&_h0.ghost_per_mille, &_h0), _off(&_h0.lock_off, &_h0),
                _off(&_h0.ns_off, &_h0), _off(&_h0.engine_off, &_h0), _off(&_h0.pins_off, &_h0),
                _off(&_h0.pins_stride, &_h0), _off(&_h0.regs_off, &_h0),
                _off(&_h0.reg_stride, &_h0), _off(&_h0.generation, &_h0),
                _off(&_h0.repairs, &_h0), _off(&_h0.reaped, &_h0), _off(&_h0.created_ns, &_h0)],
    "itemsize": sizeof(G2Header)})

NS_DTYPE = np.dtype({
    "names": ["key0", "key1", "state", "engines", "block_offset", "num_blocks", "ghost_blocks",
              "generation", "created_ns", "retired_hits", "retired_queries", "label", "drainer"],
    "formats": ["u8", "u8", "u4", "u4", "i8", "i8", "i8", "u8", "u8", "u8", "u8", "S64", "i8"],
    "offsets": [_off(&_n0.key0, &_n0), _off(&_n0.key1, &_n0), _off(&_n0.state, &_n0),
                _off(&_n0.engines, &_n0), _off(&_n0.block_offset, &_n0),
                _off(&_n0.num_blocks, &_n0), _off(&_n0.ghost_blocks, &_n0),
                _off(&_n0.generation, &_n0), _off(&_n0.created_ns, &_n0),
                _off(&_n0.retired_hits, &_n0), _off(&_n0.retired_queries, &_n0),
                _off(&_n0.label, &_n0), _off(&_n0.drainer, &_n0)],
    "itemsize": sizeof(NsEntry)})

ENGINE_DTYPE = np.dtype({
    "names": ["state", "ns", "pid", "start_time", "generation", "joined_ns", "match_calls",
              "match_queries", "match_hits", "allocated", "registered", "deduplicated",
              "released", "pinned", "engine_id", "workers"],
    "formats": ["u4", "i4", "i8", "u8", "u8", "u8", "u8", "u8", "u8", "u8", "u8", "u8", "u8",
                "i8", "S64", "u8"],
    "offsets": [_off(&_e0.state, &_e0), _off(&_e0.ns, &_e0), _off(&_e0.pid, &_e0),
                _off(&_e0.start_time, &_e0), _off(&_e0.generation, &_e0),
                _off(&_e0.joined_ns, &_e0), _off(&_e0.match_calls, &_e0),
                _off(&_e0.match_queries, &_e0), _off(&_e0.match_hits, &_e0),
                _off(&_e0.allocated, &_e0), _off(&_e0.registered, &_e0),
                _off(&_e0.deduplicated, &_e0), _off(&_e0.released, &_e0),
                _off(&_e0.pinned, &_e0), _off(&_e0.engine_id, &_e0), _off(&_e0.workers, &_e0)],
    "itemsize": sizeof(EngineEntry)})


cdef int _init_mutex(pthread_mutex_t *m) except -1:
    cdef pthread_mutexattr_t attr
    cdef int rc = pthread_mutexattr_init(&attr)
    if rc == 0:
        rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)
    if rc == 0:
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST)
    if rc == 0:
        rc = pthread_mutex_init(m, &attr)
    pthread_mutexattr_destroy(&attr)
    if rc != 0:
        raise RegistryError(f"cannot make the process-shared robust mutex: error {rc} "
                            f"({strerror(rc).decode()})")
    return 0


cdef class SharedTables:
    """The header, lock line and tables of a mapped shared G2 segment (`buffer`: the whole
    mapping). create=True initialises a new one from the sizes given (the caller made the
    buffer `layout(...)["segment_bytes"]` long, zero-filled); otherwise the header must be a
    valid one and the sizes are read from it."""

    def __cinit__(self, buffer, bint create=False, total_blocks=0, max_engines=0,
                  max_namespaces=0, policy=0, ghost_per_mille=1000, created_ns=0):
        mem = memoryview(buffer).cast("B")
        if mem.readonly:
            raise RegistryError("shared G2 segment is mapped read-only")
        cdef unsigned char[::1] view = mem
        self._mem = mem
        self.base = &view[0]
        if <uintptr_t>self.base % 64:
            raise RegistryError("shared G2 segment is not 64-byte aligned")
        self.h = <G2Header *>self.base
        cdef int64_t nbytes = mem.nbytes
        if create:
            lay = layout(total_blocks, max_engines, max_namespaces, policy, ghost_per_mille)
            if nbytes < lay["segment_bytes"]:
                raise RegistryError(f"shared G2 segment has {nbytes} bytes, needs "
                                    f"{lay['segment_bytes']}")
            memset(<void *>self.base, 0, lay["reserved_bytes"])
            self.h.version = G2_VERSION
            self.h.total_blocks = total_blocks
            self.h.max_engines = max_engines
            self.h.max_namespaces = max_namespaces
            self.h.policy = policy
            self.h.ghost_per_mille = ghost_per_mille
            self.h.created_ns = created_ns
            self.h.segment_bytes = lay["segment_bytes"]
            self.h.reserved_bytes = lay["reserved_bytes"]
            self.h.lock_off = lay["lock_off"]
            self.h.ns_off = lay["ns_off"]
            self.h.engine_off = lay["engine_off"]
            self.h.pins_off = lay["pins_off"]
            self.h.pins_stride = lay["pins_stride"]
            self.h.regs_off = lay["regs_off"]
            self.h.reg_stride = lay["reg_stride"]
            self.lk = <LockLine *>(self.base + self.h.lock_off)
            _init_mutex(&self.lk.mutex)
            self.lk.holder = -1
            self.lk.holder_ns = MARK_CLEAN
            self.h.magic = G2_MAGIC       # last: an attach before this sees no segment yet
        else:
            if nbytes < <int64_t>sizeof(G2Header) or self.h.magic != G2_MAGIC \
                    or self.h.version != G2_VERSION:
                raise RegistryError(f"not a shared G2 segment of this version ({nbytes} bytes, "
                                    f"magic {self.h.magic if nbytes >= 8 else 0:#x}, version "
                                    f"{self.h.version if nbytes >= 16 else 0}; expected "
                                    f"{G2_MAGIC:#x}, {G2_VERSION})")
            lay = layout(self.h.total_blocks, self.h.max_engines, self.h.max_namespaces,
                         self.h.policy, self.h.ghost_per_mille)
            hdr = np.frombuffer(mem[:sizeof(G2Header)], dtype=HEADER_DTYPE)[0]
            got = {k: int(hdr[k]) for k in lay}
            del hdr
            if got != lay or nbytes < self.h.segment_bytes:
                raise RegistryError(f"shared G2 segment layout {got} ({nbytes} bytes mapped) "
                                    f"differs from this build's {lay}")
            self.lk = <LockLine *>(self.base + self.h.lock_off)
        self.nss = <NsEntry *>(self.base + self.h.ns_off)
        self.engs = <EngineEntry *>(self.base + self.h.engine_off)
        self.header = np.frombuffer(mem[:sizeof(G2Header)], dtype=HEADER_DTYPE)
        self.namespaces = np.frombuffer(
            mem[self.h.ns_off:self.h.ns_off + self.h.max_namespaces * sizeof(NsEntry)],
            dtype=NS_DTYPE)
        self.engines = np.frombuffer(
            mem[self.h.engine_off:self.h.engine_off + self.h.max_engines * sizeof(EngineEntry)],
            dtype=ENGINE_DTYPE)
        self.pins = np.frombuffer(
            mem[self.h.pins_off:self.h.pins_off + self.h.max_engines * self.h.pins_stride],
            dtype=np.uint32).reshape(self.h.max_engines, self.h.pins_stride // 4)

    def registry_buffer(self, int ns):
        """The memoryview of namespace slot `ns`'s registry slot (reg_stride bytes)."""
        if ns < 0 or ns >= self.h.max_namespaces:
            raise RegistryError(f"namespace slot {ns} out of range [0, {self.h.max_namespaces})")
        cdef int64_t off = self.h.regs_off + ns * self.h.reg_stride
        return self._mem[off:off + self.h.reg_stride]

    # ---- the lock -------------------------------------------------------------------------------

    cdef int _acquire(self) except -1:
        cdef int rc = pthread_mutex_trylock(&self.lk.mutex)
        cdef bint waited = rc == EBUSY
        cdef int64_t until
        cdef int spins = 0
        if waited:
            with nogil:
                if self.lock_spin_ns > 0:
                    until = _now_ns() + self.lock_spin_ns
                    while rc == EBUSY:
                        shared_relax()
                        rc = pthread_mutex_trylock(&self.lk.mutex)
                        spins += 1
                        if rc == EBUSY and (spins & 63) == 0 and _now_ns() >= until:
                            break
                if rc == EBUSY:
                    rc = pthread_mutex_lock(&self.lk.mutex)
        if rc == EOWNERDEAD:
            pthread_mutex_consistent(&self.lk.mutex)
        elif rc != 0:
            raise RegistryError(f"shared G2 lock failed: error {rc} ({strerror(rc).decode()})")
        self.lk.acquired += 1
        if waited:
            self.lk.contended += 1
        if rc == EOWNERDEAD or self.lk.holder_ns != MARK_CLEAN:
            try:
                if self.on_recover is None:
                    raise RegistryError(f"shared G2 segment needs a repair (owner died: "
                                        f"{rc == EOWNERDEAD}, mark {self.lk.holder_ns}) and this "
                                        f"handle has no recovery")
                self.on_recover(rc == EOWNERDEAD)
            except BaseException:
                pthread_mutex_unlock(&self.lk.mutex)   # the mark stays: the next locker retries
                raise
        return 0

    cdef void _unlock(self, bint clean) noexcept nogil:
        if clean:
            self.lk.holder = -1
            self.lk.holder_ns = MARK_CLEAN
        pthread_mutex_unlock(&self.lk.mutex)

    def acquire(self):
        """Takes the lock (recovering first when the last holder died or left its mark)."""
        self._acquire()

    def release(self, bint clean=True):
        """Drops the lock; clean=False leaves the dirty mark for the next locker to repair."""
        self._unlock(clean)

    def mark(self, int holder, int holder_ns):
        """Marks what the lock holder is about to mutate (a namespace slot, or TABLES)."""
        self.lk.holder = holder
        self.lk.holder_ns = holder_ns

    @property
    def holder(self) -> int:
        return self.lk.holder

    @property
    def holder_ns(self) -> int:
        return self.lk.holder_ns

    @property
    def lock_stats(self) -> dict:
        return {"acquired": self.lk.acquired, "contended": self.lk.contended}


def table_states(BlockRegistry reg):
    """A copy of the registry's block states (uint8 per block: kvbm._fast.registry's ST_*)."""
    out = np.empty(reg.h.num_blocks, dtype=np.uint8)
    cdef uint8_t[::1] o = out
    cdef int64_t b
    for b in range(reg.h.num_blocks):
        o[b] = reg.state[b]
    return out


def table_refcounts(BlockRegistry reg):
    """A copy of the registry's refcount array (uint32 per block)."""
    out = np.empty(reg.h.num_blocks, dtype=np.uint32)
    cdef uint32_t[::1] o = out
    cdef int64_t b
    for b in range(reg.h.num_blocks):
        o[b] = reg.refcount[b]
    return out


# ---- test hook: die at a chosen point of the n-th call of an op ---------------------------------

cdef enum:
    OP_ALLOCATE = 1
    OP_REGISTER = 2
    OP_MATCH = 3
    OP_RELEASE = 4
    PT_LOCKED = 1     # lock held and mutation marked, registry untouched
    PT_TORN = 2       # the registry's derived structures scribbled over (a cut mid-loop)
    PT_REGISTRY = 3   # the registry call done, the engine's pins not updated
    PT_PINS = 4       # half of the pins updated

_OPS = {"allocate": OP_ALLOCATE, "register": OP_REGISTER, "match": OP_MATCH, "release": OP_RELEASE}
_POINTS = {"locked": PT_LOCKED, "torn": PT_TORN, "registry": PT_REGISTRY, "pins": PT_PINS}
cdef int _kill_op = 0
cdef int _kill_point = 0
cdef int64_t _kill_countdown = 0


def set_test_kill(op, point, nth=1):
    """Tests only: the `nth` call of `op` (allocate, register, match, release) in this process
    sends itself SIGKILL at `point`: "locked" (marked, nothing changed), "torn" (the namespace's
    free list, heap, index, counts and marks scribbled over and, for register, its first block
    left REGISTERED with hash 0: a cut between two stores of the register loop), "registry"
    (registry changed, pins not), "pins" (half of the pins updated). op None disarms."""
    global _kill_op, _kill_point, _kill_countdown
    if op is None:
        _kill_op = 0
        return
    if op not in _OPS or point not in _POINTS or nth < 1:
        raise RegistryError(f"set_test_kill: op {op!r} in {list(_OPS)}, point {point!r} in "
                            f"{list(_POINTS)}, nth {nth} >= 1")
    _kill_op, _kill_point, _kill_countdown = _OPS[op], _POINTS[point], nth


cdef inline int _armed(int op) noexcept:
    # The point at which this call dies, 0 for none.
    global _kill_countdown
    if _kill_op != op:
        return 0
    _kill_countdown -= 1
    return _kill_point if _kill_countdown == 0 else 0


cdef void _die() noexcept nogil:
    kill(getpid(), SIGKILL)
    while True:
        pause()


cdef void _tear(BlockRegistry r, int64_t registered_block) noexcept nogil:
    # What a cut mid-loop can leave: links, heap slots, index slots and counts half-written.
    cdef int64_t n = r.h.num_blocks, i
    r.h.num_free += 3
    r.h.num_inactive += 2
    r.h.num_registered += 1
    r.free_next[n] = <int32_t>(n - 1)
    r.free_prev[0] = <int32_t>(n // 2)
    r.mark[n // 3] = 1
    if r.h.heap_size > 1:
        r.heap[0].block, r.heap[r.h.heap_size - 1].block = \
            r.heap[r.h.heap_size - 1].block, r.heap[0].block
    for i in range(0, r.h.index_capacity, 7):
        r.ivals[i] = -1
    if registered_block >= 0:
        r.state[registered_block] = ST_REGISTERED    # hash still 0: the torn register


def tear(BlockRegistry reg, registered_block=-1):
    """Tests only: what the "torn" kill point leaves, without the kill (see set_test_kill)."""
    cdef int64_t b = registered_block
    if b >= reg.h.num_blocks:
        raise RegistryError(f"tear: block {b} out of range [0, {reg.h.num_blocks})")
    _tear(reg, b)


# ---- the per-engine handle ----------------------------------------------------------------------

@cython.final
cdef class SharedBlockRegistry:
    """BlockRegistry's API for one engine over its namespace's table in the shared segment.

    Made by kvbm.shared_g2.SharedG2.join (the Lease's `registry`), not directly. Every call that
    reads or changes the table holds the segment's lock for its duration; the properties
    (num_free, num_inactive, ...) read the header without it: a snapshot that a concurrent call
    may change at once. A call after the engine left or was reaped raises LifecycleError.
    """

    def __cinit__(self, SharedTables tables, int slot, uint64_t generation,
                  BlockRegistry registry, g2):
        if slot < 0 or slot >= tables.h.max_engines:
            raise RegistryError(f"engine slot {slot} out of range [0, {tables.h.max_engines})")
        self.t = tables
        self.g2 = g2
        self.reg = registry
        self.lk = tables.lk
        self.me = &tables.engs[slot]
        self.slot = slot
        self.generation = generation
        self.namespace = self.me.ns
        cdef NsEntry *ns = &tables.nss[self.namespace]
        self.n = registry.h.num_blocks
        if ns.num_blocks != self.n:
            raise RegistryError(f"namespace {self.namespace} has {ns.num_blocks} blocks, its "
                                f"registry {self.n}")
        self.pins = <uint32_t *>(tables.base + tables.h.pins_off + slot * tables.h.pins_stride) \
            + ns.block_offset

    cdef int _enter(self, bint mutating) except -1:
        self.t._acquire()
        if self.me.state != ENG_LIVE or self.me.generation != self.generation:
            self.t._unlock(True)
            raise LifecycleError(f"engine slot {self.slot} left or was reaped (slot generation "
                                 f"{self.me.generation}, this lease's {self.generation}): join "
                                 f"again")
        self.lk.holder = self.slot      # who holds it: if it dies holding it, it is the one
        if mutating:
            self.lk.holder_ns = self.namespace
        return 0

    cdef void _exit(self) noexcept nogil:
        self.t._unlock(True)

    cdef int _check_ids(self, const int64_t[::1] bs, str op) except -1:
        cdef Py_ssize_t i
        for i in range(bs.shape[0]):
            if bs[i] < 0 or bs[i] >= self.n:
                raise RegistryError(f"{op}: block {bs[i]} (slot {i}) is out of range [0, {self.n})")
        return 0

    cdef int _check_held(self, const int64_t[::1] bs, str op) except -1:
        # Ids checked. Each block must be held by this engine at least once.
        cdef Py_ssize_t i
        for i in range(bs.shape[0]):
            if self.pins[bs[i]] == 0:
                raise RegistryError(f"{op}: block {bs[i]} (slot {i}) is not held by engine slot "
                                    f"{self.slot} (refcount {self.reg.refcount[bs[i]]}, held by "
                                    f"other engines)")
        return 0

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef void _pin(self, const int64_t[::1] bs) noexcept nogil:
        # bs: blocks the registry just handed to this engine (valid ids, from its own output).
        cdef Py_ssize_t i
        for i in range(bs.shape[0]):
            self.pins[bs[i]] += 1
        self.me.pinned += bs.shape[0]

    # ---- the registry API -----------------------------------------------------------------------

    def allocate(self, n):
        """BlockRegistry.allocate; the blocks are held by this engine."""
        cdef int point = _armed(OP_ALLOCATE)
        cdef const int64_t[::1] o
        self._enter(True)
        try:
            if point == PT_LOCKED:
                _die()
            out = self.reg.allocate(n)
            if out is None or out.shape[0] == 0:
                return out
            o = out
            if point == PT_REGISTRY:
                _die()
            if point == PT_PINS:
                self._pin(o[:o.shape[0] // 2])
                _die()
            self._pin(o)
            self.me.allocated += o.shape[0]
            return out
        finally:
            self._exit()

    def complete(self, blocks):
        """BlockRegistry.complete, of blocks this engine holds."""
        arr = as_i64(blocks, "complete: blocks", RegistryError)
        cdef const int64_t[::1] bs = arr
        self._enter(True)
        try:
            self._check_ids(bs, "complete")
            self._check_held(bs, "complete")
            self.reg.complete(arr)
        finally:
            self._exit()

    def register(self, blocks, hashes, parents=None, priorities=None, has_parent=None):
        """BlockRegistry.register, of blocks this engine holds; a deduplicated slot's hold moves
        to the canonical block."""
        arr = as_i64(blocks, "register: blocks", RegistryError)
        cdef const int64_t[::1] bs = arr
        cdef const int64_t[::1] cs
        cdef Py_ssize_t i, dup = 0
        cdef int point = _armed(OP_REGISTER)
        self._enter(True)
        try:
            self._check_ids(bs, "register")
            self._check_held(bs, "register")
            if point == PT_LOCKED:
                _die()
            if point == PT_TORN:
                _tear(self.reg, bs[0] if bs.shape[0] > 0 else -1)
                _die()
            out = self.reg.register(arr, hashes, parents, priorities, has_parent)
            cs = out
            if point == PT_REGISTRY:
                _die()
            for i in range(bs.shape[0]):
                if point == PT_PINS and i == bs.shape[0] // 2:
                    _die()
                if cs[i] != bs[i]:
                    self.pins[bs[i]] -= 1
                    self.pins[cs[i]] += 1
                    dup += 1
            self.me.registered += bs.shape[0] - dup
            self.me.deduplicated += dup
            return out
        finally:
            self._exit()

    def match(self, hashes, acquire=True):
        """BlockRegistry.match; with acquire the blocks are held by this engine."""
        cdef bint acq = bool(acquire)
        cdef int point = _armed(OP_MATCH) if acq else 0
        cdef const int64_t[::1] o
        cdef Py_ssize_t asked
        self._enter(acq)
        try:
            if point == PT_LOCKED:
                _die()
            if point == PT_TORN:
                _tear(self.reg, -1)
                _die()
            out = self.reg.match(hashes, acq)
            if not acq:
                return out
            o = out
            if point == PT_REGISTRY:
                _die()
            if point == PT_PINS:
                self._pin(o[:o.shape[0] // 2])
                _die()
            self._pin(o)
            asked = len(hashes)
            self.me.match_calls += 1
            self.me.match_queries += asked
            self.me.match_hits += o.shape[0]
            return out
        finally:
            self._exit()

    def lookup(self, hashes):
        """BlockRegistry.lookup (changes nothing)."""
        self._enter(False)
        try:
            return self.reg.lookup(hashes)
        finally:
            self._exit()

    def touch(self, blocks):
        """BlockRegistry.touch."""
        self._enter(True)
        try:
            self.reg.touch(blocks)
        finally:
            self._exit()

    def release(self, blocks):
        """BlockRegistry.release of holds this engine has: a block released more times than this
        engine holds it is refused (RegistryError, nothing changed)."""
        arr = as_i64(blocks, "release: blocks", RegistryError)
        cdef const int64_t[::1] bs = arr
        cdef Py_ssize_t i, j, bad = -1
        cdef int point = _armed(OP_RELEASE)
        self._enter(True)
        try:
            self._check_ids(bs, "release")
            for i in range(bs.shape[0]):
                if self.pins[bs[i]] == 0:
                    bad = i
                    break
                self.pins[bs[i]] -= 1
            if bad >= 0:
                for j in range(bad):
                    self.pins[bs[j]] += 1
                raise RegistryError(f"release: block {bs[bad]} (slot {bad}) is released more "
                                    f"times than engine slot {self.slot} holds it (refcount "
                                    f"{self.reg.refcount[bs[bad]]} over every engine)")
            if point == PT_LOCKED or point == PT_PINS:
                _die()
            if point == PT_TORN:
                _tear(self.reg, -1)
                _die()
            try:
                self.reg.release(arr)
            except BaseException:
                for j in range(bs.shape[0]):
                    self.pins[bs[j]] += 1
                raise
            if point == PT_REGISTRY:
                _die()
            self.me.pinned -= bs.shape[0]
            self.me.released += bs.shape[0]
        finally:
            self._exit()

    def evict(self, n):
        """BlockRegistry.evict (inactive blocks: nobody holds them)."""
        self._enter(True)
        try:
            return self.reg.evict(n)
        finally:
            self._exit()

    def take_victims(self, n):
        """BlockRegistry.take_victims; the victims are held by this engine (as allocate's blocks)."""
        cdef const int64_t[::1] o
        self._enter(True)
        try:
            blocks, hashes = self.reg.take_victims(n)
            if blocks.shape[0]:
                o = blocks
                self._pin(o)
                self.me.allocated += o.shape[0]
            return blocks, hashes
        finally:
            self._exit()

    def drain_evicted(self):
        """BlockRegistry.drain_evicted of the namespace's ring. The ring is the namespace's, not
        this engine's: an eviction by any engine's allocation lands in it, and a drain takes them
        all. So one engine per namespace drains it: the first to call (its `drainer`, until it
        leaves or is reaped); another engine's call is a RegistryError. Its user is the disk tier's
        cleaner of an engine alone in its namespace (it counts the victims an allocation took
        before it; victims are taken with take_victims, paired in one call)."""
        self._enter(True)
        cdef NsEntry *ns = &self.t.nss[self.namespace]
        try:
            if ns.drainer == 0:
                ns.drainer = self.slot + 1
            elif ns.drainer != self.slot + 1:
                raise RegistryError(f"drain_evicted: namespace {self.namespace}'s evicted blocks are "
                                    f"drained by engine slot {ns.drainer - 1}, not {self.slot}: one "
                                    f"drainer per namespace")
            return self.reg.drain_evicted()
        finally:
            self._exit()

    def set_priority(self, blocks, priorities):
        """BlockRegistry.set_priority (any allocated block of the namespace: hints set the
        priority of cached blocks nobody holds)."""
        self._enter(True)
        try:
            self.reg.set_priority(blocks, priorities)
        finally:
            self._exit()

    def info(self, block) -> dict:
        """BlockRegistry.info plus `held`: this engine's holds on the block."""
        cdef int64_t b
        self._enter(False)
        try:
            d = self.reg.info(block)
            b = block
            d["held"] = self.pins[b]
            return d
        finally:
            self._exit()

    def held(self):
        """This engine's holds per block of the namespace (a uint32 copy)."""
        out = np.empty(self.n, dtype=np.uint32)
        cdef uint32_t[::1] o = out
        cdef int64_t b
        self._enter(False)
        try:
            for b in range(self.n):
                o[b] = self.pins[b]
            return out
        finally:
            self._exit()

    def check_invariants(self):
        """The registry's invariants and the shared ones (kvbm.shared_g2.SharedG2.check_invariants)."""
        self.g2.check_invariants()

    # ---- header snapshots (no lock) -------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.n

    @property
    def num_free(self) -> int:
        return self.reg.h.num_free

    @property
    def num_inactive(self) -> int:
        return self.reg.h.num_inactive

    @property
    def num_active(self) -> int:
        return self.reg.h.num_blocks - self.reg.h.num_free - self.reg.h.num_inactive

    @property
    def num_registered(self) -> int:
        return self.reg.h.num_registered

    @property
    def tick(self) -> int:
        return self.reg.h.tick

    @property
    def policy(self) -> int:
        return self.reg.h.policy

    @property
    def ghost_blocks(self) -> int:
        return self.reg.h.ghost_blocks

    @property
    def num_ghosts(self) -> int:
        return self.reg.h.ghost_size

    @property
    def num_evicted_dropped(self) -> int:
        return self.reg.h.ring_dropped

    @property
    def namespace_engines(self) -> int:
        """Engines of this namespace (live and retired) now."""
        return self.t.nss[self.namespace].engines

    @property
    def pinned(self) -> int:
        """Holds this engine has now (all blocks)."""
        return self.me.pinned


# ---- the lock and its alternatives, timed -------------------------------------------------------

cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000000000 + ts.tv_nsec


def lock_costs(int64_t iters, int fd=-1) -> dict:
    """Nanoseconds per uncontended lock+unlock pair, each timed over `iters` pairs in a loop
    without the GIL: the robust process-shared mutex (the one used), a process-shared mutex
    without robustness, and (fd >= 0) flock(LOCK_EX)/flock(LOCK_UN) on that file."""
    buf = np.zeros(4 * 64, dtype=np.uint8)
    cdef unsigned char[::1] v = buf
    cdef uintptr_t a = (<uintptr_t>&v[0] + 63) & ~(<uintptr_t>63)
    cdef pthread_mutex_t *robust = <pthread_mutex_t *>a
    cdef pthread_mutex_t *plain = <pthread_mutex_t *>(a + 64)
    cdef pthread_mutexattr_t attr
    cdef int64_t i, t0, t_robust, t_plain, t_flock = -1
    _init_mutex(robust)
    pthread_mutexattr_init(&attr)
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)
    pthread_mutex_init(plain, &attr)
    pthread_mutexattr_destroy(&attr)
    with nogil:
        t0 = _now_ns()
        for i in range(iters):
            pthread_mutex_lock(robust)
            pthread_mutex_unlock(robust)
        t_robust = _now_ns() - t0
        t0 = _now_ns()
        for i in range(iters):
            pthread_mutex_lock(plain)
            pthread_mutex_unlock(plain)
        t_plain = _now_ns() - t0
        if fd >= 0:
            t0 = _now_ns()
            for i in range(iters):
                flock(fd, LOCK_EX)
                flock(fd, LOCK_UN)
            t_flock = _now_ns() - t0
    pthread_mutex_destroy(robust)
    pthread_mutex_destroy(plain)
    out = {"robust_mutex": t_robust / iters, "plain_mutex": t_plain / iters}
    if fd >= 0:
        out["flock"] = t_flock / iters
    return out
