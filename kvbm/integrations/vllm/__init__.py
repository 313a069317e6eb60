"""kvbm's vLLM V1 connector: `--kv-transfer-config '{"kv_connector":"KvbmConnector",
"kv_connector_module_path":"kvbm.integrations.vllm","kv_role":"kv_both"}'` (see connector.py).

Importing this package imports vLLM; the rest of kvbm never does."""
from kvbm.integrations.vllm.connector import KvbmConnector, KvbmConnectorMetadata, KvbmWorkerMetadata

__all__ = ["KvbmConnector", "KvbmConnectorMetadata", "KvbmWorkerMetadata"]
