"""Typed errors. Misuse raises a KvbmError subclass whose message carries the numbers; expected
outcomes (out of capacity, a prefix miss) are return values, not errors."""
from __future__ import annotations


class KvbmError(Exception):
    """Base of every error kvbm raises on purpose."""


class ConfigError(KvbmError):
    """A configuration value is missing, malformed or out of range."""


class LayoutError(KvbmError):
    """Tensors, shapes, strides, dtypes or block indices do not match the layout."""


class RegistryError(KvbmError):
    """A registry call was given blocks or hashes in a state that does not allow it."""


class CudaError(KvbmError):
    """A CUDA runtime call failed (the message names the call), or CUDA is not available."""


class ProtocolError(KvbmError):
    """A wire message is malformed, oversized, of another version, or out of range."""


class TransferError(KvbmError):
    """A transfer completed as failed; the blocks it names were not loaded.

    `blocks_may_be_written`: a worker that was never reported dead may still be copying into the
    destination blocks (its request passed the hard deadline, or kvbm-workers stopped without
    reporting it dead); the caller must not hand those blocks out again."""

    def __init__(self, message: str, *, blocks_may_be_written: bool = False) -> None:
        super().__init__(message)
        self.blocks_may_be_written = blocks_may_be_written


class BackpressureError(KvbmError):
    """The in-flight bound is reached and the caller asked not to wait."""


class LifecycleError(KvbmError):
    """A call made in a state that does not allow it: before set-up (connect, register), after
    close, twice where once is the rule, or while another owner holds the resource."""


class KvbmTimeoutError(KvbmError, TimeoutError):
    """A peer (kvbm-workers, a path worker) did not answer within the stated time."""


class PermissionRefusedError(KvbmError, PermissionError):
    """kvbm refused a file, folder, socket or endpoint that others could reach or tamper with (wrong
    owner or mode, a symlink, a non-loopback address)."""


class DiskError(KvbmError):
    """A disk tier (G3) file, journal or I/O operation failed: the message names the file, the slots
    and the errno or NIXL status. `slots`, when given, is the call's per-block outcome (the slot
    written or read, -1 where not), so a caller keeps what did land."""

    def __init__(self, message: str, *, slots=None) -> None:
        super().__init__(message)
        self.slots = slots


class DiskSpaceError(DiskError):
    """The file system refused the disk tier's space (ENOSPC, EDQUOT, EFBIG): the message names the
    bytes asked for and, where known, the bytes free."""


class JournalMismatchError(DiskError):
    """A G3 journal was written for another store geometry, layout or model: its blocks are not this
    engine's. Starting cold (discarding them) is the caller's explicit choice."""


class EventDecodeError(ProtocolError):
    """A KV event payload (vLLM's KVEventBatch shape) is not valid msgpack or not an event batch:
    the message names the field, its position and what was found."""
