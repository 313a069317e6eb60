"""Helpers shared by several test folders, imported as `tests.support.<module>`:

  copy_helpers       KV buffers in every layout, poisoning and read-back (tests/unit, tests/gpu)
  pipeline_harness   a real kvbm-workers plus a CPU-mode engine, every process killed by pid
                     (tests/integration, tests/stress, tests/gpu)
  pipeline_fixtures  the `make_pipeline` fixture over the harness, which the conftest files of
                     tests/integration and tests/stress re-export

Kept free of hypothesis and pyzmq imports at module level: the GPU machine runs tests/gpu without them.
"""
