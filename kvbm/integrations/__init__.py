"""Engine integrations: the top layer, next to cli and demo. Runs inside the engine's processes
(vLLM's scheduler and workers); nothing below imports it.

Parts:
  events   KV events (BlockStored, BlockRemoved, AllBlocksCleared) in vLLM's msgpack shape, their
           ZeroMQ publisher (vLLM's frames and replay socket), and the pool-activity recorder
  vllm/    the vLLM V1 connector (scheduler side, worker side)
"""
