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
    """A transfer completed as failed; the blocks it names were not loaded."""


class BackpressureError(KvbmError):
    """The in-flight bound is reached and the caller asked not to wait."""
