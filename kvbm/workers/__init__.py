"""Worker side of kvbm: the supervisor (kvbm-workers), path worker processes and their copy handlers.
Imports the protocol, never the engine side (registry, pools, TransferManager)."""
