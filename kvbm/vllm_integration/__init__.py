"""Drop-in for users of NVIDIA Dynamo's KVBM (being sunset): the module path its vLLM users load."""
