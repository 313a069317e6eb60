# Invariant checks of BlockRegistry, included by registry.pyx (it is not a module of its own).
#
# Why an include: the checks read every array of the table and call the registry's inline helpers
# (`_policy_key`, `_find`), so they belong to registry.pyx's C module, where those are direct
# calls and the struct fields are plain loads. Cython allows no `include` inside a class body, so
# they are module-level functions taking the registry; a separate .pyx would be a second extension
# that cimports registry.pxd while the registry calls it (a cimport cycle between two extension
# modules) and would reach `_policy_key` through the vtable.
#
# Order: check_invariants() -> _check_table (per-block states and counts, free list, heap, index,
# lineage, ring) -> _check_ghost. With KVBM_DEBUG, _debug_check runs them after every mutating
# call; in a release build it compiles to nothing.


cdef inline int _debug_check(BlockRegistry r) except -1:
    if KVBM_REGISTRY_DEBUG:
        _check_table(r)
    return 0


cdef int _check_table(BlockRegistry r) except -1:
    # BlockRegistry.check_invariants: per-block states and counts, free list, heap, index, lineage,
    # ring, then the ghost table.
    cdef int64_t n = r.h.num_blocks, cap = r.h.index_capacity, mask = r.h.index_mask
    cdef int64_t i, j, k, b, steps, prev, nfree = 0, nactive = 0, nreg = 0, nin = 0, cnt
    cdef int64_t s = n
    cdef HeapEntry probe
    cdef uint8_t st
    cdef int64_t nchild = 0, nlinked = 0, nghost = 0
    # per-block states and refcounts
    for b in range(n):
        st = r.state[b]
        if st > ST_REGISTERED:
            raise RegistryError(f"block {b} has bad state {st}")
        if r.refcount[b] > 0:
            nactive += 1
        if st == ST_RESET:
            nfree += 1
            if r.refcount[b] != 0 or r.hash[b] != 0 or r.use_count[b] != 0:
                raise RegistryError(f"RESET block {b} has refcount {r.refcount[b]}, "
                                    f"hash {r.hash[b]}, use_count {r.use_count[b]}")
            if r.free_next[b] < 0 or r.free_prev[b] < 0:
                raise RegistryError(f"RESET block {b} is not in the free list")
        elif r.free_next[b] >= 0 or r.free_prev[b] >= 0:
            raise RegistryError(f"{_state_name(st)} block {b} has free-list links")
        if (st == ST_PARTIAL or st == ST_COMPLETE) and r.refcount[b] != 1:
            raise RegistryError(f"{_state_name(st)} block {b} has refcount {r.refcount[b]}, "
                                f"expected 1")
        if st == ST_REGISTERED:
            nreg += 1
            if r._find(r.hash[b]) != b:
                raise RegistryError(f"REGISTERED block {b} (hash {r.hash[b]}) not found in "
                                    f"the index (found {r._find(r.hash[b])})")
            if r.refcount[b] == 0 and r.heap_pos[b] < 0:
                raise RegistryError(f"inactive block {b} has no heap entry")
            if r.refcount[b] == 0:
                nin += 1
        elif r.heap_pos[b] >= 0:
            raise RegistryError(f"{_state_name(st)} block {b} is in the inactive heap")
        if st != ST_REGISTERED and (r.parent[b] != -1 or r.children[b] != 0
                                    or r.first_child[b] != -1):
            raise RegistryError(f"{_state_name(st)} block {b} has lineage: parent "
                                f"{r.parent[b]}, children {r.children[b]}")
        if r.mark[b] != 0:
            raise RegistryError(f"scratch mark of block {b} is {r.mark[b]}, expected 0")
    if nfree != r.h.num_free:
        raise RegistryError(f"{nfree} RESET blocks but num_free = {r.h.num_free}")
    if nin != r.h.num_inactive:
        raise RegistryError(f"{nin} inactive blocks but num_inactive = {r.h.num_inactive}")
    if r.h.heap_size < nin or r.h.heap_size > nreg:
        raise RegistryError(f"heap holds {r.h.heap_size} entries for {nin} inactive and "
                            f"{nreg} registered blocks")
    if nfree + nin + nactive != n:
        raise RegistryError(f"free {nfree} + inactive {nin} + active {nactive} != {n} blocks")
    if nreg != r.h.num_registered:
        raise RegistryError(f"{nreg} REGISTERED blocks but index holds {r.h.num_registered}")
    # free list structure
    prev = s
    b = r.free_next[s]
    steps = 0
    while b != s:
        if b < 0 or b > n or steps > n:
            raise RegistryError(f"free list broken after {steps} blocks (next = {b})")
        if r.free_prev[b] != prev:
            raise RegistryError(f"free list: block {b} has prev {r.free_prev[b]}, expected {prev}")
        if r.state[b] != ST_RESET:
            raise RegistryError(f"free list holds {_state_name(r.state[b])} block {b}")
        prev = b
        b = r.free_next[b]
        steps += 1
    if steps != r.h.num_free or r.free_prev[s] != prev:
        raise RegistryError(f"free list walk found {steps} blocks, num_free = {r.h.num_free}")
    # heap: positions, order, and live entries carry the key the policy computes now (ADAPTIVE:
    # up to the credit of a reused block's key2)
    for i in range(r.h.heap_size):
        b = r.heap[i].block
        if b < 0 or b >= n or r.heap_pos[b] != i:
            raise RegistryError(f"heap slot {i} holds block {b} with position "
                                f"{r.heap_pos[b] if 0 <= b < n else None}")
        if r.state[b] != ST_REGISTERED:
            raise RegistryError(f"heap slot {i} holds {_state_name(r.state[b])} block {b}")
        if r.refcount[b] == 0:
            r._policy_key(<bid_t>b, &probe)
            if r.h.policy == POLICY_ADAPTIVE_ID and r.use_count[b] >= 2 \
                    and (b - r.h.adapt_sweep + n) % n < r.h.adapt_stale:
                # a reused block the sweep has not reached since the tuner's last move keeps the
                # credit of when its key was computed (_shadow.pxd): only its first word and a
                # key2 no earlier than its tick are checkable; every other key is exact
                probe.key2 = r.heap[i].key2 if r.heap[i].key2 >= r.last_tick[b] else probe.key2
            if probe.key1 != r.heap[i].key1 or probe.key2 != r.heap[i].key2:
                raise RegistryError(f"inactive block {b} has stale key ({r.heap[i].key1}, "
                                    f"{r.heap[i].key2}), policy says ({probe.key1}, {probe.key2})")
        if i > 0 and heap_less(&r.heap[i], &r.heap[(i - 1) >> 2]):
            raise RegistryError(f"heap order broken at slot {i} (block {b})")
    # index: every entry is a REGISTERED block under its hash, or a live ghost entry under its
    # hash, reachable from its home slot
    cnt = 0
    nghost = 0
    for i in range(cap):
        b = r.ivals[i]
        if b == -1:
            continue
        if b <= -2:
            nghost += 1
            k = -2 - b
            if k >= r.h.ghost_blocks or r.ghost[k].hash != r.ikeys[i] \
                    or r.ghost[k].count == 0:
                raise RegistryError(f"index slot {i} -> ghost slot {k}, which is not a live "
                                    f"entry of hash {r.ikeys[i]}")
        else:
            cnt += 1
            if b >= n or r.state[b] != ST_REGISTERED or r.hash[b] != r.ikeys[i]:
                raise RegistryError(f"index slot {i} -> block {b}, which is not REGISTERED "
                                    f"under hash {r.ikeys[i]}")
        j = index_home(r.ikeys[i], r.h.index_shift)
        while j != i:
            if r.ivals[j] == -1:
                raise RegistryError(f"index slot {i} unreachable: empty slot {j} on its probe path")
            j = (j + 1) & mask
    if cnt != nreg:
        raise RegistryError(f"index has {cnt} entries, {nreg} REGISTERED blocks")
    if nghost != r.h.ghost_size:
        raise RegistryError(f"index has {nghost} ghost entries, ghost_size {r.h.ghost_size}")
    # lineage: child lists agree with parent links and counts
    for b in range(n):
        if r.state[b] != ST_REGISTERED:
            continue
        if r.parent[b] >= 0 and r.state[r.parent[b]] != ST_REGISTERED:
            raise RegistryError(f"block {b} has parent {r.parent[b]}, which is not REGISTERED")
        if r.parent[b] >= 0:
            nlinked += 1
        cnt = 0
        prev = -1
        j = r.first_child[b]
        while j >= 0:
            if cnt > n or r.parent[j] != b or r.prev_sib[j] != prev:
                raise RegistryError(f"child list of block {b} broken at child {j}")
            prev = j
            j = r.next_sib[j]
            cnt += 1
        if cnt != r.children[b]:
            raise RegistryError(f"block {b} lists {cnt} children, children = {r.children[b]}")
        nchild += cnt
    if nchild != nlinked:
        raise RegistryError(f"{nlinked} blocks have a parent link, child lists hold {nchild}")
    if r.h.ring_count > n or r.h.ring_head >= n:
        raise RegistryError(f"evicted ring: count {r.h.ring_count}, head {r.h.ring_head}, "
                            f"capacity {n}")
    _check_adaptive(r)
    _check_ghost(r)
    return 0


