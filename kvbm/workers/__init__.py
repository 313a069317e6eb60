"""Worker side of kvbm; runs in the kvbm-workers processes (the supervisor and one process per
transfer path), never in the engine's.

  supervisor   kvbm-workers itself: owns the G2 segment, starts/restarts path workers, control socket
  path_worker  one process per path (D2H, H2D): receives xfer requests, runs copies, reports done
  disk_worker  the disk worker: one process serving H2DISK and DISK2H over the instance's DiskStore
  copy         the engine's registered memory as this process maps it, and the Copier over it
  disk/        the disk tier (G3): files, journal, NIXL I/O and DiskStore

Builds on kvbm.wire; never imports the engine side (kvbm.transfer, registry, pools).
"""
