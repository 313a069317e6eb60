#!/usr/bin/env bash
# The README's test command: sets up the environment, lints (ruff, configured in pyproject.toml),
# runs the whole suite on the release build, then the registry tests again on the debug build
# (invariant checks compiled in).
# GPU tests are skipped without CUDA; stress tests run bounded. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
KVBM_DEBUG=1 ./scripts/setup_env.sh
.venv/bin/python -m pytest -q tests/unit -k "registry" "$@"
./scripts/setup_env.sh   # leave the release build in place
