"""`kvbm.vllm_integration.connector.DynamoConnector`, the class Dynamo KVBM users name in vLLM's
--kv-transfer-config, is kvbm's connector (DYN_KVBM_* variables are read as aliases of KVBM_*)."""
from kvbm.integrations.vllm.connector import KvbmConnector

DynamoConnector = KvbmConnector

__all__ = ["DynamoConnector", "KvbmConnector"]
