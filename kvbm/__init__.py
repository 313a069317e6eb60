"""kvbm: a tiered KV-cache block manager (G1 GPU, G2 pinned host, G3 disk).

Public API. Heavy modules (torch, zmq) are imported only when the names that need them are used.
"""
from __future__ import annotations

from kvbm.errors import (
    BackpressureError,
    ConfigError,
    CudaError,
    KvbmError,
    KvbmTimeoutError,
    LayoutError,
    LifecycleError,
    PermissionRefusedError,
    ProtocolError,
    RegistryError,
    TransferError,
)

__version__ = "0.1.0"

_LAZY = {
    "KvbmConfig": "kvbm.config",
    "LayoutConfig": "kvbm.layout",
    "LayoutType": "kvbm.layout",
    "BlockLayout": "kvbm.layout",
    "KvBlockManager": "kvbm.manager",
    "hash_token_blocks": "kvbm.hashing",
    "salted_seed": "kvbm.hashing",
}


def cuda_available() -> bool:
    """True when this build has CUDA and a device answers. Never raises."""
    try:
        from kvbm._fast import native
        return native.cuda_available()
    except Exception:  # noqa: BLE001 - documented: any failure means "no CUDA"
        return False


def build_kind() -> str:
    """'cuda' or 'cpu': which native library this install was built with."""
    from kvbm._fast import native
    return native.build_kind()


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvbm' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(module), name)


__all__ = [
    "BackpressureError", "BlockLayout", "ConfigError", "CudaError", "KvBlockManager", "KvbmConfig",
    "KvbmError", "KvbmTimeoutError", "LayoutConfig", "LayoutError", "LayoutType", "LifecycleError",
    "PermissionRefusedError", "ProtocolError", "RegistryError", "TransferError", "build_kind",
    "cuda_available", "hash_token_blocks", "salted_seed",
]
