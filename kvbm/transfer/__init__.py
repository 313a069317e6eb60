"""Engine side of the transfer pipeline; runs in the engine's process (vLLM's scheduler process).

  manager      TransferManager: submit -> queues -> path workers -> futures (see its docstring)
  futures      TransferFuture / TransferResult, layer progress
  scheduler    Scheduler: gates that hold a transfer until the engine's iteration/layer is done
  host_offload HostTransfers: offload G1 -> G2 and onboard G2 -> G1 over the host pool's registry
  disk_offload DiskTransfers: G3 (its registry, admission, onboards that read from disk); disk_index:
               the load-or-recompute rule and other instances' blocks
  launcher     WorkersProcess (an embedded kvbm-workers), control_endpoint (find a running one),
               connect_workers (find, start or wait for one, then connect a TransferManager)
  shard_transfers
               ShardTransfers: one TP rank's raw D2H / H2D copies between its KV shard and its
               region of G2 (runs in that rank's worker process; the vLLM connector's worker side)
  memory_map   describe_memory: the engine's KV tensors as the register message names them

Builds on kvbm.wire; never imports kvbm.workers.
"""
