#!/usr/bin/env bash
# The README's test command: sets up the environment, lints (ruff, configured in pyproject.toml),
# runs the whole suite on the release build, then the registry tests again on the debug build
# (invariant checks compiled in), then the `vllm` tests (tests/vllm) in vLLM's own venv, kept
# outside the clone by scripts/setup_vllm.sh (built once per change of requirements-vllm.txt:
# ~7 min and ~9 GB the first time), with the checkout's kvbm on PYTHONPATH.
# GPU tests are skipped without CUDA; stress tests run bounded. Extra args go to the main suite's
# pytest. KVBM_SKIP_VLLM=1 skips the vLLM stage (never skipped by default).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
KVBM_DEBUG=1 ./scripts/setup_env.sh
.venv/bin/python -m pytest -q tests/unit -k "registry" "$@"
./scripts/setup_env.sh   # leave the release build in place
if [ "${KVBM_SKIP_VLLM:-0}" != "0" ]; then
  echo "#####################################################################" >&2
  echo "test.sh: KVBM_SKIP_VLLM=$KVBM_SKIP_VLLM: the vLLM tests (tests/vllm) were NOT run" >&2
  echo "#####################################################################" >&2
  exit 0
fi
vllm_py=$(./scripts/setup_vllm.sh | tail -n 1)
SECONDS=0
PYTHONPATH=$PWD "$vllm_py" -m pytest -q -m vllm tests/vllm
echo "test.sh: vLLM tests passed in ${SECONDS}s"
