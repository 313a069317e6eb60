#!/usr/bin/env bash
# Packaging smoke test: what `pip install kvbm-*.tar.gz` gives a user, checked in a clean venv.
#
# Order: copy the checkout as it is (build products included, so MANIFEST.in's excludes are
# exercised; .git, .venv and other top-level dot folders left out) to a temp folder -> create a venv
# there -> `python -m build` makes the sdist from the copy, then the wheel from that sdist (the CPU
# build, KVBM_NO_CUDA=1), each in an isolated env holding pyproject's build requirements, so a
# missing file or requirement fails here -> check the sdist's file list -> install the wheel into
# the venv -> from outside the checkout: import kvbm, a registry round trip, `kvbm-workers --help`,
# py.typed and both licence files installed. The temp folder goes at exit; no .venv is touched.
#
# The wheel goes in with --no-deps plus numpy only: `import kvbm`, the registry and the CLI's --help
# need nothing else (torch, pyzmq, ... are imported by the transfer paths), and the checks below
# fail if that changes. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD_FRONTEND="build==1.6.1"
unset PYTHONPATH   # the checks must see the installed wheel, never a checkout
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kvbm-package-smoke.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
SECONDS=0
step() { echo "package_smoke [${SECONDS}s]: $*"; }
fail() { echo "package_smoke [${SECONDS}s]: FAILED: $*" >&2; exit 1; }

step "copy the checkout to $tmp/src"
mkdir "$tmp/src"
tar -c --exclude='./.*' . | tar -x -C "$tmp/src"

step "venv ($("$PY" --version)) + $BUILD_FRONTEND"
"$PY" -m venv "$tmp/venv"
V=$tmp/venv/bin
"$V/pip" install -q --disable-pip-version-check "$BUILD_FRONTEND"

step "python -m build: sdist, then the wheel from it (KVBM_NO_CUDA=1, isolated build envs)"
if ! KVBM_NO_CUDA=1 "$V/python" -m build --outdir "$tmp/dist" "$tmp/src" >"$tmp/build.log" 2>&1; then
    tail -n 40 "$tmp/build.log"
    fail "python -m build (log tail above)"
fi
grep -E "^kvbm build: native library" "$tmp/build.log" || fail "no 'native library' line in the build log"
sdist=$(echo "$tmp"/dist/kvbm-*.tar.gz)
wheel=$(echo "$tmp"/dist/kvbm-*.whl)
[ -f "$sdist" ] && [ -f "$wheel" ] || fail "expected one sdist and one wheel in $tmp/dist: $(ls "$tmp/dist")"
echo "  $(basename "$sdist") $(du -k "$sdist" | cut -f1) KiB, $(basename "$wheel") $(du -k "$wheel" | cut -f1) KiB"

step "sdist file list"
tar tzf "$sdist" | sed 's|^[^/]*/||' | sort >"$tmp/sdist.txt"
for f in LICENSE README.md pyproject.toml setup.py MANIFEST.in requirements.txt \
         csrc/include/kvbm.h csrc/third_party/xxhash/xxhash.h csrc/third_party/xxhash/LICENSE \
         kvbm/py.typed kvbm/_fast/registry.pyx kvbm/_fast/registry.pxd kvbm/_fast/native.pyx \
         kvbm/_fast/kvbm_h.pxd; do
    grep -qxF "$f" "$tmp/sdist.txt" || fail "sdist lacks $f"
done
for f in $(cd "$tmp/src" && find csrc -type f); do
    grep -qxF "$f" "$tmp/sdist.txt" || fail "sdist lacks $f"
done
if grep -E '\.(so|o|a)$|^kvbm/_fast/.*\.(c|cpp)$|_build_info\.py$|^build/' "$tmp/sdist.txt"; then
    fail "sdist holds the build products above"
fi
echo "  $(wc -l <"$tmp/sdist.txt") entries, csrc/ and the Cython sources in, no build products"

step "install the wheel (--no-deps) and $(grep -E '^numpy==' requirements.txt)"
"$V/pip" install -q --disable-pip-version-check --no-deps "$wheel" "$(grep -E '^numpy==' requirements.txt)"

step "smoke: import, registry round trip, py.typed, licence files"
cd "$tmp"   # so that `import kvbm` finds the installed package, not the checkout
"$V/python" - <<'EOF'
import importlib.metadata as md
import pathlib
import sys

import numpy as np

import kvbm
from kvbm._fast.registry import BlockRegistry

pkg = pathlib.Path(kvbm.__file__).parent
assert "site-packages" in str(pkg), f"kvbm imported from {pkg}, not the installed wheel"
assert kvbm.build_kind() == "cpu", kvbm.build_kind()

reg = BlockRegistry(8)
hashes = np.arange(1, 5, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
blocks = reg.allocate(4)
reg.complete(blocks)
owned = reg.register(blocks, hashes)
assert (owned == blocks).all(), (owned, blocks)
reg.release(owned)
assert (reg.num_inactive, reg.num_active) == (4, 0), (reg.num_inactive, reg.num_active)
hit = reg.match(np.concatenate([hashes[:3], np.array([7], dtype=np.uint64)]))
assert hit.tolist() == owned[:3].tolist(), (hit, owned)
reg.release(hit)
assert (reg.num_inactive, reg.num_free) == (4, 4), (reg.num_inactive, reg.num_free)

assert (pkg / "py.typed").is_file(), "kvbm/py.typed not installed"
dist = md.distribution("kvbm")
licences = sorted(str(f) for f in dist.files if "/licenses/" in str(f))
want = ["kvbm-0.1.0.dist-info/licenses/LICENSE",
        "kvbm-0.1.0.dist-info/licenses/csrc/third_party/xxhash/LICENSE"]
assert licences == [w.replace("0.1.0", dist.version) for w in want], licences
texts = [pathlib.Path(dist.locate_file(f)).read_text() for f in licences]
assert "Apache License" in texts[0] and "xxHash" in texts[1], [t[:40] for t in texts]
heavy = sorted({"torch", "zmq"} & set(sys.modules))
assert not heavy, f"import kvbm and the registry pulled in {heavy}"
print(f"  kvbm {kvbm.__version__} ({kvbm.build_kind()}) from {pkg}: registry round trip ok, "
      f"py.typed, licences: {', '.join(licences)}")
EOF

step "smoke: kvbm-workers --help"
"$V/kvbm-workers" --help >"$tmp/help.txt" || fail "kvbm-workers --help exited $?"
grep -q -- "--instance-id" "$tmp/help.txt" || fail "kvbm-workers --help: no --instance-id in $(head -3 "$tmp/help.txt")"
head -n 1 "$tmp/help.txt" | sed 's/^/  /'

step "passed"
