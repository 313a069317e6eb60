"""Start-up and operator messages: progress while G2 is allocated and pre-faulted (log lines, or a
bar on a terminal), a pre-fault time that does not include `import torch`, and a log level that
reaches the workers an engine starts. Each test failed on the code before its fix.

Clocks are faked where a duration is checked (no timing thresholds); processes are real."""
from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import uuid

from kvbm.progress import Progress

GB = 1_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_logs_one_line_per_period_and_nothing_for_a_short_step(caplog):
    log = logging.getLogger("kvbm.test.progress")
    caplog.set_level(logging.INFO, logger=log.name)
    clock = FakeClock()
    quick = Progress("allocating G2 (4.00 GB)", 4 * GB, log, stream=io.StringIO(), clock=clock)
    quick.update(4 * GB)          # done within its first period: silent
    quick.finish()
    assert caplog.records == []
    slow = Progress("pre-faulting G2 (4.00 GB)", 4 * GB, log, period_s=2.0, stream=io.StringIO(), clock=clock)
    for t, done in ((0.5, 0), (2.0, 1 * GB), (3.0, 2 * GB), (4.0, 3 * GB), (5.0, 4 * GB)):
        clock.t = 100.0 + t
        slow.update(done)
    slow.finish()
    assert [r.getMessage() for r in caplog.records] == [
        "pre-faulting G2 (4.00 GB): 25% (1.00 of 4.00 GB) after 2.0 s",
        "pre-faulting G2 (4.00 GB): 75% (3.00 of 4.00 GB) after 4.0 s"]


def test_progress_draws_a_bar_on_a_terminal_and_clears_it(caplog):
    log = logging.getLogger("kvbm.test.progress")
    caplog.set_level(logging.INFO, logger=log.name)
    clock, term = FakeClock(), Terminal()
    bar = Progress("pre-faulting G2 (4.00 GB)", 4 * GB, log, period_s=2.0, stream=term, clock=clock)
    clock.t += 2.0
    bar.update(2 * GB)
    drawn = term.getvalue()
    assert drawn == "\rpre-faulting G2 (4.00 GB) [" + "#" * 15 + "." * 15 + "]  50% 2.00/4.00 GB 2 s"
    bar.finish()
    assert term.getvalue() == drawn + "\r" + " " * len(drawn) + "\r"
    assert caplog.records == []   # the bar replaces the log lines


def _workers_script(patch: str) -> str:
    return f"import sys\n{patch}\nfrom kvbm.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _run_workers(tmp_path, patch: str, *extra: str) -> subprocess.CompletedProcess:
    inst = f"m{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-c", _workers_script(patch), "--instance-id", inst, "--runtime-dir", str(tmp_path),
           "--force-cpu", "--duration", "0.3", "--interval", "0", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not os.path.exists(tmp_path / f"kvbm-{inst}")
    return out


def test_start_up_reports_progress_through_logging(tmp_path):
    # A period of 0 makes every step long enough to report (no multi-GB pool needed).
    out = _run_workers(tmp_path, "import kvbm.progress; kvbm.progress.PERIOD_S = 0.0", "--host-size", "3MiB")
    assert re.search(r"INFO kvbm.workers.supervisor: allocating G2 \(0.00 GB\): 100% \(0.00 of 0.00 GB\)",
                     out.stderr), out.stderr
    assert re.search(r"INFO kvbm.workers.supervisor: pre-faulting G2 \(0.00 GB\): 100%", out.stderr), out.stderr
    assert "G2 host pool 0.003 GB" in out.stderr and out.stdout == ""   # stdout: program results only


_SLOW_TORCH = """
import importlib.abc, time
clock = [0.0]
time.perf_counter = lambda: clock[0]        # moves only when torch is imported

class SlowTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            clock[0] += 100.0                    # a cold `import torch` taking 100 s
        return None

sys.meta_path.insert(0, SlowTorch())
"""


def test_prefault_time_does_not_include_importing_torch(tmp_path):
    out = _run_workers(tmp_path, _SLOW_TORCH, "--host-size", "1MiB")
    found = re.search(r"pre-faulted in ([0-9.]+) s", out.stderr)
    assert found, out.stderr
    assert float(found.group(1)) < 100.0, found.group(0)    # the old report: "pre-faulted in 100.000 s"


_ENGINE = r"""
import sys, kvbm
from kvbm.layout import BlockLayout, LayoutConfig, LayoutType
lc = LayoutConfig(2, 2, 16, 64)
kv = kvbm.KvBlockManager(runtime_dir=sys.argv[1], layout=lc, device_blocks=64, host_blocks=64, force_cpu=True)
lay = BlockLayout(lc, LayoutType.LAYER_SEPARATE, 64)
kv.register_device_tensors(kv.create_device_tensors(lay, device="cpu"), lay)
assert kv.offload([1], [7]).result(30).value.moved == 1
kv.close()
print("ok", flush=True)
"""


def _engine(tmp_path, level: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KVBM_LOG_LEVEL": level}
    out = subprocess.run([sys.executable, "-c", _ENGINE, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0 and out.stdout == "ok\n", out.stdout + out.stderr
    return out


def test_log_level_setting_reaches_the_workers_an_engine_starts(tmp_path):
    info = _engine(tmp_path, "info").stderr     # any case, like --log-level
    assert re.search(r"d2h\[\d+\] gen1 INFO .*engine eng-\S+ registered", info), info
    assert re.search(r"h2d\[\d+\] gen1 INFO .*engine eng-\S+ registered", info), info
    assert re.search(r"kvbm-workers INFO kvbm.cli: instance \S+ serving", info), info
    quiet = _engine(tmp_path, "ERROR").stderr
    assert " INFO " not in quiet and " WARNING " not in quiet, quiet