cdef int _check_adaptive(BlockRegistry r) except -1:
    # ADAPTIVE's header (the level in range and its credit, the sweep cursor, the tuner's shape,
    # decay, candidate and epoch count), then each mini cache (_check_mini).
    cdef RegistryHeader *h = r.h
    cdef int64_t n = h.num_blocks, m = h.shadow_m, k
    if h.policy != POLICY_ADAPTIVE_ID:
        return 0
    if h.adapt_level < -1 or h.adapt_level > LEVEL_MAX or h.adapt_credit != credit_of(n, h.adapt_level):
        raise RegistryError(f"adaptive: level {h.adapt_level} with credit {h.adapt_credit}, expected "
                            f"-1..{LEVEL_MAX} with credit {credit_of(n, h.adapt_level)}")
    if not 0 <= h.adapt_sweep < n or not 0 <= h.adapt_stale <= n:
        raise RegistryError(f"adaptive: sweep at block {h.adapt_sweep} with {h.adapt_stale} keys to "
                            f"refresh, for {n} blocks")
    if h.shadow_rate != shadow_rate(n) or m != n // h.shadow_rate or h.shadow_cap != shadow_capacity(m) \
            or not 0 < 64 - h.shadow_shift < 62 or (<int64_t>1 << (64 - h.shadow_shift)) != h.shadow_cap:
        raise RegistryError(f"adaptive tuner: rate {h.shadow_rate}, {m} blocks per mini cache, "
                            f"{h.shadow_cap} index slots (shift {h.shadow_shift}) for {n} blocks")
    if not 0 <= h.shadow_decay <= 65536 or h.shadow_current != shadow_candidate(h.adapt_level) \
            or h.shadow_next != (h.shadow_epochs + 1) * shadow_epoch(m) \
            or r.sv.mini[0].evictions >= h.shadow_next or h.shadow_tick % 2 != 0:
        raise RegistryError(f"adaptive tuner: decay {h.shadow_decay}, candidate {h.shadow_current} for level "
                            f"{h.adapt_level}, epoch {h.shadow_epochs} ending at {h.shadow_next} evictions "
                            f"(mini 0 at {r.sv.mini[0].evictions}), clock {h.shadow_tick}")
    for k in range(SHADOW_K):
        _check_mini(r, k)
    return 0


