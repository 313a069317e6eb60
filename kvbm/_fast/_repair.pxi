# Repair of a table whose mutation was cut short, included by registry.pyx (like _invariants.pxi:
# it reads every array and calls the registry's inline helpers, so it belongs to its C module).
#
# When: a process sharing the table (kvbm.shared_g2) died while it held the lock in the middle of
# a call. Any derived structure may then be half-updated: a free-list or sibling link, a heap
# entry, an index slot (a backward shift half done), a count in the header, the scratch marks.
#
# How: the per-block primary fields are taken as the truth and everything else is rebuilt from
# them, rather than keeping an undo record: the registry's loops stay as they are (no record
# written per block on the hot path), and one routine repairs a cut at any point of any call.
#   refcount     given by the caller: the sum of the live holders' pins (the dead one's dropped)
#   state        PARTIAL/COMPLETE with refcount 0 -> RESET (nobody holds it: it was the dead
#                holder's allocation). REGISTERED with hash 0 and refcount 0 -> RESET: a register
#                cut between `state = REGISTERED` and `hash = h` leaves exactly that (RESET blocks
#                carry hash 0), and serving it under hash 0 would hand out the wrong bytes; a real
#                inactive block under hash 0 is only dropped from the cache. RESET: metadata zeroed.
#   lineage      a parent link survives if it names another REGISTERED block; child lists, counts
#                and sibling links are rebuilt from the links.
#   index        every REGISTERED block under its hash (two under one hash: the unheld one is
#                dropped; a cut call never makes that, see the shared_g2 docstring)
#   ghost table  emptied: its FIFO order cannot be rebuilt (LINEAGE loses frequency credits only)
#   tuner        ADAPTIVE's mini caches emptied (a use cut short may have left one half-updated);
#                the level and the decay stay, its credit and the candidate it follows are derived
#                from the level again (a move cut short may have set one and not the other); no
#                key is left for the sweep (the heap is rebuilt at the current credit)
#   free list    RESET blocks in id order (FIFO order is lost: any order is a valid free list)
#   heap         every REGISTERED block with refcount 0, keys from the policy now
#   header       counts recomputed, tick >= every last_tick, ring cursor clamped into range
# A RESET block that a live holder pins (refcount > 0) cannot be repaired: RegistryError, with
# the numbers (no cut call makes one: only the dead holder's own blocks change state).
#
# Order: per-block fields -> index (drops duplicates) -> lineage -> free list -> heap -> header.


cdef dict _rebuild_table(BlockRegistry r, const uint32_t *rc):
    cdef int64_t n = r.h.num_blocks, g = r.h.ghost_blocks, cap = r.h.index_capacity
    cdef int64_t b, pos, o, freed = 0, dropped = 0, dups = 0, nreg = 0, nfree = 0
    cdef int64_t ghosts = r.h.ghost_size
    cdef bid_t p, s = <bid_t>n, last
    cdef uint8_t st
    cdef uint64_t maxtick = r.h.tick
    for b in range(n):
        if r.state[b] == ST_RESET and rc[b] > 0:
            raise RegistryError(f"rebuild: block {b} is RESET but holders pin it {rc[b]} times")
    # per-block fields
    for b in range(n):
        r.refcount[b] = rc[b]
        r.mark[b] = 0
        st = r.state[b]
        if st > ST_REGISTERED:
            st = ST_RESET
        elif (st == ST_PARTIAL or st == ST_COMPLETE) and rc[b] == 0:
            st = ST_RESET
            freed += 1
        elif st == ST_REGISTERED and r.hash[b] == 0 and rc[b] == 0:
            st = ST_RESET
            dropped += 1
        if st == ST_RESET:
            r._reset(b)
        r.state[b] = st
        if st != ST_REGISTERED:
            r.parent[b] = -1
        r.children[b] = 0
        r.first_child[b] = -1
        r.next_sib[b] = -1
        r.prev_sib[b] = -1
        r.heap_pos[b] = -1
        r.free_prev[b] = -1
        r.free_next[b] = -1
        if r.last_tick[b] > maxtick:
            maxtick = r.last_tick[b]
    # index (and the ghost table, emptied)
    memset(<void *>r.ikeys, 0, cap * sizeof(uint64_t))
    index_init(r.h, r.ivals, cap)
    r.h.num_registered = 0
    if g > 0:
        memset(<void *>r.ghost, 0, (g + 1) * sizeof(GhostEntry))
    r.h.ghost_size = 0
    ghost_init(r.h, r.ghost, g)
    shadow_clear(r.h, &r.sv)
    if r.h.adapt_level < -1 or r.h.adapt_level > LEVEL_MAX:
        r.h.adapt_level = ADAPTIVE_LEVEL
    r.h.adapt_credit = credit_of(n, r.h.adapt_level)
    r.h.shadow_current = shadow_candidate(r.h.adapt_level)
    for b in range(n):
        if r.state[b] != ST_REGISTERED:
            continue
        pos = r._index_pos(r.hash[b])
        if pos >= 0:
            o = r.ivals[pos]
            if rc[b] > 0 and rc[o] > 0:
                raise RegistryError(f"rebuild: blocks {o} and {b}, both held, are REGISTERED "
                                    f"under hash {r.hash[b]}")
            dups += 1
            if rc[b] == 0:
                r._reset(<bid_t>b)
                r.parent[b] = -1
                continue
            r._reset(<bid_t>o)         # the held one takes the slot
            r.parent[o] = -1
            r.ivals[pos] = <bid_t>b
            continue
        r.ikeys[-1 - pos] = r.hash[b]
        r.ivals[-1 - pos] = <bid_t>b
        r.h.num_registered += 1
    # lineage, from the surviving parent links
    for b in range(n):
        if r.state[b] != ST_REGISTERED:
            continue
        p = r.parent[b]
        if p < 0 or p >= n or p == b or r.state[p] != ST_REGISTERED:
            r.parent[b] = -1
            continue
        r.next_sib[b] = r.first_child[p]
        if r.first_child[p] >= 0:
            r.prev_sib[r.first_child[p]] = <bid_t>b
        r.first_child[p] = <bid_t>b
        r.children[p] += 1
    # free list, in id order
    last = s
    for b in range(n):
        if r.state[b] != ST_RESET:
            continue
        r.free_next[last] = <bid_t>b
        r.free_prev[b] = last
        last = <bid_t>b
        nfree += 1
    r.free_next[last] = s
    r.free_prev[s] = last
    r.h.num_free = nfree
    # heap of the inactive blocks
    memset(<void *>r.heap, 0, n * sizeof(HeapEntry))
    r.h.heap_size = 0
    r.h.num_inactive = 0
    r.h.tick = maxtick
    for b in range(n):
        if r.state[b] == ST_REGISTERED:
            nreg += 1
            if rc[b] == 0:
                r._heap_push(<bid_t>b)
                r.h.num_inactive += 1
    r.h.adapt_stale = 0                 # every key was just computed at the current credit
    if not 0 <= r.h.adapt_sweep < n:
        r.h.adapt_sweep = 0
    if r.h.ring_head < 0 or r.h.ring_head >= n:
        r.h.ring_head = 0
    if r.h.ring_count < 0 or r.h.ring_count > n:
        r.h.ring_count = 0
    return dict(freed=int(freed), dropped=int(dropped + dups), ghosts_lost=int(ghosts),
                registered=int(nreg), free=int(nfree), inactive=int(r.h.num_inactive))
