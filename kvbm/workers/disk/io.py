"""Block I/O between host memory and the disk tier's files, through NIXL's POSIX backend.

Parts, in the order a store uses them:
  load_nixl    the NIXL Python API, imported only here and only when a store opens: nixl-cu13, the
               `nixl` meta package, or nixl-cu12, whichever is installed; none raises DiskError
               saying what to install
  NixlIO       one NIXL agent (no progress thread: NIXL makes progress only while `check_xfer_state`
               polls it). The POSIX backend is created with io_uring, else Linux AIO, else POSIX
               AIO: each is tried with a probe read of the first 4 KiB of data file 0, and the one
               that ran is logged and kept in `backend`. Host memory (the G2 segment's address
               range) is registered once as DRAM, the data files as FILE (another instance's files
               when it is read)
  transfer     a batch of (host block address, slot) pairs split into requests of
               `blocks_per_request` blocks, `max_inflight` of them posted at a time, polled until
               DONE or ERR; every return code is checked. A failed request is redone block by
               block, so that only the blocks failing alone count as failed (a truncated file fails
               the slots past its end, not its neighbours in the request), and those are diagnosed
               by redoing them with os.preadv/os.pwritev, which names the errno (ENOSPC, EFBIG, EIO)
               or the short read. The result says which blocks moved; `read` and `write` raise
               DiskError (DiskSpaceError for ENOSPC, EDQUOT, EFBIG) for any that did not

  probe_gds    whether NIXL's GDS backend loads here and a 4 KiB read of a data file into device
               memory through it succeeds (the disk worker's `gds` auto|on|off)

Checksums and the journal are the store's (store.py): this module moves bytes and says which moved.
"""
from __future__ import annotations

import ctypes
import errno
import importlib
import itertools
import logging
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from kvbm.errors import DiskError, DiskSpaceError, LayoutError
from kvbm.workers.disk.files import ALIGN, DataFiles

logger = logging.getLogger(__name__)

NIXL_MODULES = ("nixl_cu13._api", "nixl._api", "nixl_cu12._api")
BACKEND_PARAMS = {  # NIXL POSIX plugin options, in the order `auto` tries them
    "uring": {"use_uring": "true"},
    "aio": {"use_aio": "true"},
    "posix_aio": {"use_posix_aio": "true"},
}
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_names = itertools.count()


def load_nixl() -> ModuleType:
    """The installed NIXL Python API module (nixl_agent, nixl_agent_config, nixlBind)."""
    missing = []
    for name in NIXL_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as err:
            missing.append(f"{name}: {err}")
    raise DiskError("the disk tier needs NIXL, which is not installed: pip install nixl-cu13==1.5.1 "
                    "(or kvbm[disk]); tried " + "; ".join(missing))


@dataclass(slots=True)
class IoResult:
    """What a transfer moved: `ok[i]` for block i of the call; the reasons of failed requests."""

    ok: np.ndarray                                 # bool per block
    errors: list[str] = field(default_factory=list)
    no_space: bool = False                         # a failure was ENOSPC, EDQUOT or EFBIG

    @property
    def all_ok(self) -> bool:
        return bool(self.ok.all())