cdef int _check_mini(BlockRegistry r, int64_t k) except -1:
    # Mini cache k: its credit, its heap over slots 0..size-1 (order, positions, keys), and its
    # index holding exactly those slots and its live ring positions, each reachable from home.
    cdef RegistryHeader *h = r.h
    cdef ShadowView *v = &r.sv
    cdef ShadowMini *mini = &v.mini[k]
    cdef int64_t m = h.shadow_m, base = k * m, ib = k * h.shadow_cap, mask = h.shadow_cap - 1
    cdef int64_t i, s, live = 0, used = 0
    cdef HeapEntry *heap = v.heap + base
    if mini.credit != credit_of(m, shadow_level(k)) or not 0 <= mini.size <= m \
            or not 0 <= mini.head < m or mini.last_hits > mini.hits or not 0 <= mini.score <= SCORE_MAX:
        raise RegistryError(f"mini cache {k}: credit {mini.credit}, size {mini.size} of {m}, ring head "
                            f"{mini.head}, hits {mini.hits} (last epoch {mini.last_hits}), score {mini.score}")
    for i in range(mini.size):
        s = heap[i].block
        if not 0 <= s < mini.size or v.pos[base + s] != i:
            raise RegistryError(f"mini cache {k}: heap slot {i} holds slot {s} with position "
                                f"{v.pos[base + s] if 0 <= s < m else None}")
        if i > 0 and heap_less(&heap[i], &heap[(i - 1) >> 2]):
            raise RegistryError(f"mini cache {k}: heap order broken at {i}")
        if heap[i].key1 != mini_key(heap[i].key2, mini.credit, v.count[base + s], heap[i].key1 >> 63) \
                or heap[i].key2 > h.shadow_tick or v.count[base + s] == 0:
            raise RegistryError(f"mini cache {k}: slot {s} keyed ({heap[i].key1}, {heap[i].key2}) "
                                f"with use count {v.count[base + s]}")
        if v.ivals[ib + probe_pos(v.ikeys + ib, v.ivals + ib, h.shadow_shift, mask, v.hash[base + s])] != s:
            raise RegistryError(f"mini cache {k}: slot {s}'s hash {v.hash[base + s]} is not indexed to it")
    for i in range(m):
        if v.ring_count[base + i] != 0:
            live += 1
            if v.ivals[ib + probe_pos(v.ikeys + ib, v.ivals + ib, h.shadow_shift, mask,
                                      v.ring_hash[base + i])] != -2 - i:
                raise RegistryError(f"mini cache {k}: ring position {i} is not indexed to it")
    for i in range(h.shadow_cap):
        if v.ivals[ib + i] != -1:
            used += 1
    if used != mini.size + live:
        raise RegistryError(f"mini cache {k}: index holds {used} entries, {mini.size} blocks and "
                            f"{live} ring entries live")
    return 0


