"""kvbm's vLLM V1 connector: `--kv-transfer-config '{"kv_connector":"KvbmConnector",
"kv_connector_module_path":"kvbm.integrations.vllm","kv_role":"kv_both"}'` (see connector.py).

The connector's two sides (scheduler_side, worker_side, plan) need no vLLM; `KvbmConnector` and its
metadata classes import vLLM when first asked for (PEP 562), so the sides are usable and testable
where vLLM is not installed."""
from __future__ import annotations

_CONNECTOR_NAMES = ("KvbmConnector", "KvbmConnectorMetadata", "KvbmWorkerMetadata")
__all__ = list(_CONNECTOR_NAMES)


def __getattr__(name: str):
    if name in _CONNECTOR_NAMES:
        from kvbm.integrations.vllm import connector
        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
