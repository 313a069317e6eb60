"""The README's main job (`python -m kvbm.demo`), small, in CPU mode: the whole pipeline verifies
every block byte for byte, onboards from G2 and from G3 (a disk tier under its temp dir), drains its
hinted waiting queue and shuts down, leaving nothing behind."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest


@pytest.mark.parametrize("queue, waiting", [(0, 0), (6, 6)])
def test_demo_runs_the_pipeline_end_to_end(queue, waiting):
    out, left = _run_demo(["--requests", "48", "--queue", str(queue)], timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    verified = re.search(r"verified (\d+) blocks byte for byte, (\d+) mismatches", text)
    assert verified and int(verified.group(1)) > 0 and verified.group(2) == "0", text
    onboarded = re.search(r"(\d+) onboarded from G2, (\d+) onboarded from G3", text)
    assert onboarded and int(onboarded.group(1)) > 0 and int(onboarded.group(2)) > 0, text
    g3 = re.search(r"G3 holds (\d+) of 4096 blocks on disk: (\d+) G2 victims written .* (\d+) checksum failures", text)
    assert g3 and int(g3.group(1)) > 0 and int(g3.group(2)) > 0 and g3.group(3) == "0", text
    assert "read path staged; GDS unavailable: CPU mode" in text
    # kv.num_waiting while a request is served: the queue behind it, capped by the requests left
    hinted = re.search(r"queue hint: up to (\d+) requests waited \(hinted\) while one was served; (\d+) block", text)
    assert hinted and int(hinted.group(1)) == waiting, text
    assert (int(hinted.group(2)) > 0) == (queue > 0), text
    assert "everything shut down" in text
    assert not left, f"the demo left {left} behind in its temp dir"


def test_demo_refuses_bad_arguments():
    for bad in (["--queue", "-1"], ["--requests", "0"], ["--disk-blocks", "-1"], ["--engines", "0"]):
        out = subprocess.run([sys.executable, "-m", "kvbm.demo", "--cpu", *bad], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and "must be >= " in out.stderr, out.stderr


def test_demo_with_two_engines_shares_one_g2():
    """--engines 2: two engine processes against one kvbm-workers, its shared G2 registry and its
    shared G3 slot table; each onboards blocks the other offloaded (cross-engine hits), every block
    verified."""
    out, left = _run_demo(["--engines", "2", "--requests", "32"], timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    engines = re.findall(r"engine (\d): 32 requests, \d+ blocks: .* onboarded from G2 and \d+ from G3 \((\d+) of "
                         r"them offloaded by another engine\)", text)
    assert [e for e, _ in engines] == ["0", "1"], text
    cross = re.search(r"(\d+) cross-engine hits", text)
    assert cross and int(cross.group(1)) == sum(int(c) for _, c in engines) > 0, text
    assert re.search(r"shared G2 namespace 0: 2 engines, quota 256 blocks", text), text
    assert re.search(r"shared G3 slot table: 2 engines, \d+ of 4096 slots hold blocks", text), text
    verified = re.search(r"verified (\d+) blocks byte for byte, (\d+) mismatches", text)
    assert verified and int(verified.group(1)) > 0 and verified.group(2) == "0", text
    assert not left, f"the demo left {left} behind in its temp dir"


def _run_demo(args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The demo in CPU mode with `args`, and what it left in its temp dir: a short one of its own
    (unix socket paths are limited to 107 bytes; pytest's tmp_path is too deep), which must be
    empty again afterwards."""
    tmp = tempfile.mkdtemp(prefix="kvd-")
    try:
        out = subprocess.run([sys.executable, "-m", "kvbm.demo", "--cpu", *args], capture_output=True, text=True,
                             timeout=timeout, env={**os.environ, "TMPDIR": tmp})
        return out, os.listdir(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
