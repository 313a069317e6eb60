#!/usr/bin/env bash
# Creates .venv (if missing), installs the pinned requirements and builds kvbm in place.
# KVBM_DEBUG=1 builds the registry with its invariant checks compiled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi
tag=release; [ "${KVBM_DEBUG:-0}" != "0" ] && tag=debug
.venv/bin/python setup.py -q build_ext --inplace --build-temp "build/$tag" 2>&1 | grep -E "^kvbm build: native|error" || true
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >/dev/null
