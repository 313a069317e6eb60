# cython: language_level=3
"""The registry's indexed 4-ary min-heap: inline helpers over plain arrays, called by
BlockRegistry's thin methods (registry.pyx). No object, no GIL.

`heap` holds `size` HeapEntry (key1, key2, block), smallest (key1, key2, block id) at slot 0, the
parent of slot i at (i - 1) // 4: half the depth of a binary heap, so fewer cache misses per pop,
and the keys sit inline in the entries, so sifting reads one array. `pos[b]` is the slot of block
b's entry, -1 when it has none; every move keeps it up to date. What a key means (the policy) and
which entries are live or zombies is the registry's business.

Push is heap_append then heap_sift_up; removal is heap_take then a resift (heap_rises picks the
direction). The caller composes them and so decides where the sift loops get inlined:
BlockRegistry keeps them behind out-of-line methods (`_resift`, `_sift_up`, `_sift_down`), as
before the split; inlined into every re-key they made `_touch` too big to inline, and match
8-10% slower.
"""
from libc.stdint cimport int64_t
from libc.string cimport memset

from kvbm._fast._table cimport HeapEntry, bid_t


cdef inline bint heap_less(const HeapEntry *a, const HeapEntry *b) noexcept nogil:
    if a.key1 != b.key1:
        return a.key1 < b.key1
    if a.key2 != b.key2:
        return a.key2 < b.key2
    return a.block < b.block


cdef inline void heap_sift_up(HeapEntry *heap, bid_t *pos, int64_t i) noexcept nogil:
    cdef HeapEntry e = heap[i]
    cdef int64_t p
    while i > 0:
        p = (i - 1) >> 2
        if not heap_less(&e, &heap[p]):
            break
        heap[i] = heap[p]
        pos[heap[i].block] = <bid_t>i
        i = p
    heap[i] = e
    pos[e.block] = <bid_t>i


cdef inline void heap_sift_down(HeapEntry *heap, bid_t *pos, int64_t n, int64_t i) noexcept nogil:
    # n: entries in the heap.
    cdef HeapEntry e = heap[i]
    cdef int64_t c, first, k, last
    while True:
        first = 4 * i + 1
        if first >= n:
            break
        c = first
        last = first + 4 if first + 4 <= n else n
        for k in range(first + 1, last):
            if heap_less(&heap[k], &heap[c]):
                c = k
        if not heap_less(&heap[c], &e):
            break
        heap[i] = heap[c]
        pos[heap[i].block] = <bid_t>i
        i = c
    heap[i] = e
    pos[e.block] = <bid_t>i


cdef inline bint heap_rises(const HeapEntry *heap, int64_t i) noexcept nogil:
    # The entry at slot i (whose key changed) is smaller than its parent: sift it up, else down.
    return i > 0 and heap_less(&heap[i], &heap[(i - 1) >> 2])


cdef inline void heap_resift(HeapEntry *heap, bid_t *pos, int64_t n, int64_t i) noexcept nogil:
    # The entry at slot i changed its key: sift it whichever way it now belongs (n: entries).
    # BlockRegistry composes its own out of line (`_resift`); ADAPTIVE's minis inline this one.
    if heap_rises(heap, i):
        heap_sift_up(heap, pos, i)
    else:
        heap_sift_down(heap, pos, n, i)


cdef inline int64_t heap_append(HeapEntry *heap, bid_t *pos, int64_t *size,
                                const HeapEntry *e) noexcept nogil:
    # Puts e in the slot after the last and returns that slot, for the caller to sift up.
    # Caller: e.block has no entry, and the heap has room (one entry per block at most).
    cdef int64_t i = size[0]
    size[0] = i + 1
    heap[i] = e[0]
    pos[e.block] = <bid_t>i
    return i


cdef inline int64_t heap_take(HeapEntry *heap, bid_t *pos, int64_t *size, bid_t b) noexcept nogil:
    # Drops b's entry (caller: pos[b] >= 0): the last entry fills its slot, and the vacated last
    # slot is zeroed. Returns the filled slot, for the caller to resift, or -1 if b's was the last.
    cdef int64_t i = pos[b]
    cdef int64_t last = size[0] - 1
    pos[b] = -1
    size[0] = last
    if i != last:
        heap[i] = heap[last]
        pos[heap[i].block] = <bid_t>i
    memset(<void *>&heap[last], 0, sizeof(HeapEntry))
    return i if i != last else -1
