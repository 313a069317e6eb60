# cython: language_level=3
"""Block registry of one pool: a struct-of-arrays block table with refcounts, a FIFO free list,
an indexed min-heap of inactive blocks (the eviction order), an open-addressing uint64 -> block
index, lineage links, a ring of evicted hashes, and (LINEAGE, ADAPTIVE) a ghost table of the use
counts of recently evicted hashes. No Python object per block.

Files: registry.pxd is the contract (every array, field by field, and every routine); the class
here keeps the policy, the block life cycle, the batch loops and the public API, with thin methods
over inline helpers on plain pointers: _table.pxd (header and entry structs, ids, layout),
_index.pxd (index and ghost table), _heap.pxd (the heap). _convert turns the inputs into arrays
(shared with native.pyx); _invariants.pxi holds check_invariants, _repair.pxi rebuild. This file stays above 600 lines:
what is left is one class body, which Cython cannot spread over files (no `include` in a class).
Moved to another module, the nogil loops and the life cycle would call each other per block
through the vtable; moved to an included file as free functions, they would leave the .pxd.

Parts:
  buffer   one writable buffer (handed in, or allocated here) of `bytes_needed(N)` bytes: a header
           (counts, tick, ring cursor) then every array, so the table can live in shared memory:
           `BlockRegistry.attach(buffer)` uses a table made in another process (kvbm.shared_g2
           locks around the calls), and `rebuild(refcounts)` repairs one whose mutation was cut
           short by the death of its process (_repair.pxi).
  free     RESET blocks, FIFO: freed blocks go to the tail, allocate takes from the head.
  heap     inactive blocks (REGISTERED, refcount 0), smallest (key1, key2, block id) first; the
           key is computed by `_policy_key` (switch on the policy id: LRU, or LINEAGE and
           ADAPTIVE, see kvbm/policy.py) and refreshed by `_update_key`. Acquiring an inactive
           block (match, dedup) is O(1): its entry stays in the heap as a "zombie" with a frozen key, dropped
           when it reaches the top during eviction, or re-keyed in place when the block is
           released again. So a long prefix match never pays a heap removal per block.
  index    sequence hash -> block for every REGISTERED block (and -> ghost slot for each ghost
           entry).
  lineage  parent block (if registered here at registration) and child list/count per block.
  ring     hashes evicted since the last drain_evicted().
  ghost    LINEAGE and ADAPTIVE: the use counts of the last G = ghost_blocks evicted hashes, FIFO
           by eviction (forgetting the oldest when G are live). Registering a *new* block (not a
           dedup hit) under a remembered hash restores its use count (replacing touches made while
           PARTIAL/COMPLETE) before the registration touch, and consumes the entry: a document
           read again after more than a cache lifetime keeps its frequency credit. An allocation
           evicts all it needs before its blocks register, as the twin (_reference.py) does.
  tuner    ADAPTIVE's shadow tuner (_shadow.pxd): ten mini caches, one per candidate credit, fed a
           1-in-R hash sample of the releases of REGISTERED blocks; at each of its epochs the
           credit moves to the candidate that has hit most lately. Carved for every policy.

Life of a block: allocate -> PARTIAL (refcount 1) -> complete -> COMPLETE -> register ->
REGISTERED (deduplicated by hash; matchable) -> release to refcount 0 -> inactive (still matchable)
-> evicted (by allocate or evict) -> RESET in the free list, or straight to the caller of allocate.
A block that is not REGISTERED goes back to the free list when its refcount drops to 0.

Clock: `tick` advances by one for each touch, each block acquired by match(acquire=True), each
slot of register (new or deduplicated), and each REGISTERED block whose refcount drops to 0 (its
last use: among equal priorities, blocks released first are evicted first). evict(n) and allocate
evict in policy order: smallest (key1, key2, block id) first.

Lineage: on eviction a block leaves its parent's child list (the parent's count drops and its key
is refreshed: when it changes, the parent's new entry replaces the victim at the heap's root) and
its children become orphans (parent -1, keys refreshed). All O(1) per link.

Size: bytes_needed(N, G) is 97 bytes per block, 24 per ghost entry and 12 per index slot (a power
of two >= 2(N + G)), e.g. 122 MB for 10**6 blocks without a ghost table (LRU), 171 MB with G = N
(LINEAGE's default; bytes_needed(N) assumes it, so it fits every policy), plus the tuner's ten mini
caches: 52 bytes per slot and 12 per index slot, ten times M = N // R (< 2 SHADOW_MINI) slots and
ten times 4M to 8M index slots, at most ~0.26 MB with SHADOW_MINI = 128.

Every public call validates the whole batch first and raises RegistryError with the numbers before
changing anything, so a failed call leaves the buffer byte for byte as it was. The batch loop then
runs in a `noexcept nogil` routine over raw pointers into the table. Raw pointer indexing is never
bounds checked, so each core routine says which validation made its indices safe. The loops are
called with the GIL held: a whole call is then atomic for other Python threads (a call is
microseconds), and nothing here needs a lock. With KVBM_DEBUG, check_invariants() runs after every
mutating call.
"""
cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memset

from kvbm._fast._adapt cimport LEVEL_MAX, credit_of
from kvbm._fast._convert cimport as_count, as_i32, as_i64, as_mask, as_u64
from kvbm._fast._heap cimport (
    heap_append, heap_less, heap_rises, heap_sift_down, heap_sift_up, heap_take,
)
from kvbm._fast._index cimport (
    ghost_init, ghost_record, ghost_unlink, index_find, index_home, index_init, index_pos,
    index_remove, probe_pos,
)
from kvbm._fast._shadow cimport (
    SCORE_MAX, SHADOW_NO_MOVE, ShadowView, mini_key, shadow_candidate, shadow_clear, shadow_epoch, shadow_init,
    shadow_level, shadow_sampled, shadow_use,
)
from kvbm._fast._table cimport (
    SHADOW_K, SHADOW_MINI, SWEEP_BURST, index_capacity, shadow_capacity, shadow_rate, table_layout,
)

import numpy as np

from kvbm.errors import RegistryError
from kvbm.policy import ADAPTIVE_DECAY, ADAPTIVE_LEVEL, ADAPTIVE_MINI_BLOCKS, BlockState, EvictionPolicy

cdef extern from *:
    """
    #ifdef KVBM_DEBUG
    #define KVBM_REGISTRY_DEBUG 1
    #else
    #define KVBM_REGISTRY_DEBUG 0
    #endif
    #define kvbm_prefetch(p) __builtin_prefetch((const void *)(p))
    """
    bint KVBM_REGISTRY_DEBUG
    void kvbm_prefetch(const void *p) noexcept nogil
    int __builtin_clzll(unsigned long long x) noexcept nogil   # x != 0

