# cython: language_level=3
"""Contract of the shared G2 registry's segment (kvbm.shared_g2): the structs at its start, the
process-shared robust mutex, and the two classes over them. Nothing here is a Python object per
block: pins are one uint32 array per engine slot, and each namespace's table is a BlockRegistry
buffer inside the segment.

Segment layout (offsets in G2Header, every part page- or line-aligned):
  G2Header       sizes, offsets, policy and the node-wide counters
  LockLine       the mutex and the dirty mark (holder, holder_ns), one cache line of their own
  NsEntry[M]     namespace table (M = max_namespaces)
  EngineEntry[E] engine table (E = max_engines)
  -- reserved (posix_fallocate) up to here; the rest stays sparse until a join reserves its part --
  pins[E]        per engine slot: uint32 per G2 block, the times that engine holds the block
  registry[M]    per namespace slot: reg_stride bytes, a BlockRegistry table of its quota
"""
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

from kvbm._fast.registry cimport BlockRegistry

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_mutexattr_init(pthread_mutexattr_t *attr)
    int pthread_mutexattr_destroy(pthread_mutexattr_t *attr)
    int pthread_mutexattr_setpshared(pthread_mutexattr_t *attr, int pshared)
    int pthread_mutexattr_setrobust(pthread_mutexattr_t *attr, int robust)
    int pthread_mutex_init(pthread_mutex_t *m, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_trylock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_mutex_consistent(pthread_mutex_t *m)
    enum:
        PTHREAD_PROCESS_SHARED
        PTHREAD_MUTEX_ROBUST


ctypedef struct G2Header:
    uint64_t magic            # G2_MAGIC once initialised
    uint64_t version          # layout version of these structs
    int64_t segment_bytes     # size of the whole segment
    int64_t reserved_bytes    # prefix reserved at creation (header, lock, tables)
    int64_t total_blocks      # G2 blocks the namespaces partition
    int64_t max_engines       # E: engine slots
    int64_t max_namespaces    # M: namespace slots
    int64_t policy            # kvbm.policy.EvictionPolicy id of every namespace's registry
    int64_t ghost_per_mille   # LINEAGE/ADAPTIVE ghost entries per namespace, thousandths of its quota
    int64_t lock_off          # offset of the LockLine
    int64_t ns_off            # offset of NsEntry[M]
    int64_t engine_off        # offset of EngineEntry[E]
    int64_t pins_off          # offset of engine slot 0's pins row
    int64_t pins_stride       # bytes per pins row (total_blocks * 4, page-rounded)
    int64_t regs_off          # offset of namespace slot 0's registry
    int64_t reg_stride        # bytes per namespace registry slot (page-rounded)
    uint64_t generation       # bumps on every join, leave and reap (status readers)
    uint64_t repairs          # recoveries after a holder died or left its mark
    uint64_t reaped           # engines reaped because their process was gone
    uint64_t created_ns       # wall clock at creation (time.time_ns)


ctypedef struct LockLine:
    pthread_mutex_t mutex     # PTHREAD_PROCESS_SHARED | PTHREAD_MUTEX_ROBUST
    int32_t holder            # engine slot holding the lock, -2 a non-engine, -1 none or unknown
    int32_t holder_ns         # what the holder is mutating: a namespace slot, -3 the tables only,
                              #   -1 nothing (clean). Left set by a holder that died (or raised)
                              #   mid-mutation: the next locker repairs.
    uint64_t acquired         # lock acquisitions
    uint64_t contended        # of those, the ones that had to wait


ctypedef struct NsEntry:
    uint64_t key0             # blake2b-128 of (fingerprint, salt): first half
    uint64_t key1             #   second half (both 0 while free)
    uint32_t state            # NS_FREE, NS_INIT (table being made), NS_LIVE
    uint32_t engines          # LIVE engine slots in it
    int64_t block_offset      # first G2 block of its partition
    int64_t num_blocks        # its quota: the partition's length, fixed while it lives
    int64_t ghost_blocks      # its registry's ghost entries
    uint64_t generation       # bumps each time the slot is made
    uint64_t created_ns       # wall clock at creation
    uint64_t retired_hits     # match hits of engines that left it (for status)
    uint64_t retired_queries  # match queries of engines that left it
    char label[64]            # the fingerprint, cut to 63 bytes, NUL padded (status only)
    int64_t drainer           # engine slot + 1 that drains its evicted ring (0: none yet): one per
                              #   namespace, so that no engine's drain takes another's evictions
    uint64_t pad[1]           # 0 (keeps the entry 160 bytes)


ctypedef struct EngineEntry:
    uint32_t state            # ENG_FREE, ENG_LIVE
    int32_t ns                # namespace slot
    int64_t pid               # the engine's process
    uint64_t start_time       # field 22 of /proc/<pid>/stat: a reused pid has another one
    uint64_t generation       # bumps each time the slot is taken or freed; a lease carries it
    uint64_t joined_ns        # wall clock at join
    uint64_t match_calls      # match(acquire=True) calls
    uint64_t match_queries    # hashes they asked for
    uint64_t match_hits       # blocks they acquired
    uint64_t allocated        # blocks allocate handed out
    uint64_t registered       # blocks newly registered
    uint64_t deduplicated     # register slots answered by an existing block
    uint64_t released         # pins given back by release
    int64_t pinned            # pins held now (the sum of its pins row)
    char engine_id[64]        # the engine's name, NUL padded
    uint64_t workers          # bit per path worker (1 << Path) holding this engine's registration:
                              #   a transfer of it may still touch its blocks (set and cleared by
                              #   the workers; a RETIRED slot is freed when it reaches 0)
    uint64_t pad[2]           # 0 (keeps the entry 192 bytes: three cache lines)


cdef enum:
    NS_FREE = 0
    NS_INIT = 1
    NS_LIVE = 2
    ENG_FREE = 0
    ENG_LIVE = 1
    ENG_RETIRED = 2               # left or dead while a worker held its registration: its holds
                                  #   stay (quarantined) until no worker does
    MARK_CLEAN = -1
    MARK_TABLES = -3
    HOLDER_OTHER = -2


cdef class SharedTables:
    cdef object _mem               # memoryview over the whole segment (keeps it mapped)
    cdef unsigned char *base       # its first byte
    cdef G2Header *h
    cdef LockLine *lk
    cdef NsEntry *nss
    cdef EngineEntry *engs
    cdef readonly object header    # numpy structured views over the structs (shared memory)
    cdef readonly object namespaces
    cdef readonly object engines
    cdef readonly object pins      # uint32 [E, pins_stride / 4]
    cdef public object on_recover  # callable(owner_died): repairs, run with the lock held
    cdef public int64_t lock_spin_ns   # a waiter retries trylock this long before blocking

    cdef int _acquire(self) except -1
    cdef void _unlock(self, bint clean) noexcept nogil


cdef class SharedBlockRegistry:
    cdef BlockRegistry reg         # the namespace's table, attached to its slot of the segment
    cdef SharedTables t
    cdef object g2                 # the SharedG2 this lease came from (the rare paths)
    cdef LockLine *lk
    cdef EngineEntry *me           # this engine's slot
    cdef uint32_t *pins            # this engine's pins over the namespace's range (local ids)
    cdef readonly int slot         # engine slot
    cdef readonly int namespace    # namespace slot
    cdef readonly uint64_t generation   # the engine slot's generation at join
    cdef int64_t n                 # blocks of the namespace

    cdef int _enter(self, bint mutating) except -1
    cdef void _exit(self) noexcept nogil
    cdef int _check_ids(self, const int64_t[::1] bs, str op) except -1
    cdef int _check_held(self, const int64_t[::1] bs, str op) except -1
    cdef void _pin(self, const int64_t[::1] bs) noexcept nogil
