"""Diagnostic (not a benchmark): engine-side timeline of one pipeline point, to see where the path
worker sits idle. Patches the engine's TransferManager (this process only) to record every wire
request sent (time, blocks) and every DONE received (time, the worker's queue_us and copy_us).
Worker intervals are rebuilt in the engine's clock (CLOCK_MONOTONIC is system-wide):
t_end ~ DONE receipt, t_start = t_end - copy_us, t_recv = t_start - queue_us.
Usage, from the repository root (kvbm installed, or `.` on PYTHONPATH for this checkout's):
  python3 tools/diag_timeline.py BATCH off|on [ROUNDS]
  PYTHONPATH=tools/diagsite:.    the workers put their own clock (t_abs) in every DONE, so worker
                                 intervals are exact instead of estimated from the DONE's receipt
  DIAG_MIB=4096                  data per round (default 4096, the GPU benchmark's --total-mib)
  DIAG_SWITCH=0.0005             sys.setswitchinterval for this process (diagnostic only)
Used for bench/RESULTS.md "Pipeline on the GPU, rerun after the review fixes".
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import kvbm
from kvbm.layout import BlockLayout, LayoutConfig, LayoutType
from kvbm.transfer import manager as M
from kvbm.wire import protocol as P

LOG: list = []
_make_xfer = P.make_xfer


def make_xfer(rid, engine, gen, path, src, dst, *a, **k):
    LOG.append(("send", time.monotonic(), rid, len(src)))
    return _make_xfer(rid, engine, gen, path, src, dst, *a, **k)


M.P.make_xfer = make_xfer
_on_done = M.TransferManager._on_done


def on_done(self, state, msg):
    LOG.append(("done", time.monotonic(), msg["id"], msg.get("queue_us", 0), msg.get("copy_us", 0), msg.get("t_abs")))
    _on_done(self, state, msg)
    LOG.append(("done_end", time.monotonic(), msg["id"]))


M.TransferManager._on_done = on_done
_take_incoming = M.TransferManager._take_incoming


def take_incoming(self):
    LOG.append(("take", time.monotonic()))
    _take_incoming(self)


M.TransferManager._take_incoming = take_incoming
if os.environ.get("DIAG_SWITCH"):
    sys.setswitchinterval(float(os.environ["DIAG_SWITCH"]))  # diagnostic only: is the start delay GIL hand-offs?


def analyse(t0: float, t1: float) -> None:
    sends = {e[2]: e for e in LOG if e[0] == "send" and t0 <= e[1] <= t1}
    dones = [e for e in LOG if e[0] == "done" and e[2] in sends]
    ends = {e[2]: e[1] for e in LOG if e[0] == "done_end"}
    sizes = [s[3] for s in sends.values()]
    print(f"  {len(sends)} wire requests, blocks: min {min(sizes)} median {statistics.median(sizes)} max {max(sizes)}")
    takes = sorted(e[1] for e in LOG if e[0] == "take" and e[1] >= t0)
    print(f"  switch interval {sys.getswitchinterval() * 1e3:.1f} ms; I/O thread took submissions "
          f"{len(takes)} times, first at +{(takes[0] - t0) * 1e3:.2f} ms" if takes else "  no takes")
    st = sorted((s[1], s[3]) for s in sends.values())
    print("  first sends (ms after the first submit, blocks): "
          + ", ".join(f"+{(t - t0) * 1e3:.2f}/{n}" for t, n in st[:6]))
    iv = []
    lag = [d[1] - d[5] for d in dones if d[5]]
    if lag:
        print(f"  worker DONE -> engine _on_done: median {statistics.median(lag) * 1e6:.0f} us, "
              f"max {max(lag) * 1e6:.0f} us (worker clock: t_abs)")
    for d in dones:
        t_end = d[5] or d[1]
        t_start = t_end - d[4] / 1e6
        t_recv = t_start - d[3] / 1e6
        iv.append((t_start, t_end, t_recv, d[2]))
    recv_lat = sorted((t_recv - sends[rid][1], t_recv - t0) for _, _, t_recv, rid in iv if rid in sends)
    print("  engine send -> worker recv (us, at +ms): "
          + ", ".join(f"{a * 1e6:.0f}@+{b * 1e3:.1f}" for a, b in recv_lat[-4:])
          + f"; median {statistics.median(a for a, _ in recv_lat) * 1e6:.0f} us")
    first_recv = min(t_recv for _, _, t_recv, _ in iv)
    print(f"  first request received by the worker at +{(first_recv - t0) * 1e3:.2f} ms")
    iv.sort()
    busy, cur_s, cur_e = 0.0, None, None
    gaps = []
    for s, e, _, _ in iv:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
                gaps.append((cur_e, s))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    total = t1 - t0
    first = min(s for s, _, _, _ in iv)
    print(f"  round {total * 1e3:.1f} ms; first launch at +{(first - t0) * 1e3:.2f} ms; last DONE at "
          f"+{(max(e for _, e, _, _ in iv) - t0) * 1e3:.1f} ms; worker busy {busy * 1e3:.1f} ms; "
          f"{len(gaps)} idle gaps, {sum(b - a for a, b in gaps) * 1e3:.1f} ms")
    q = [d[3] for d in dones]
    c = [d[4] for d in dones]
    print(f"  worker queue_us median {statistics.median(q):.0f} max {max(q)}; copy_us (launch -> noticed) median "
          f"{statistics.median(c):.0f} max {max(c)}")
    handle = [ends[d[2]] - d[1] for d in dones if d[2] in ends]
    print(f"  engine _on_done (settle, finalize, resolve) median {statistics.median(handle) * 1e6:.0f} us, "
          f"max {max(handle) * 1e6:.0f} us, sum {sum(handle) * 1e3:.1f} ms")
    # For each idle gap: what the engine did around it (last DONE received before it, next send)
    done_times = sorted(d[1] for d in dones)
    shown = 0
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:6]:
        last_done = max([t for t in done_times if t <= a + 0.003] or [t0])
        nxt = min(((abs(st - b), (rv, rid)) for st, _, rv, rid in iv), key=lambda x: x[0])[1]
        sent = sends[nxt[1]][1] if nxt[1] in sends else t1
        print(f"    gap +{(a - t0) * 1e3:7.2f} ms .. +{(b - t0) * 1e3:7.2f} ms ({(b - a) * 1e6:6.0f} us): "
              f"engine saw the DONE "
              f"at +{(last_done - t0) * 1e3:7.2f}, sent the next request at +{(sent - t0) * 1e3:7.2f}, worker got it "
              f"+{(nxt[0] - t0) * 1e3:7.2f}")
        shown += 1


def main() -> None:
    b = int(sys.argv[1])
    offload = sys.argv[2] == "off"
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    lc = LayoutConfig(num_layers=16, outer_dim=2, page_size=16, inner_dim=512, dtype="bfloat16")
    nb = (int(os.environ.get("DIAG_MIB", "4096")) << 20) // lc.block_bytes
    cuda = kvbm.cuda_available()
    with tempfile.TemporaryDirectory() as rd:
        cfg = kvbm.KvbmConfig(layout=lc, device_blocks=nb, host_blocks=nb, runtime_dir=rd, force_cpu=not cuda,
                              max_batch_blocks=256, max_inflight_bytes=2 * nb * lc.block_bytes)
        with kvbm.KvBlockManager(cfg) as kv:
            dl = BlockLayout(lc, LayoutType.LAYER_SEPARATE, nb)
            t = kv.create_device_tensors(dl, device="cuda" if cuda else "cpu")
            for x in t:
                x.fill_(7)
            kv.register_device_tensors(t, dl)
            rng = np.random.default_rng(1)
            for rep in range(rounds + 1):
                dev = rng.permutation(nb)
                hashes = rng.integers(1, 2**63, size=nb, dtype=np.int64).astype(np.uint64)
                if not offload:
                    kv.offload(dev, hashes).result(120)
                gc.collect()
                LOG.clear()
                t0 = time.monotonic()
                if offload:
                    fs = [kv.offload(dev[i:i + b], hashes[i:i + b]) for i in range(0, nb, b)]
                else:
                    fs = [kv.onboard(hashes[i:i + b], dev[i:i + b], layers=False) for i in range(0, nb, b)]
                t_sub = time.monotonic()
                for f in fs:
                    f.result(120)
                t1 = time.monotonic()
                print(f"{'offload' if offload else 'onboard'} batch {b} round {rep}: "
                      f"{nb * lc.block_bytes / (t1 - t0) / 1e9:.2f} GB/s, "
                      f"submitted at +{(t_sub - t0) * 1e3:.1f} ms")
                if rep:
                    analyse(t0, t1)


if __name__ == "__main__":
    main()
