#!/usr/bin/env bash
# The venv of the `vllm` tests (tests/vllm): vLLM and the few packages of requirements-vllm.txt,
# kept OUTSIDE the clone so that CI builds it once per change of that file, not once per run.
#
# Where: $KVBM_VLLM_VENV, else ~/.cache/kvbm/vllm-<first 12 hex of sha256(requirements-vllm.txt)>.
# Order: lock (one setup at a time) -> reuse the venv when its ready marker matches this file's hash
#   and this python's version -> else build it in <venv>.tmp.<pid> (python -m venv, pip install -r),
#   point its scripts at the final path, write the marker last, rename it into place in one step
#   (a killed install leaves only a .tmp folder, never a venv that looks done) -> remove the default
#   location's venvs of other hashes and stale .tmp folders.
# kvbm is not installed there: tests use the checkout through PYTHONPATH, so its compiled modules
# must match this python's version (checked below when they exist).
# Logs go to stderr; the venv's python path is the last (only) line on stdout.
#
# Measured: the venv is 9.5 GB (vllm pulls the CUDA build of torch 2.14 and its nvidia-* wheels).
# A build took 179 s on this 2-core machine, where 54 of the ~190 wheels came from a local mirror
# and 138 from PyPI; issue 11 measured ~7 min for a fresh `pip install vllm==0.33.0` all from PyPI.
# A reuse takes ~0.1 s.
# PYTHON picks the base interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
req=requirements-vllm.txt
hash=$(sha256sum "$req" | cut -c1-12)
cache=$HOME/.cache/kvbm
venv=${KVBM_VLLM_VENV:-$cache/vllm-$hash}
SECONDS=0
log() { echo "setup_vllm [${SECONDS}s]: $*" >&2; }
fail() { echo "setup_vllm [${SECONDS}s]: FAILED: $*" >&2; exit 1; }

pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
# The checkout's compiled kvbm modules are imported as they are: their ABI tag must be this python's.
tag="cpython-${pyver/./}"
for so in kvbm/_fast/*.so; do
  [ -e "$so" ] || break
  case "$so" in *"$tag"*) ;; *) fail "$so was not built for python $pyver ($PY); set PYTHON to that build's python";; esac
done

want="requirements=$hash python=$pyver"
marker=.kvbm-vllm-ready
mkdir -p "$(dirname "$venv")"
# One lock for the whole default cache (the clean-up below removes other hashes' folders under it).
lock=$venv.lock; [ -z "${KVBM_VLLM_VENV:-}" ] && lock=$cache/vllm.lock
exec 9>"$lock"
flock 9   # a second setup waits here, then finds the venv ready

if [ "$(cat "$venv/$marker" 2>/dev/null)" = "$want" ] && "$venv/bin/python" -c '' 2>/dev/null; then
  log "reusing $venv ($want)"
else
  if [ -e "$venv" ]; then
    # Never delete a folder this script did not make (KVBM_VLLM_VENV may name anything).
    [ -e "$venv/$marker" ] || fail "$venv exists and is not a venv made by this script (no $marker)"
    log "stale $venv ($(cat "$venv/$marker"), want $want): rebuilding"
    rm -rf "$venv"
  fi
  tmp=$venv.tmp.$$
  rm -rf "$venv".tmp.*   # a killed build's leftovers (we hold the lock: none is in progress)
  trap 'rm -rf "$tmp"' EXIT
  log "creating $venv with $("$PY" --version 2>&1) (about 7 min and 9 GB on a fresh machine)"
  "$PY" -m venv --prompt "$(basename "$venv")" "$tmp"
  "$tmp/bin/python" -m pip install --disable-pip-version-check -r "$req" >&2 \
    || fail "pip install -r $req into $tmp"
  log "installed; pointing the venv's scripts at $venv"
  # venv writes absolute paths into bin/ (shebangs, activate); rewrite the text files among them.
  grep -rlI --fixed-strings "$tmp" "$tmp/bin" "$tmp/pyvenv.cfg" | xargs -r sed -i "s|$tmp|$venv|g"
  echo "$want" > "$tmp/$marker"
  mv -T "$tmp" "$venv"
  trap - EXIT
  log "ready: $venv, $(du -sh "$venv" | cut -f1), built in ${SECONDS}s"
fi

if [ -z "${KVBM_VLLM_VENV:-}" ]; then
  # Only our own names: vllm-<12 hex> and its .tmp.<pid>; anything else under the cache stays.
  for old in "$cache"/vllm-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]*; do
    [ -e "$old" ] || continue
    [ "$old" = "$venv" ] && continue
    case "${old#"$cache"/vllm-}" in
      ????????????|????????????.tmp.*) log "removing $old"; rm -rf "$old";;
    esac
  done
fi
echo "$venv/bin/python"
