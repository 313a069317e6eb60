"""The README's ```python blocks run as written, each in a fresh interpreter, in CPU mode, with no
KVBM_* of the caller's (only a runtime folder under tmp_path), under a deadline; a line's
`# -> TEXT` comment is what it prints, in order."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
DEADLINE = 180.0


def test_the_readme_shows_the_api():
    assert len(BLOCKS) >= 2 and any("register_device_tensors" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(tmp_path, index):
    code = BLOCKS[index]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}
    env.update(KVBM_FORCE_CPU="1", KVBM_RUNTIME_DIR=str(tmp_path),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=DEADLINE, stdin=subprocess.DEVNULL)
    assert out.returncode == 0 and "Traceback" not in out.stderr, f"README block {index}:\n{code}\n{out.stderr}"
    expected = [line.split("# -> ", 1)[1].strip() for line in code.splitlines() if "# -> " in line]
    assert out.stdout.splitlines() == expected, f"README block {index} printed:\n{out.stdout}"
    assert not [n for n in os.listdir(tmp_path) if n.startswith("kvbm-")]   # the manager stopped what it started