class NixlIO:
    """One NIXL agent moving whole blocks between registered host memory and data files."""

    MAX_DIAGNOSED = 8  # failed blocks per call whose errno is looked for (and named in the errors)

    def __init__(self, name: str, files: DataFiles, host_regions: list[tuple[int, int]], backend: str = "auto",
                 blocks_per_request: int = 16, max_inflight: int = 4, poll_interval_s: float = 50e-6,
                 read_blocks_per_request: int | None = None, read_inflight: int | None = None) -> None:
        read_blocks_per_request = blocks_per_request if read_blocks_per_request is None else read_blocks_per_request
        read_inflight = max_inflight if read_inflight is None else read_inflight
        if min(blocks_per_request, max_inflight, read_blocks_per_request, read_inflight) < 1:
            raise DiskError(f"blocks_per_request {blocks_per_request}, max_inflight {max_inflight}, read_blocks_per_"
                            f"request {read_blocks_per_request}, read_inflight {read_inflight}: each >= 1")
        self.api = load_nixl()
        self._errors = tuple(getattr(self.api.nixlBind, n) for n in dir(self.api.nixlBind)
                             if n.startswith("nixl") and n.endswith("Error"))
        self.files = files
        self.block_bytes = files.geometry.block_bytes
        self.blocks_per_request = blocks_per_request
        self.max_inflight = max_inflight
        self.read_blocks_per_request = read_blocks_per_request   # reads (DISK2H) are sized apart from writes
        self.read_inflight = read_inflight
        self.poll_interval_s = poll_interval_s
        self.regions: list[tuple[int, int]] = []
        self._file_regs: dict[int, object] = {}
        self._host_regs: list[object] = []
        self.agent, self.backend = self._create_agent(name, backend)
        self.register_files(files)
        for base, nbytes in host_regions:
            self.register_host(base, nbytes)

    # -- set-up ---------------------------------------------------------------------------------

    def _create_agent(self, name: str, backend: str):
        choices = list(BACKEND_PARAMS) if backend == "auto" else [backend]
        if any(c not in BACKEND_PARAMS for c in choices):
            raise DiskError(f"NIXL POSIX mode {backend!r}: expected auto or one of {sorted(BACKEND_PARAMS)}")
        probe = mmap.mmap(-1, ALIGN)  # page aligned, as O_DIRECT wants
        probe_addr = ctypes.addressof(ctypes.c_char.from_buffer(probe))
        failures = []
        try:
            for mode in choices:
                agent = self.api.nixl_agent(f"{name}-{mode}-{next(_names)}",
                                            self.api.nixl_agent_config(enable_prog_thread=False, backends=[]))
                try:
                    agent.create_backend("POSIX", BACKEND_PARAMS[mode])
                    self._probe(agent, probe_addr)
                except self._errors + (DiskError,) as err:
                    failures.append(f"{mode}: {err}")
                    logger.warning("NIXL POSIX %s does not run here (%s); trying the next", mode, err)
                    continue
                logger.info("disk tier I/O: NIXL POSIX backend with %s", mode)
                return agent, mode
        finally:
            del probe_addr
            probe.close()
        raise DiskError("no NIXL POSIX mode runs here: " + "; ".join(failures))

    def _probe(self, agent, probe_addr: int) -> None:
        """Reads the first 4 KiB of data file 0 through `agent`: the mode creates and runs."""
        fd = self.files.fds[0]
        dram = agent.register_memory([(probe_addr, ALIGN, 0, "")], "DRAM", backends=["POSIX"])
        file = agent.register_memory([(0, ALIGN, fd, "")], "FILE", backends=["POSIX"])
        try:
            handle = agent.initialize_xfer("READ", agent.get_xfer_descs([(probe_addr, ALIGN, 0)], "DRAM"),
                                           agent.get_xfer_descs([(0, ALIGN, fd)], "FILE"), agent.name)
            state = agent.transfer(handle)
            while state == "PROC":
                state = agent.check_xfer_state(handle)
            agent.release_xfer_handle(handle)
            if state != "DONE":
                raise DiskError(f"probe read of {ALIGN} bytes from {self.files.paths[0]} ended {state}")
        finally:
            agent.deregister_memory(file, backends=["POSIX"])
            agent.deregister_memory(dram, backends=["POSIX"])

    def register_host(self, base: int, nbytes: int) -> None:
        """Registers host memory (the G2 segment) once; blocks moved must lie inside a registered region."""
        if base <= 0 or nbytes <= 0:
            raise LayoutError(f"host region at {base:#x} of {nbytes} bytes")
        self._host_regs.append(self.agent.register_memory([(base, nbytes, 0, "")], "DRAM", backends=["POSIX"]))
        self.regions.append((base, nbytes))

    def register_files(self, files: DataFiles) -> None:
        """Registers a set of data files (this instance's at start, another's before reading it)."""
        g = files.geometry
        descs = [(0, g.file_bytes(f), fd, "") for f, fd in enumerate(files.fds)]
        self._file_regs[id(files)] = self.agent.register_memory(descs, "FILE", backends=["POSIX"])

    def deregister_files(self, files: DataFiles) -> None:
        reg = self._file_regs.pop(id(files), None)
        if reg is not None:
            self.agent.deregister_memory(reg, backends=["POSIX"])

    # -- transfers ------------------------------------------------------------------------------

    def write(self, host_addrs, slots) -> None:
        """Host blocks to slots of this instance's files; DiskError unless every block was written."""
        self._raise(self.transfer("WRITE", host_addrs, slots), "write")

    def read(self, slots, host_addrs, files: DataFiles | None = None) -> None:
        """Slots (of `files`, default this instance's) to host blocks; DiskError unless every one was read."""
        self._raise(self.transfer("READ", host_addrs, slots, files), "read")

    @staticmethod
    def _raise(res: IoResult, what: str) -> None:
        if res.all_ok:
            return
        cls = DiskSpaceError if res.no_space else DiskError
        raise cls(f"disk {what}: {int((~res.ok).sum())} of {res.ok.size} blocks failed: " + "; ".join(res.errors),
                  slots=res.ok)

    def transfer(self, op: str, host_addrs, slots, files: DataFiles | None = None,
                 on_chunk: Callable[[int, int, np.ndarray], None] | None = None) -> IoResult:
        """Moves block i between host_addrs[i] and slots[i] ("WRITE": to the files, "READ": from them).

        on_chunk(start, end, ok) is called once per request of blocks [start, end): for a WRITE as
        soon as it is posted (its host bytes are only read, so a checksum over them runs while the
        disk writes them), for a READ once it finished (ok[start:end] says which blocks arrived). Argument
        errors raise before anything is posted; I/O failures are in the result. Returns, or raises
        what on_chunk raised, only when no request of the call is in flight any more."""
        files = files or self.files
        if id(files) not in self._file_regs:
            raise DiskError(f"files of {files.paths[0]} are not registered with the NIXL agent")
        if op == "WRITE" and not files.writable:
            raise DiskError(f"{files.paths[0]}: another instance's files are read-only")
        addrs, s = self.check_args(host_addrs, slots, files)
        n = s.size
        ok = np.zeros(n, dtype=bool)
        res = IoResult(ok)
        if n == 0:
            return res
        fidx, offs = files.geometry.locate(s)
        fds = np.asarray(files.fds, dtype=np.uint64)[fidx]
        local = np.stack([addrs, np.full(n, self.block_bytes, np.uint64), np.zeros(n, np.uint64)], axis=1)
        remote = np.stack([offs.astype(np.uint64), np.full(n, self.block_bytes, np.uint64), fds], axis=1)
        k, limit = ((self.read_blocks_per_request, self.read_inflight) if op == "READ"
                    else (self.blocks_per_request, self.max_inflight))
        pending = list(range(0, n, k))[::-1]  # chunk starts, popped from the end
        inflight: list[tuple[object, int]] = []
        agent = self.agent
        raised: list[BaseException] = []

        def chunk_done(start: int, end: int) -> None:
            if on_chunk is not None and not raised:
                try:
                    on_chunk(start, end, ok)
                except BaseException as err:  # re-raised once nothing is in flight
                    raised.append(err)

        while pending or inflight:
            while pending and len(inflight) < limit and not raised:
                start = pending.pop()
                end = min(start + k, n)
                try:
                    handle = agent.initialize_xfer(op, agent.get_xfer_descs(local[start:end], "DRAM"),
                                                   agent.get_xfer_descs(remote[start:end], "FILE"), agent.name)
                    state = agent.transfer(handle)
                except self._errors as err:
                    handle, state = None, f"ERR ({err!r})"
                if state == "PROC":
                    inflight.append((handle, start))
                    if op == "WRITE":
                        chunk_done(start, end)
                else:
                    if op == "WRITE":
                        chunk_done(start, end)  # before the per-block retry reads the same bytes again
                    self._finish(res, handle, state, op, files, fidx, offs, addrs, start, end)
                    if op == "READ":
                        chunk_done(start, end)
            if raised:
                pending.clear()
            progressed = False
            for item in list(inflight):
                handle, start = item
                try:
                    state = agent.check_xfer_state(handle)
                except self._errors as err:
                    state = f"ERR ({err!r})"
                if state == "PROC":
                    continue
                inflight.remove(item)
                progressed = True
                end = min(start + k, n)
                self._finish(res, handle, state, op, files, fidx, offs, addrs, start, end)
                if op == "READ":
                    chunk_done(start, end)
            if inflight and not progressed:
                time.sleep(self.poll_interval_s)
        if raised:
            raise raised[0]
        return res

    def _finish(self, res: IoResult, handle, state: str, op, files, fidx, offs, addrs, start: int, end: int) -> None:
        if handle is not None:
            self._release(handle, op)
        if state == "DONE":
            res.ok[start:end] = True
        else:
            self._failed(res, op, files, fidx, offs, addrs, start, end, f"NIXL request ended {state}")

    def _release(self, handle, op: str) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except self._errors as err:
            logger.warning("NIXL: releasing a finished %s request failed: %r", op, err)

    def _failed(self, res: IoResult, op: str, files: DataFiles, fidx, offs, addrs, start: int, end: int,
                why: str) -> None:
        """A request of blocks [start, end) failed as a whole: each block is redone alone through
        NIXL, so one bad block (past the end of a truncated file, an EIO sector) fails only itself,
        and each that fails again is diagnosed."""
        logger.warning("disk %s of %d blocks failed (%s); retrying them one by one", op.lower(), end - start, why)
        agent = self.agent
        for i in range(start, end):
            f, off, addr = int(fidx[i]), int(offs[i]), int(addrs[i])
            state = "ERR"
            try:
                handle = agent.initialize_xfer(op, agent.get_xfer_descs([(addr, self.block_bytes, 0)], "DRAM"),
                                               agent.get_xfer_descs([(off, self.block_bytes, files.fds[f])], "FILE"),
                                               agent.name)
                state = agent.transfer(handle)
                while state == "PROC":
                    state = agent.check_xfer_state(handle)
                self._release(handle, op)
            except self._errors as err:
                state = f"ERR ({err!r})"
            if state == "DONE":
                res.ok[i] = True
                continue
            if len(res.errors) < self.MAX_DIAGNOSED:
                detail, code = self._diagnose(op, files, f, off, addr)
                res.no_space = res.no_space or code in _SPACE_ERRNOS
                res.errors.append(f"{op} of block {i} ({files.paths[f]} at offset {off}): NIXL {state}; {detail}")
                logger.error("disk %s failed: %s", op.lower(), res.errors[-1])
            elif len(res.errors) == self.MAX_DIAGNOSED:
                res.errors.append("(further failures not diagnosed)")

    def _diagnose(self, op: str, files: DataFiles, f: int, off: int, addr: int) -> tuple[str, int]:
        """Redoes one block with os.pwritev/os.preadv for the errno NIXL does not report. The same
        bytes go to the same place, so a write repeats itself and a read fills a block that counts
        as failed anyway."""
        buf = (ctypes.c_char * self.block_bytes).from_address(addr)
        fd = files.fds[f]
        try:
            size = os.fstat(fd).st_size
            if op == "READ" and off + self.block_bytes > size:
                return (f"{files.paths[f]} is {size} bytes, the slot ends at {off + self.block_bytes} "
                        f"(truncated)"), errno.EIO
            done = os.pwritev(fd, [buf], off) if op == "WRITE" else os.preadv(fd, [buf], off)
        except OSError as err:
            return f"{'pwrite' if op == 'WRITE' else 'pread'}: {err}", err.errno or 0
        if done != self.block_bytes:
            return f"{op.lower()} moved {done} of {self.block_bytes} bytes", errno.EIO
        return "the same I/O through os.preadv/pwritev succeeded (a NIXL-side failure)", 0

    def check_args(self, host_addrs, slots, files: DataFiles) -> tuple[np.ndarray, np.ndarray]:
        a = np.ascontiguousarray(host_addrs, dtype=np.uint64).reshape(-1)
        s = np.ascontiguousarray(slots, dtype=np.int64).reshape(-1)
        if a.size != s.size:
            raise LayoutError(f"{a.size} host addresses for {s.size} slots")
        if s.size == 0:
            return a, s
        g = files.geometry
        bad = np.flatnonzero((s < 0) | (s >= g.num_slots))
        if bad.size:
            raise LayoutError(f"slot {int(s[bad[0]])} outside [0, {g.num_slots}) ({bad.size} of {s.size})")
        inside = np.zeros(a.size, dtype=bool)
        for base, nbytes in self.regions:
            inside |= (a >= base) & (a <= base + nbytes - self.block_bytes)
        if not inside.all():
            i = int(np.flatnonzero(~inside)[0])
            raise LayoutError(f"host block {i} at {int(a[i]):#x} (+{self.block_bytes} bytes) is outside the "
                              f"registered host memory {[(hex(b), n) for b, n in self.regions]}")
        if files.direct and (a % ALIGN).any():
            i = int(np.flatnonzero(a % ALIGN)[0])
            raise LayoutError(f"host block {i} at {int(a[i]):#x} is not {ALIGN}-byte aligned (O_DIRECT)")
        return a, s

    def close(self) -> None:
        for reg in self._file_regs.values():
            self.agent.deregister_memory(reg, backends=["POSIX"])
        self._file_regs.clear()
        for reg in self._host_regs:
            self.agent.deregister_memory(reg, backends=["POSIX"])
        self._host_regs.clear()
        self.regions.clear()
        self.agent = None


