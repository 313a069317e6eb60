"""Eviction research for kvbm's prefix KV cache: simulators, candidate policies, bounds and the
trace replay behind the LINEAGE policy and the queue hint. See README.md in this folder.

Modules, bottom up:
  policy_sim       request semantics, round-1 policies, tiers, synthetic traces, the validation suite
  policy_research  round 2: window-TinyLFU, sketch and ghost-table lineage, the queue-hint bound
  policy_bounds    round 3: clairvoyant windows and in-sample hazard tables (what features can reach)
  trace_replay     replays a trace on the simulator or on kvbm's own registry (BlockRegistry, pools)
"""