POLICY_LRU = int(EvictionPolicy.LRU)
POLICY_LINEAGE = int(EvictionPolicy.LINEAGE)
POLICY_ADAPTIVE = int(EvictionPolicy.ADAPTIVE)
DEBUG = bool(KVBM_REGISTRY_DEBUG)
# The policy ids come from kvbm.policy.EvictionPolicy; `_policy_key` has a case for each id of the
# .pxd's enum, so a member without one (or the reverse) stops the import here.
_POLICY_IDS = tuple(int(p) for p in EvictionPolicy)
if _POLICY_IDS != (POLICY_LRU_ID, POLICY_LINEAGE_ID, POLICY_ADAPTIVE_ID):
    raise ImportError(f"kvbm.policy.EvictionPolicy ids {_POLICY_IDS} differ from registry.pxd's "
                      f"({POLICY_LRU_ID}, {POLICY_LINEAGE_ID}, {POLICY_ADAPTIVE_ID})")

if ADAPTIVE_MINI_BLOCKS != SHADOW_MINI:
    raise ImportError(f"kvbm.policy.ADAPTIVE_MINI_BLOCKS {ADAPTIVE_MINI_BLOCKS} differs from _table.pxd's "
                      f"SHADOW_MINI {SHADOW_MINI}")

cdef uint64_t REGISTRY_MAGIC = 0x6B76626D52454731ULL   # "kvbmREG1"
cdef uint64_t LAYOUT_VERSION = 7   # 2: header gained lineage_c; 3: ghost table; 4: ADAPTIVE's state;
                                   # 5: adapt_growth, adapt_level_max; 6: adapt_band; 7: the shadow
                                   # tuner's state and arrays replace the vote's
cdef int64_t MAX_BLOCKS = 2147483646                    # ids and the sentinel fit in int32
cdef int64_t PREFETCH_AHEAD = 8


cdef int64_t _ghost_count_arg(g, int64_t n) except -1:
    # ghost_blocks argument: None -> n (as many evicted hashes as cached blocks)
    if g is None:
        return n
    cdef int64_t v = as_count(g, "ghost_blocks", RegistryError)
    if v > MAX_BLOCKS:
        raise RegistryError(f"ghost_blocks must be in [0, {MAX_BLOCKS}], got {v}")
    return v


cdef str _state_name(uint8_t s):
    try:
        return BlockState(s).name
    except ValueError:
        return f"<bad state {s}>"