GDS_PROBE_S = 5.0  # a probe read that has not finished by then counts as failed


def probe_gds(files: DataFiles, device: int = 0) -> str:
    """Reads the first 4 KiB of data file 0 into device memory through NIXL's GDS backend.
    Returns "" when the read completed, else why not (the backend does not load, cuFile refuses
    the file, the read fails or does not finish within GDS_PROBE_S)."""
    api = load_nixl()
    agent = buf = None
    regs: list[tuple[object, str]] = []
    try:
        import torch
        agent = api.nixl_agent(f"kvbm-gds-probe-{os.getpid()}-{next(_names)}",
                               api.nixl_agent_config(enable_prog_thread=False, backends=[]))
        agent.create_backend("GDS", {})
        buf = torch.empty(ALIGN, dtype=torch.uint8, device=f"cuda:{device}")
        ptr, fd = buf.data_ptr(), files.fds[0]
        regs.append((agent.register_memory([(ptr, ALIGN, device, "")], "VRAM", backends=["GDS"]), "VRAM"))
        regs.append((agent.register_memory([(0, ALIGN, fd, "")], "FILE", backends=["GDS"]), "FILE"))
        handle = agent.initialize_xfer("READ", agent.get_xfer_descs([(ptr, ALIGN, device)], "VRAM"),
                                       agent.get_xfer_descs([(0, ALIGN, fd)], "FILE"), agent.name)
        state = agent.transfer(handle)
        deadline = time.monotonic() + GDS_PROBE_S
        while state == "PROC" and time.monotonic() < deadline:
            state = agent.check_xfer_state(handle)
        if state == "PROC":
            return f"the probe read did not finish within {GDS_PROBE_S:.0f} s"
        agent.release_xfer_handle(handle)
        return "" if state == "DONE" else f"the probe read ended {state}"
    except Exception as err:  # noqa: BLE001 - any failure (import, backend, cuFile) means: no GDS here
        return f"{type(err).__name__}: {err}"
    finally:
        if agent is not None:
            for reg, _ in reversed(regs):
                try:
                    agent.deregister_memory(reg, backends=["GDS"])
                except Exception:  # noqa: BLE001 - best effort on a probe agent being dropped
                    logger.debug("GDS probe: deregistering failed", exc_info=True)
        del buf