cdef int _check_ghost(BlockRegistry r) except -1:
    # FIFO list, unused stack and index agree (_check_table counted the index's ghosts).
    cdef int64_t g = r.h.ghost_blocks, i, j, cnt = 0, nfree = 0, once = 0
    cdef bid_t s, prev = <bid_t>g
    if g == 0:
        return 0
    if r.h.ghost_size < 0 or r.h.ghost_size > g:
        raise RegistryError(f"ghost table holds {r.h.ghost_size} entries, capacity {g}")
    s = r.ghost[g].next
    while s != g:
        if s < 0 or s > g or cnt > g or r.ghost[s].prev != prev:
            raise RegistryError(f"ghost FIFO broken after {cnt} entries (slot {s})")
        if r.ghost[s].count == 0:
            raise RegistryError(f"ghost slot {s} (hash {r.ghost[s].hash}) has count 0")
        i = r._index_pos(r.ghost[s].hash)
        if i < 0 or r.ivals[i] != -2 - s:
            raise RegistryError(f"ghost slot {s} (hash {r.ghost[s].hash}) is not indexed")
        once += r.ghost[s].count < 2
        prev = s
        s = r.ghost[s].next
        cnt += 1
    if cnt != r.h.ghost_size or r.ghost[g].prev != prev:
        raise RegistryError(f"ghost FIFO walk found {cnt} entries, ghost_size {r.h.ghost_size}")
    if once != r.h.ghost_once:
        raise RegistryError(f"ghost FIFO holds {once} entries of count 1, ghost_once {r.h.ghost_once}")
    j = r.h.ghost_free
    while j >= 0:
        if j >= g or nfree > g or r.ghost[j].prev != -1 or r.ghost[j].count != 0:
            raise RegistryError(f"ghost unused stack broken at slot {j}")
        j = r.ghost[j].next
        nfree += 1
    if nfree + cnt != g:
        raise RegistryError(f"ghost: {cnt} live + {nfree} unused slots != {g}")
    return 0