cdef class BlockRegistry:
    """Block table of one pool. See the module docstring for the parts and the life of a block.

    BlockRegistry(num_blocks, buffer=None, policy=POLICY_LRU, ghost_blocks=None): `buffer` is any
    writable, C-contiguous buffer of at least `bytes_needed(num_blocks, ghost_blocks)` bytes
    (bytearray, numpy uint8 array, mmap, shared_memory.SharedMemory.buf); it is (re)initialised, and
    kept alive (and unresizable) by the registry. Without one the registry allocates a numpy array.
    policy: POLICY_LRU, POLICY_LINEAGE or POLICY_ADAPTIVE (kvbm.policy.EvictionPolicy).
    ghost_blocks: entries of LINEAGE's (and ADAPTIVE's) ghost table (the use counts of recently
    evicted hashes, restored when a hash registers again); None means num_blocks ("remember as
    many evicted blocks as are cached"), 0 disables it. Other policies have no ghost table (their G is 0 whatever is
    passed), so `bytes_needed(num_blocks)` (G = num_blocks) fits every policy.
    """

    def __cinit__(self, num_blocks, buffer=None, policy=POLICY_LRU, ghost_blocks=None,
                  bint attach=False):
        # __cinit__, not __init__: no instance can exist without its table (no NULL pointers).
        # attach=True (BlockRegistry.attach): the buffer already holds this table; its header
        # must agree with the arguments, and nothing is reinitialised.
        cdef int64_t n = as_count(num_blocks, "num_blocks", RegistryError)
        if n < 1 or n > MAX_BLOCKS:
            raise RegistryError(f"num_blocks must be in [1, {MAX_BLOCKS}], got {n}")
        try:
            pol = policy.__index__()
        except AttributeError as err:
            raise RegistryError(f"policy must be an int, got {type(policy).__name__}") from err
        if pol not in _POLICY_IDS:
            raise RegistryError(f"unknown eviction policy {pol}; known: {list(_POLICY_IDS)}")
        cdef int64_t g = _ghost_count_arg(ghost_blocks, n)
        if pol != POLICY_LINEAGE_ID and pol != POLICY_ADAPTIVE_ID:
            g = 0
        cdef int64_t needed = BlockRegistry.bytes_needed(n, g)
        if buffer is None:
            buffer = np.zeros(needed, dtype=np.uint8)
        try:
            mem = memoryview(buffer)
        except TypeError as err:
            raise RegistryError(f"buffer does not support the buffer protocol: {type(buffer).__name__}") from err
        if mem.readonly:
            raise RegistryError("buffer is read-only")
        if not mem.c_contiguous:
            raise RegistryError("buffer must be C-contiguous")
        if mem.nbytes < needed:
            raise RegistryError(f"buffer has {mem.nbytes} bytes, {n} blocks need {needed}")
        mem = mem.cast("B")
        cdef unsigned char[::1] view = mem
        self._mem = mem
        cdef uintptr_t base = <uintptr_t>&view[0]
        base = (base + <uintptr_t>(TABLE_ALIGN - 1)) & ~(<uintptr_t>(TABLE_ALIGN - 1))
        self._carve(<unsigned char *>base, n, g)
        if not attach:
            self._init_table(n, g, pol)
            return
        cdef RegistryHeader *h = self.h
        if h.magic != REGISTRY_MAGIC or h.version != LAYOUT_VERSION:
            raise RegistryError(f"attach: buffer holds no registry table (magic {h.magic:#x}, "
                                f"version {h.version}; expected {REGISTRY_MAGIC:#x}, {LAYOUT_VERSION})")
        if h.num_blocks != n or h.policy != pol or h.ghost_blocks != g \
                or h.index_capacity != index_capacity(n + g):
            raise RegistryError(f"attach: the table holds {h.num_blocks} blocks, policy {h.policy}, "
                                f"{h.ghost_blocks} ghost entries, index {h.index_capacity}; expected "
                                f"{n}, {pol}, {g}, {index_capacity(n + g)}")

    @staticmethod
    def attach(buffer):
        """The registry whose table `buffer` already holds (made by BlockRegistry(n, buffer) in
        this or another process, e.g. in a shared-memory segment at the same 64-byte alignment):
        its size, policy and ghost table come from the table's header; nothing is reinitialised.
        Calls on it change the same table, so processes sharing one need a lock around them
        (kvbm.shared_g2)."""
        try:
            mem = memoryview(buffer).cast("B")
        except TypeError as err:
            raise RegistryError(f"attach: buffer does not support the buffer protocol: "
                                f"{type(buffer).__name__}") from err
        if mem.nbytes < sizeof(RegistryHeader) + TABLE_ALIGN:
            raise RegistryError(f"attach: buffer has {mem.nbytes} bytes, too few for a table")
        cdef const unsigned char[::1] view = mem
        cdef uintptr_t base = <uintptr_t>&view[0]
        base = (base + <uintptr_t>(TABLE_ALIGN - 1)) & ~(<uintptr_t>(TABLE_ALIGN - 1))
        cdef const RegistryHeader *h = <const RegistryHeader *>base
        if h.magic != REGISTRY_MAGIC or h.version != LAYOUT_VERSION:
            raise RegistryError(f"attach: buffer holds no registry table (magic {h.magic:#x}, "
                                f"version {h.version}; expected {REGISTRY_MAGIC:#x}, {LAYOUT_VERSION})")
        return BlockRegistry(h.num_blocks, buffer, h.policy, h.ghost_blocks, attach=True)

    @staticmethod
    def bytes_needed(num_blocks, ghost_blocks=None) -> int:
        """Bytes a buffer must have for `num_blocks` blocks and a ghost table of `ghost_blocks`
        entries (None: num_blocks, the LINEAGE default), alignment slack included."""
        cdef int64_t offsets[NUM_ARRAYS]
        cdef int64_t n = as_count(num_blocks, "num_blocks", RegistryError)
        if n < 1 or n > MAX_BLOCKS:
            raise RegistryError(f"num_blocks must be in [1, {MAX_BLOCKS}], got {n}")
        cdef int64_t g = _ghost_count_arg(ghost_blocks, n)
        return table_layout(n, g, offsets) + TABLE_ALIGN

    cdef _carve(self, unsigned char *base, int64_t n, int64_t g):
        cdef int64_t o[NUM_ARRAYS]
        table_layout(n, g, o)
        self.h = <RegistryHeader *>(base + o[0])
        self.state = <uint8_t *>(base + o[1])
        self.refcount = <uint32_t *>(base + o[2])
        self.hash = <uint64_t *>(base + o[3])
        self.priority = <int32_t *>(base + o[4])
        self.last_tick = <uint64_t *>(base + o[5])
        self.use_count = <uint32_t *>(base + o[6])
        self.parent = <bid_t *>(base + o[7])
        self.children = <uint32_t *>(base + o[8])
        self.first_child = <bid_t *>(base + o[9])
        self.next_sib = <bid_t *>(base + o[10])
        self.prev_sib = <bid_t *>(base + o[11])
        self.free_prev = <bid_t *>(base + o[12])
        self.free_next = <bid_t *>(base + o[13])
        self.heap = <HeapEntry *>(base + o[14])
        self.heap_pos = <bid_t *>(base + o[15])
        self.mark = <uint32_t *>(base + o[16])
        self.ikeys = <uint64_t *>(base + o[17])
        self.ivals = <bid_t *>(base + o[18])
        self.ring = <uint64_t *>(base + o[19])
        self.ghost = <GhostEntry *>(base + o[20])
        self.sv.mini = <ShadowMini *>(base + o[21])
        self.sv.hash = <uint64_t *>(base + o[22])
        self.sv.count = <uint32_t *>(base + o[23])
        self.sv.heap = <HeapEntry *>(base + o[24])
        self.sv.pos = <bid_t *>(base + o[25])
        self.sv.ring_hash = <uint64_t *>(base + o[26])
        self.sv.ring_count = <uint32_t *>(base + o[27])
        self.sv.ikeys = <uint64_t *>(base + o[28])
        self.sv.ivals = <bid_t *>(base + o[29])

    cdef _init_table(self, int64_t n, int64_t g, int64_t pol):
        cdef int64_t o[NUM_ARRAYS]
        cdef int64_t total = table_layout(n, g, o)
        cdef int64_t i
        memset(<void *>self.h, 0, total)
        self.h.magic = REGISTRY_MAGIC
        self.h.version = LAYOUT_VERSION
        self.h.num_blocks = n
        self.h.policy = pol
        self.h.lineage_c = <uint64_t>(2 * n)
        self.h.adapt_level = ADAPTIVE_LEVEL
        self.h.adapt_credit = credit_of(n, ADAPTIVE_LEVEL)
        self.h.adapt_tune = 1
        self.h.adapt_leaf = 1
        self.h.shadow_decay = ADAPTIVE_DECAY
        self.h.shadow_current = shadow_candidate(ADAPTIVE_LEVEL)
        shadow_init(self.h, &self.sv, shadow_rate(n))
        self.h.num_free = n
        for i in range(n):
            self.parent[i] = -1
            self.first_child[i] = -1
            self.next_sib[i] = -1
            self.prev_sib[i] = -1
            self.heap_pos[i] = -1
            self.free_prev[i] = <bid_t>(i - 1 if i > 0 else n)
            self.free_next[i] = <bid_t>(i + 1)
        self.free_next[n] = 0
        self.free_prev[n] = <bid_t>(n - 1)
        index_init(self.h, self.ivals, index_capacity(n + g))
        ghost_init(self.h, self.ghost, g)

    # ---- properties -----------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.h.num_blocks

    @property
    def num_free(self) -> int:
        return self.h.num_free

    @property
    def num_inactive(self) -> int:
        return self.h.num_inactive

    @property
    def num_active(self) -> int:
        """Blocks with refcount > 0."""
        return self.h.num_blocks - self.h.num_free - self.h.num_inactive

    @property
    def num_registered(self) -> int:
        return self.h.num_registered

    @property
    def tick(self) -> int:
        return self.h.tick

    @property
    def policy(self) -> int:
        return self.h.policy

    @property
    def ghost_blocks(self) -> int:
        """Entries of the ghost table (0: none; LINEAGE and ADAPTIVE only)."""
        return self.h.ghost_blocks

    @property
    def num_ghosts(self) -> int:
        """Live ghost entries: evicted hashes whose use count would be restored at registration."""
        return self.h.ghost_size

    @property
    def adaptive(self) -> dict:
        """ADAPTIVE's state: the credit level and its ticks, whether the shadow tuner moves it
        (tune) and leaves go first, the keys the sweep has still to refresh since the last move
        (stale), and the tuner's (kvbm/_fast/_shadow.pxd): sample rate R, mini
        cache size M, epochs so far, the scores' decay (in 2**-16), the candidate the level follows
        (-1: none yet), and per candidate (W = 0, 1/8, ..., 32) its level, score (in 2**-16), hits
        and evictions; then the ghost hits so far of blocks evicted after one use and after more
        (ghost_once: live ghost entries of the first kind)."""
        h = self.h
        return dict(level=h.adapt_level, credit=h.adapt_credit, tune=bool(h.adapt_tune),
                    leaf_first=bool(h.adapt_leaf), stale=h.adapt_stale, rate=h.shadow_rate,
                    mini_blocks=h.shadow_m,
                    epochs=h.shadow_epochs, decay=h.shadow_decay, current=h.shadow_current,
                    levels=[shadow_level(k) for k in range(SHADOW_K)],
                    scores=[self.sv.mini[k].score for k in range(SHADOW_K)],
                    hits=[self.sv.mini[k].hits for k in range(SHADOW_K)],
                    evictions=[self.sv.mini[k].evictions for k in range(SHADOW_K)],
                    ghost_hits_once=h.ghost_hits_once, ghost_hits_reused=h.ghost_hits_reused,
                    ghost_once=h.ghost_once)

    def set_adaptive(self, level=None, leaf_first=None, tune=None, decay=None):
        """ADAPTIVE only (studies and tests): set the credit level (-1..9 * 2**16; W = 2**(level /
        2**16 - 4), -1 is W = 0), leaves-first, whether the shadow tuner moves the level (False: a
        fixed setting, the family trace_replay's hindsight sweeps) and the tuner's decay (0..2**16,
        in 2**-16 per epoch); None keeps each. A level that is one of the tuner's candidates becomes
        the one it follows (else it follows none until the next epoch ends). The mini caches are
        kept. Every inactive block is re-keyed under the new setting (O(n); a move of the tuner
        never does)."""
        if self.h.policy != POLICY_ADAPTIVE_ID:
            raise RegistryError(f"set_adaptive: policy {self.h.policy} is not ADAPTIVE "
                                f"({POLICY_ADAPTIVE_ID})")
        cdef int64_t lv = self.h.adapt_level if level is None else \
            as_count(level + 1, "set_adaptive: level + 1", RegistryError) - 1
        cdef int64_t dc = self.h.shadow_decay if decay is None else \
            as_count(decay, "set_adaptive: decay", RegistryError)
        if lv > LEVEL_MAX or dc > 65536:
            raise RegistryError(f"set_adaptive: level {lv} must be in -1..{LEVEL_MAX}, decay {dc} in 0..65536")
        cdef int64_t tn = self.h.adapt_tune if tune is None else (1 if tune else 0)   # before any write
        cdef int64_t lf = self.h.adapt_leaf if leaf_first is None else (1 if leaf_first else 0)
        self.h.adapt_level = lv
        self.h.adapt_credit = credit_of(self.h.num_blocks, lv)
        self.h.shadow_current = shadow_candidate(lv)
        self.h.shadow_decay = dc
        self.h.adapt_tune = tn
        self.h.adapt_leaf = lf
        self.h.adapt_stale = 0
        # a setting applies to every key: re-key the live entries, then restore the heap order
        cdef int64_t i
        cdef bid_t bk
        for i in range(self.h.heap_size):
            bk = self.heap[i].block
            if self.refcount[bk] == 0:
                self._policy_key(bk, &self.heap[i])
        for i in range((self.h.heap_size - 2) // 4, -1, -1):
            self._sift_down(i)
        _debug_check(self)

    @property
    def num_evicted_dropped(self) -> int:
        """Evicted hashes overwritten in the ring before a drain (cumulative)."""
        return self.h.ring_dropped

    @property
    def buffer(self):
        """The memoryview (uint8) over the whole buffer; bytes(reg.buffer) snapshots the table."""
        return self._mem

    # ---- index and ghost table (thin over _index.pxd) -------------------------------------------

    cdef inline bid_t _find(self, uint64_t key) noexcept nogil:
        # Block registered under key, or -1 (also for a ghost entry).
        return index_find(self.h, self.ikeys, self.ivals, key)

    cdef inline int64_t _index_pos(self, uint64_t key) noexcept nogil:
        # Slot of key (a block or a ghost entry), or -1 - (the empty slot where the probe ended).
        return index_pos(self.h, self.ikeys, self.ivals, key)

    cdef void _index_remove(self, uint64_t key) noexcept nogil:
        # Caller passes the hash of a REGISTERED block.
        index_remove(self.h, self.ikeys, self.ivals, key)

    cdef void _ghost_unlink(self, bid_t s) noexcept nogil:
        # Live ghost slot s leaves the FIFO (its index entry is the caller's business).
        ghost_unlink(self.h, self.ghost, s)

    cdef void _ghost_record(self, uint64_t key, uint32_t count) noexcept nogil:
        # Caller: LINEAGE or ADAPTIVE with G > 0, in place of _index_remove(key) for an evicted
        # block.
        ghost_record(self.h, self.ikeys, self.ivals, self.ghost, key, count)

    # ---- free list ------------------------------------------------------------------------------

    cdef void _free_push(self, bid_t b) noexcept nogil:
        cdef bid_t s = <bid_t>self.h.num_blocks
        cdef bid_t t = self.free_prev[s]
        self.free_next[t] = b
        self.free_prev[b] = t
        self.free_next[b] = s
        self.free_prev[s] = b
        self.h.num_free += 1

    cdef bid_t _free_pop(self) noexcept nogil:
        # Caller checked num_free > 0.
        cdef bid_t s = <bid_t>self.h.num_blocks
        cdef bid_t b = self.free_next[s]
        cdef bid_t nx = self.free_next[b]
        self.free_next[s] = nx
        self.free_prev[nx] = s
        self.free_next[b] = -1
        self.free_prev[b] = -1
        self.h.num_free -= 1
        return b

    # ---- inactive heap (thin over _heap.pxd, plus the registry's zombies) ------------------------

    cdef void _sift_up(self, int64_t i) noexcept nogil:
        heap_sift_up(self.heap, self.heap_pos, i)

    cdef void _sift_down(self, int64_t i) noexcept nogil:
        heap_sift_down(self.heap, self.heap_pos, self.h.heap_size, i)

    cdef void _resift(self, int64_t i) noexcept nogil:
        # Out of line: the hot callers (_update_key from _touch, _deactivate) stay small.
        if heap_rises(self.heap, i):
            self._sift_up(i)
        else:
            self._sift_down(i)

    cdef void _heap_push(self, bid_t b) noexcept nogil:
        # Caller: b is REGISTERED with refcount 0 and has no entry; heap_size < N (one per block).
        cdef HeapEntry e
        self._policy_key(b, &e)
        e.block = b
        e.pad = 0
        self._sift_up(heap_append(self.heap, self.heap_pos, &self.h.heap_size, &e))

    cdef void _heap_remove(self, bid_t b) noexcept nogil:
        # Caller: heap_pos[b] >= 0. Drops b's entry (live or zombie).
        cdef int64_t i = heap_take(self.heap, self.heap_pos, &self.h.heap_size, b)
        if i >= 0:
            self._resift(i)

    cdef bid_t _heap_top_live(self) noexcept nogil:
        # Caller checked num_inactive > 0, so a live entry exists; zombies above it are dropped.
        # The live block's entry stays at the root (slot 0): _evict_one removes or replaces it.
        cdef bid_t b
        cdef int64_t slot
        while True:
            b = self.heap[0].block
            if self.refcount[b] == 0:
                # The victim's index slot and lineage are needed next: start loading them now, so
                # the misses overlap with the work in between.
                slot = index_home(self.hash[b], self.h.index_shift)
                kvbm_prefetch(&self.ikeys[slot])
                kvbm_prefetch(&self.ivals[slot])
                kvbm_prefetch(&self.first_child[b])
                kvbm_prefetch(&self.parent[b])
                if self.h.ghost_size == self.h.ghost_blocks and self.h.ghost_blocks > 0:
                    # the oldest ghost entry's index slot: forgotten when the victim goes in
                    slot = index_home(self.ghost[self.ghost[self.h.ghost_blocks].next].hash,
                                       self.h.index_shift)
                    kvbm_prefetch(&self.ikeys[slot])
                    kvbm_prefetch(&self.ivals[slot])
                return b
            self._heap_remove(b)

    cdef inline void _deactivate(self, bid_t b) noexcept nogil:
        # refcount just reached 0 on a REGISTERED block: re-key its zombie entry, or push one.
        cdef int64_t i = self.heap_pos[b]
        self.h.num_inactive += 1
        if i >= 0:
            self._policy_key(b, &self.heap[i])
            self._resift(i)
        else:
            self._heap_push(b)

    cdef inline void _acquire(self, bid_t b) noexcept nogil:
        # refcount + 1; an inactive block becomes active and its entry a zombie: O(1).
        if self.refcount[b] == 0:
            self.h.num_inactive -= 1
        self.refcount[b] += 1

    # ---- policy ---------------------------------------------------------------------------------

    cdef inline void _policy_key(self, bid_t b, HeapEntry *e) noexcept nogil:
        # The one place that turns block metadata into an eviction key (smaller is evicted first).
        # New policies add a case here; available: priority, last_tick, use_count, parent,
        # children (see kvbm/policy.py).
        cdef uint64_t u, credit, t, unit
        cdef bint leaf
        if self.h.policy == POLICY_LRU_ID:
            # priority biased into uint64 so that lower (also negative) priorities sort first
            e.key1 = <uint64_t>(<int64_t>self.priority[b] + 2147483648LL)
            e.key2 = self.last_tick[b]
        else:
            # LINEAGE (kvbm.policy.EvictionPolicy.LINEAGE): leaves (no registered child here)
            # before interior blocks of the same priority; then last tick + C * f(use count),
            # f(u) = 0 for u < 2, else bit_length(u) (1..32 for a uint32 count). ADAPTIVE: the
            # same with C = adapt_credit (moved by its shadow tuner, _shadow.pxd), leaves first
            # only if adapt_leaf. key2 saturates instead of wrapping: C * f <= 2**37 * 32 for
            # N < 2**31, so only the sum can overflow.
            if self.h.policy == POLICY_LINEAGE_ID:
                unit = self.h.lineage_c
                leaf = True
            else:
                unit = self.h.adapt_credit
                leaf = self.h.adapt_leaf != 0
            e.key1 = ((<uint64_t>(<int64_t>self.priority[b] + 2147483648LL)) << 1) | \
                     (1 if leaf and self.children[b] > 0 else 0)
            u = self.use_count[b]
            t = self.last_tick[b]
            if u >= 2:
                credit = unit * <uint64_t>(64 - __builtin_clzll(u))
                e.key2 = t + credit if t <= 0xFFFFFFFFFFFFFFFFULL - credit else 0xFFFFFFFFFFFFFFFFULL
            else:
                e.key2 = t

    cdef void _update_key(self, bid_t b) noexcept nogil:
        # Hook: run whenever metadata a policy may read changes. Only live (inactive) entries are
        # ordered by their key; an active block's key is computed when it is released.
        cdef int64_t i = self.heap_pos[b]
        cdef HeapEntry e
        if i >= 0 and self.refcount[b] == 0:
            e = self.heap[i]
            self._policy_key(b, &e)
            if e.key1 != self.heap[i].key1 or e.key2 != self.heap[i].key2:
                self.heap[i] = e
                self._resift(i)

    # ---- block life cycle -----------------------------------------------------------------------

    cdef inline void _touch(self, bid_t b) noexcept nogil:
        self.h.tick += 1
        self.last_tick[b] = self.h.tick
        if self.use_count[b] != 0xFFFFFFFFU:    # saturates instead of wrapping
            self.use_count[b] += 1
        self._update_key(b)

    cdef void _reset(self, bid_t b) noexcept nogil:
        # Metadata back to a fresh block; list and heap links are the caller's business.
        self.state[b] = ST_RESET
        self.refcount[b] = 0
        self.hash[b] = 0
        self.priority[b] = 0
        self.last_tick[b] = 0
        self.use_count[b] = 0

    cdef void _link_child(self, bid_t c, bid_t p) noexcept nogil:
        cdef bid_t head = self.first_child[p]
        self.parent[c] = p
        self.prev_sib[c] = -1
        self.next_sib[c] = head
        if head >= 0:
            self.prev_sib[head] = c
        self.first_child[p] = c
        self.children[p] += 1
        self._update_key(p)

    cdef bid_t _detach(self, bid_t b) noexcept nogil:
        # b leaves its parent's child list; returns the parent (-1 if none), whose child count
        # dropped: refreshing the parent's key is the caller's business.
        cdef bid_t p = self.parent[b]
        if p >= 0:
            if self.prev_sib[b] >= 0:
                self.next_sib[self.prev_sib[b]] = self.next_sib[b]
            else:
                self.first_child[p] = self.next_sib[b]
            if self.next_sib[b] >= 0:
                self.prev_sib[self.next_sib[b]] = self.prev_sib[b]
            self.children[p] -= 1
        self.parent[b] = -1
        self.next_sib[b] = -1
        self.prev_sib[b] = -1
        return p

    cdef void _orphan_children(self, bid_t b) noexcept nogil:
        # b leaves the registry: its children lose their parent link (keys refreshed).
        cdef bid_t c = self.first_child[b], nx
        while c >= 0:
            nx = self.next_sib[c]
            self.parent[c] = -1
            self.next_sib[c] = -1
            self.prev_sib[c] = -1
            self._update_key(c)
            c = nx
        self.first_child[b] = -1
        self.children[b] = 0

    cdef bid_t _evict_one(self) noexcept nogil:
        # Caller checked num_inactive > 0. Returns the block RESET and in no list; its hash goes
        # to the ring (overwriting the oldest when nobody drained: ring_dropped counts those).
        cdef bid_t b = self._heap_top_live()
        cdef uint64_t hsh = self.hash[b]
        cdef int64_t n = self.h.num_blocks
        cdef int64_t i = -1, k
        cdef bid_t p = -1
        cdef HeapEntry e
        if self.h.policy == POLICY_LINEAGE_ID or \
                (self.h.policy == POLICY_ADAPTIVE_ID and self.h.adapt_leaf):
            # The only policies whose key reads the children count: the parent's key may change
            # when the victim leaves (its last child: a leaf now and, older than the victim, most
            # often the next one). Then the parent's new entry replaces the victim at the root and
            # sifts down, instead of popping the root (a sift-down from the top) and sifting the
            # parent up from the bottom. The entry that fills the parent's old slot cannot rise to
            # the root: the victim there is smaller than every other entry (ids break ties).
            p = self.parent[b]
            if p >= 0 and self.refcount[p] == 0 and self.heap_pos[p] > 0:
                i = self.heap_pos[p]
                e = self.heap[i]
                self.children[p] -= 1          # the count once b is detached (below)
                self._policy_key(p, &e)
                self.children[p] += 1
                if e.key1 == self.heap[i].key1 and e.key2 == self.heap[i].key2:
                    i = -1
        if i > 0:
            self._heap_remove(p)
            self.heap[0] = e
            self.heap_pos[p] = 0
            self.heap_pos[b] = -1
            self._sift_down(0)
        else:
            # Pop the root first, so that its sift-down overlaps the index and lineage misses
            # prefetched by _heap_top_live.
            self._heap_remove(b)
        self.h.num_inactive -= 1
        if self.h.ghost_blocks > 0:
            self._ghost_record(hsh, self.use_count[b])   # the index entry becomes a ghost entry
        else:
            self._index_remove(hsh)
        p = self._detach(b)
        if p >= 0 and i < 0:
            self._update_key(p)         # no-op unless the key reads the children count
        self._orphan_children(b)
        self.ring[self.h.ring_head] = hsh
        self.h.ring_head = (self.h.ring_head + 1) % n
        if self.h.ring_count < n:
            self.h.ring_count += 1
        else:
            self.h.ring_dropped += 1
        self._reset(b)
        if self.h.policy == POLICY_ADAPTIVE_ID:
            # the sweep: after a move of the tuner, SWEEP_BURST keys refreshed per eviction, in
            # block id order, until all N are (within N / SWEEP_BURST evictions); none otherwise
            for k in range(SWEEP_BURST if self.h.adapt_stale > SWEEP_BURST else self.h.adapt_stale):
                self._update_key(<bid_t>self.h.adapt_sweep)
                self.h.adapt_sweep = self.h.adapt_sweep + 1 if self.h.adapt_sweep + 1 < n else 0
                self.h.adapt_stale -= 1
        return b

    # ---- batch loops (nogil; the def methods validated every index first) ----------------------

    cdef void _allocate_core(self, int64_t n, int64_t *out) noexcept nogil:
        # allocate() checked n <= num_free + num_inactive.
        cdef int64_t i
        cdef bid_t b
        for i in range(n):
            if self.h.num_free > 0:
                b = self._free_pop()
            else:
                b = self._evict_one()
            self.state[b] = ST_PARTIAL
            self.refcount[b] = 1
            out[i] = b

    cdef void _complete_core(self, const int64_t *blocks, int64_t n) noexcept nogil:
        # complete() checked ids in range, distinct, PARTIAL.
        cdef int64_t i
        for i in range(n):
            self.state[blocks[i]] = ST_COMPLETE

    cdef void _register_core(self, const int64_t *blocks, const uint64_t *hashes,
                             const uint64_t *parents, const uint8_t *has_parent,
                             const int32_t *priorities, int64_t n, int64_t *out) noexcept nogil:
        # register() checked ids in range, distinct, COMPLETE with refcount 1, equal lengths.
        cdef int64_t i
        cdef bid_t b, e, p
        cdef uint64_t hsh
        cdef int64_t shift = self.h.index_shift
        cdef int64_t pos
        cdef bid_t s
        for i in range(n):
            if i + PREFETCH_AHEAD < n:
                # random hashes and random block ids: start the index and table misses early
                kvbm_prefetch(&self.ivals[index_home(hashes[i + PREFETCH_AHEAD], shift)])
                kvbm_prefetch(&self.ikeys[index_home(hashes[i + PREFETCH_AHEAD], shift)])
                kvbm_prefetch(&self.last_tick[blocks[i + PREFETCH_AHEAD]])
                kvbm_prefetch(&self.hash[blocks[i + PREFETCH_AHEAD]])
            b = <bid_t>blocks[i]
            hsh = hashes[i]
            pos = self._index_pos(hsh)
            e = self.ivals[pos] if pos >= 0 else -1
            if e >= 0:
                self._acquire(e)
                self._touch(e)
                self._reset(b)
                self._free_push(b)
                out[i] = e
                continue
            p = -1
            if parents != NULL and has_parent[i]:
                p = self._find(parents[i])   # before inserting hsh: a block is never its own parent
            self.state[b] = ST_REGISTERED
            self.hash[b] = hsh
            if priorities != NULL:
                self.priority[b] = priorities[i]
            # pos still holds: nothing above changed the index
            if pos >= 0:
                # a ghost entry: the hash was evicted recently. The block takes the entry's index
                # slot and its use count (before the registration touch); the entry is consumed.
                s = <bid_t>(-2 - self.ivals[pos])
                self.use_count[b] = self.ghost[s].count
                if self.h.policy == POLICY_ADAPTIVE_ID:   # a victim came back (a statistic)
                    if self.ghost[s].count < 2:
                        self.h.ghost_hits_once += 1
                    else:
                        self.h.ghost_hits_reused += 1
                self._ghost_unlink(s)
                pos = -1 - pos
            self.ikeys[-1 - pos] = hsh
            self.ivals[-1 - pos] = b
            self.h.num_registered += 1
            if p >= 0:
                self._link_child(b, p)
            self._touch(b)
            out[i] = b

    cdef int64_t _match_core(self, const uint64_t *hashes, int64_t n, bint acquire,
                             int64_t *out) noexcept nogil:
        # No block ids come in; the index only returns REGISTERED blocks.
        cdef int64_t i, mask = self.h.index_mask, shift = self.h.index_shift
        cdef bid_t e
        for i in range(n):
            if i + PREFETCH_AHEAD < n:
                kvbm_prefetch(&self.ivals[index_home(hashes[i + PREFETCH_AHEAD], shift)])
                kvbm_prefetch(&self.ikeys[index_home(hashes[i + PREFETCH_AHEAD], shift)])
            e = self._find(hashes[i])
            if e < 0:
                return i
            if acquire:
                self._acquire(e)
                self._touch(e)
            out[i] = e
        return n

    cdef void _lookup_core(self, const uint64_t *hashes, int64_t n, int64_t *out) noexcept nogil:
        cdef int64_t i, shift = self.h.index_shift
        for i in range(n):
            if i + PREFETCH_AHEAD < n:
                kvbm_prefetch(&self.ivals[index_home(hashes[i + PREFETCH_AHEAD], shift)])
                kvbm_prefetch(&self.ikeys[index_home(hashes[i + PREFETCH_AHEAD], shift)])
            out[i] = self._find(hashes[i])

    cdef void _touch_core(self, const int64_t *blocks, int64_t n) noexcept nogil:
        # touch() checked ids in range and not RESET.
        cdef int64_t i
        for i in range(n):
            self._touch(<bid_t>blocks[i])

    cdef void _release_core(self, const int64_t *blocks, int64_t n) noexcept nogil:
        # release() checked ids in range and that each block occurs at most refcount times.
        cdef int64_t i, level
        cdef bid_t b
        cdef bint tune = self.h.policy == POLICY_ADAPTIVE_ID and self.h.adapt_tune != 0
        for i in range(n):
            b = <bid_t>blocks[i]
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                if self.state[b] == ST_REGISTERED:
                    # The last holder is done: that is its last use (LRU by release order).
                    self.h.tick += 1
                    self.last_tick[b] = self.h.tick
                    self._deactivate(b)
                else:
                    self._reset(b)
                    self._free_push(b)
                    continue
            elif self.state[b] != ST_REGISTERED:
                continue
            if tune and shadow_sampled(self.h, self.hash[b]):
                # a use of a REGISTERED block ended: ADAPTIVE's tuner sees it (_shadow.pxd), after
                # the block's own release; a move re-keys through the sweep
                level = shadow_use(self.h, &self.sv, self.hash[b],
                                   self.h.adapt_leaf != 0 and self.children[b] > 0)
                if level != SHADOW_NO_MOVE:
                    self.h.adapt_level = level
                    self.h.adapt_credit = credit_of(self.h.num_blocks, level)
                    self.h.adapt_stale = self.h.num_blocks    # every key, by the sweep

    cdef void _set_priority_core(self, const int64_t *blocks, const int32_t *prios,
                                 int64_t n) noexcept nogil:
        # set_priority() checked ids in range, not RESET, equal lengths.
        cdef int64_t i
        for i in range(n):
            self.priority[blocks[i]] = prios[i]
            self._update_key(<bid_t>blocks[i])

    cdef int64_t _evict_core(self, int64_t n, uint64_t *out) noexcept nogil:
        cdef int64_t i, m = n if n < self.h.num_inactive else self.h.num_inactive
        cdef bid_t b
        for i in range(m):
            b = self._evict_one()
            out[i] = self.ring[(self.h.ring_head - 1 + self.h.num_blocks) % self.h.num_blocks]
            self._free_push(b)
        return m

    # ---- validation helpers ---------------------------------------------------------------------

    cdef int _check_ids(self, const int64_t[::1] blocks, str op) except -1:
        cdef Py_ssize_t i
        cdef int64_t n = self.h.num_blocks, b
        for i in range(blocks.shape[0]):
            b = blocks[i]
            if b < 0 or b >= n:
                raise RegistryError(f"{op}: block {b} (slot {i}) is out of range [0, {n})")
        return 0

    cdef int _check_distinct(self, const int64_t[::1] blocks, str op) except -1:
        # Ids already checked by _check_ids. mark[] is restored to all zeros before returning.
        cdef Py_ssize_t i, j, dup = -1
        for i in range(blocks.shape[0]):
            if self.mark[blocks[i]]:
                dup = i
                break
            self.mark[blocks[i]] = 1
        for j in range(blocks.shape[0] if dup < 0 else dup):
            self.mark[blocks[j]] = 0
        if dup >= 0:
            raise RegistryError(f"{op}: block {blocks[dup]} appears more than once (slot {dup})")
        return 0

    cdef int _check_not_reset(self, const int64_t[::1] blocks, str op) except -1:
        cdef Py_ssize_t i
        for i in range(blocks.shape[0]):
            if self.state[blocks[i]] == ST_RESET:
                raise RegistryError(f"{op}: block {blocks[i]} (slot {i}) is RESET (free), "
                                    f"{op} needs an allocated block")
        return 0

    # ---- public API -----------------------------------------------------------------------------

    def allocate(self, n):
        """`n` blocks as PARTIAL with refcount 1 (int64 ids), free blocks first, then inactive
        blocks evicted in policy order; None (and no change) if free + inactive < n."""
        cdef int64_t k = as_count(n, "allocate: n", RegistryError)
        if k > self.h.num_free + self.h.num_inactive:
            return None
        out = np.empty(k, dtype=np.int64)
        cdef int64_t[::1] o = out
        if k > 0:
            self._allocate_core(k, &o[0])
        _debug_check(self)
        return out

    def complete(self, blocks):
        """PARTIAL -> COMPLETE."""
        arr = as_i64(blocks, "complete: blocks", RegistryError)
        cdef const int64_t[::1] bs = arr
        cdef Py_ssize_t i
        self._check_ids(bs, "complete")
        for i in range(bs.shape[0]):
            if self.state[bs[i]] != ST_PARTIAL:
                raise RegistryError(f"complete: block {bs[i]} (slot {i}) is "
                                    f"{_state_name(self.state[bs[i]])}, complete needs PARTIAL")
        self._check_distinct(bs, "complete")
        if bs.shape[0] > 0:
            self._complete_core(&bs[0], bs.shape[0])
        _debug_check(self)

    def register(self, blocks, hashes, parents=None, priorities=None, has_parent=None):
        """Register COMPLETE blocks owned by the caller (refcount 1) under `hashes` (uint64).

        parents: parent sequence hash per slot (uint64), or None for all roots. has_parent: bool
        per slot saying which entries of `parents` are real (default: all, when parents is given),
        since 0 is a valid hash. A block's parent link is set to the block registered here under
        the parent hash at that moment (earlier slots of this batch included), else -1.
        priorities: int32 per slot, or None to keep each block's current priority (0, or what
        set_priority gave it while PARTIAL/COMPLETE).
        Dedup: a hash already registered (or registered by an earlier slot) returns that block
        with refcount + 1 (an inactive one becomes active) and frees the caller's block (RESET, to
        the free list tail); the existing block keeps its priority and parent.
        Every returned block is touched. Returns the canonical block per slot (int64).
        """
        barr = as_i64(blocks, "register: blocks", RegistryError)
        harr = as_u64(hashes, "register: hashes", RegistryError)
        cdef Py_ssize_t n = barr.shape[0], i
        if harr.shape[0] != n:
            raise RegistryError(f"register: {n} blocks but {harr.shape[0]} hashes")
        parr = None
        marr = None
        if parents is not None:
            parr = as_u64(parents, "register: parents", RegistryError)
            if parr.shape[0] != n:
                raise RegistryError(f"register: {n} blocks but {parr.shape[0]} parents")
            if has_parent is None:
                marr = np.ones(n, dtype=np.uint8)
            else:
                marr = as_mask(has_parent, "register: has_parent", RegistryError)
                if marr.shape[0] != n:
                    raise RegistryError(f"register: {n} blocks but {marr.shape[0]} has_parent")
        elif has_parent is not None:
            raise RegistryError("register: has_parent given without parents")
        parr_i32 = None
        if priorities is not None:
            parr_i32 = as_i32(priorities, "register: priorities", RegistryError)
            if parr_i32.shape[0] != n:
                raise RegistryError(f"register: {n} blocks but {parr_i32.shape[0]} priorities")
        cdef const int64_t[::1] bs = barr
        cdef const uint64_t[::1] hs = harr
        cdef const uint64_t[::1] ps
        cdef const uint8_t[::1] ms
        cdef const int32_t[::1] pr
        self._check_ids(bs, "register")
        for i in range(n):
            if self.state[bs[i]] != ST_COMPLETE:
                raise RegistryError(f"register: block {bs[i]} (slot {i}) is "
                                    f"{_state_name(self.state[bs[i]])}, register needs COMPLETE")
            if self.refcount[bs[i]] != 1:
                raise RegistryError(f"register: block {bs[i]} (slot {i}) has refcount "
                                    f"{self.refcount[bs[i]]}, register needs 1 (owned by caller)")
        self._check_distinct(bs, "register")
        out = np.empty(n, dtype=np.int64)
        cdef int64_t[::1] o = out
        if n == 0:
            return out
        cdef const uint64_t *pp = NULL
        cdef const uint8_t *mp = NULL
        cdef const int32_t *prp = NULL
        if parr is not None:
            ps = parr
            ms = marr
            pp = &ps[0]
            mp = &ms[0]
        if parr_i32 is not None:
            pr = parr_i32
            prp = &pr[0]
        self._register_core(&bs[0], &hs[0], pp, mp, prp, n, &o[0])
        _debug_check(self)
        return out

    def match(self, hashes, acquire=True):
        """Blocks of the longest registered prefix of `hashes` (stops at the first miss).
        acquire=True: refcount + 1 and touch each (an inactive block becomes active)."""
        harr = as_u64(hashes, "match: hashes", RegistryError)
        cdef const uint64_t[::1] hs = harr
        cdef Py_ssize_t n = hs.shape[0]
        out = np.empty(n, dtype=np.int64)
        cdef int64_t[::1] o = out
        cdef int64_t m = 0
        cdef bint acq = bool(acquire)
        if n > 0:
            m = self._match_core(&hs[0], n, acq, &o[0])
        if acq:
            _debug_check(self)
        return out[:m] if m < n else out

    def lookup(self, hashes):
        """Block per hash, -1 where not registered; changes nothing."""
        harr = as_u64(hashes, "lookup: hashes", RegistryError)
        cdef const uint64_t[::1] hs = harr
        cdef Py_ssize_t n = hs.shape[0]
        out = np.empty(n, dtype=np.int64)
        cdef int64_t[::1] o = out
        if n > 0:
            self._lookup_core(&hs[0], n, &o[0])
        return out

    def touch(self, blocks):
        """last-use tick := ++tick, use count + 1, policy key refreshed; per occurrence."""
        arr = as_i64(blocks, "touch: blocks", RegistryError)
        cdef const int64_t[::1] bs = arr
        self._check_ids(bs, "touch")
        self._check_not_reset(bs, "touch")
        if bs.shape[0] > 0:
            self._touch_core(&bs[0], bs.shape[0])
        _debug_check(self)

    def release(self, blocks):
        """refcount - 1 per occurrence; at 0 a REGISTERED block becomes inactive (stamped with a
        new tick, still matchable), any other block is RESET and goes to the free list tail."""
        arr = as_i64(blocks, "release: blocks", RegistryError)
        cdef const int64_t[::1] bs = arr
        cdef Py_ssize_t i, n = bs.shape[0], bad = -1
        cdef int64_t b
        self._check_ids(bs, "release")
        for i in range(n):
            b = bs[i]
            self.mark[b] += 1
            if self.mark[b] > self.refcount[b]:
                bad = i
                break
        cdef uint32_t times = 0
        if bad >= 0:
            times = self.mark[bs[bad]]
        for i in range(n if bad < 0 else bad + 1):
            self.mark[bs[i]] = 0
        if bad >= 0:
            b = bs[bad]
            raise RegistryError(f"release: block {b} (slot {bad}) is released {times} times in "
                                f"this batch but has refcount {self.refcount[b]} "
                                f"({_state_name(self.state[b])})")
        if n > 0:
            self._release_core(&bs[0], n)
        _debug_check(self)

    def evict(self, n):
        """Evict up to `n` inactive blocks in policy order (to the free list); their hashes."""
        cdef int64_t k = as_count(n, "evict: n", RegistryError)
        if k > self.h.num_inactive:
            k = self.h.num_inactive
        out = np.empty(k, dtype=np.uint64)
        cdef uint64_t[::1] o = out
        if k > 0:
            self._evict_core(k, &o[0])
        _debug_check(self)
        return out

    def take_victims(self, n):
        """Up to `n` inactive blocks evicted in policy order and handed to the caller as PARTIAL
        with refcount 1, their bytes untouched, with the hash each one held: (blocks int64,
        hashes uint64), paired. The disk tier's cleaner writes victims out with this; unlike
        allocate + drain_evicted, the pairing holds whoever else allocates from the table."""
        cdef int64_t k = as_count(n, "take_victims: n", RegistryError)
        if k > self.h.num_inactive:
            k = self.h.num_inactive
        blocks = np.empty(k, dtype=np.int64)
        hashes = np.empty(k, dtype=np.uint64)
        cdef int64_t[::1] bo = blocks
        cdef uint64_t[::1] ho = hashes
        cdef int64_t i
        cdef bid_t b
        for i in range(k):
            b = self._evict_one()
            ho[i] = self.ring[(self.h.ring_head - 1 + self.h.num_blocks) % self.h.num_blocks]
            self.state[b] = ST_PARTIAL
            self.refcount[b] = 1
            bo[i] = b
        _debug_check(self)
        return blocks, hashes

    def drain_evicted(self):
        """Hashes evicted (by allocate or evict) since the last drain, oldest first. The ring
        holds the newest num_blocks; older ones are dropped and counted in num_evicted_dropped."""
        cdef int64_t n = self.h.num_blocks, c = self.h.ring_count, start, i
        out = np.empty(c, dtype=np.uint64)
        cdef uint64_t[::1] o = out
        start = (self.h.ring_head - c + n) % n
        for i in range(c):
            o[i] = self.ring[(start + i) % n]
        self.h.ring_count = 0
        return out

    def set_priority(self, blocks, priorities):
        """Set eviction priority (int32, lower is evicted first) of allocated blocks."""
        arr = as_i64(blocks, "set_priority: blocks", RegistryError)
        parr = as_i32(priorities, "set_priority: priorities", RegistryError)
        if parr.shape[0] != arr.shape[0]:
            raise RegistryError(f"set_priority: {arr.shape[0]} blocks but {parr.shape[0]} priorities")
        cdef const int64_t[::1] bs = arr
        cdef const int32_t[::1] ps = parr
        self._check_ids(bs, "set_priority")
        self._check_not_reset(bs, "set_priority")
        if bs.shape[0] > 0:
            self._set_priority_core(&bs[0], &ps[0], bs.shape[0])
        _debug_check(self)

    def info(self, block) -> dict:
        """Metadata of one block (tests, debugging)."""
        cdef int64_t b = as_count(block, "info: block", RegistryError)
        if b >= self.h.num_blocks:
            raise RegistryError(f"info: block {b} is out of range [0, {self.h.num_blocks})")
        return dict(state=BlockState(self.state[b]), refcount=self.refcount[b], hash=self.hash[b],
                    priority=self.priority[b], tick=self.last_tick[b],
                    use_count=self.use_count[b], parent=self.parent[b],
                    children=self.children[b])

    def check_invariants(self):
        """Raise RegistryError (with the numbers) if the table is inconsistent (_invariants.pxi)."""
        _check_table(self)

    def rebuild(self, refcounts) -> dict:
        """Repairs a table whose mutation was cut short (its process died mid-call, kvbm.shared_g2):
        `refcounts` (uint32 per block) replace the refcounts, and every derived structure (free
        list, heap, index, lineage lists, counts, ghost table) is rebuilt from the per-block
        fields. The rules are in _repair.pxi. Returns what changed (counts)."""
        arr = np.ascontiguousarray(np.asarray(refcounts), dtype=np.uint32)
        if arr.ndim != 1 or arr.shape[0] != self.h.num_blocks:
            raise RegistryError(f"rebuild: {arr.shape} refcounts for {self.h.num_blocks} blocks")
        cdef const uint32_t[::1] rc = arr
        return _rebuild_table(self, &rc[0])


include "_invariants.pxi"
include "_repair.pxi"
