"""Engine side of the transfer pipeline: wire protocol, ZeroMQ channels, TransferManager (queues,
batching, backpressure, futures) and Scheduler (gates, layer progress). Never imports kvbm.workers."""
