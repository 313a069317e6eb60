#!/usr/bin/env bash
# The README's main job: sets up the environment, then runs kvbm-workers with a small engine-like
# driver through the whole pipeline (CPU mode when there is no GPU). Extra args go to kvbm.demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
exec .venv/bin/python -m kvbm.demo "$@"
