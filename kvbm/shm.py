"""Private shared-memory segments (/dev/shm, mode 0600) and the per-instance runtime directory.

Parts:
  Segment               one /dev/shm file mapped read/write: create (O_EXCL, 0600, ftruncate,
                        all of it reserved or only a prefix: the rest stays sparse until
                        `reserve`d, and `discard` gives pages back), attach by name, prefault
                        (threads touching every page), pin/unpin with cudaHostRegister, a
                        torch/numpy view, close and unlink
  segment_name          names derived from the instance id: kvbm-<id>-g2 (host pool, owned by the
                        supervisor), kvbm-<id>-g2reg (the shared G2 registry, kvbm.shared_g2,
                        owned by the supervisor), kvbm-<id>-dev-<pid>-<n> (CPU-mode "device"
                        memory owned by an engine process <pid>), kvbm-<id>-lane-<pid>-<n> (its
                        transfer lanes)
  process_start_time    a pid's start time (field 22 of /proc/<pid>/stat): with the pid, it tells a
                        live process from a later one that reused its pid
  RuntimeDir            the 0700 folder holding sockets and the supervisor's lock file; `acquire`
                        takes an flock so that a second supervisor of the same instance is refused
                        and a killed one's leftovers (sockets, segments) are found and removed;
                        `owner` tells a live owner (lock held) from a dead one (lock free)
  clean_stale_segments  removes kvbm-<id>-* segments whose owner is dead
  clean_dead_device_segments
                        removes every instance's device segments of dead engines (pid in the name
                        dead and the segment's flock free), only this user's
  SharedBuffers         CPU-mode engine tensors placed in a segment the workers can map: a layout's
                        uint8 buffers (`allocate`), or tensors of the shape and dtype the engine
                        allocates itself, e.g. vLLM's per-layer [2, num_blocks, block_size, heads,
                        head_dim] (`allocate_like`); `emulated_device` first removes dead engines'
                        segments and checks /dev/shm has room
  check_shm_room        before a large segment is made: refuses one /dev/shm has no room for, and
                        warns when one takes more than half of what is free (the numbers in both)

Nothing here imports zmq or the workers: both the engine side and the worker side use it.
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import mmap
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvbm.errors import ConfigError, KvbmError, LifecycleError, PermissionRefusedError

if TYPE_CHECKING:
    import torch

    from kvbm.layout import BlockLayout

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PAGE = mmap.PAGESIZE
FALLOCATE_CHUNK = 256 << 20   # bytes reserved per posix_fallocate call (progress in between)
PREFAULT_CHUNK = 64 << 20     # bytes one pre-fault thread touches before taking the next chunk
SHM_WARN_SHARE = 0.5          # check_shm_room warns above this share of /dev/shm's free bytes
ACQUIRE_PROBE_WAIT_S = 0.2  # acquire retries this long: RuntimeDir.owner() probes hold the lock shared briefly
REGISTRY_KIND = "g2reg"      # segment_name kind of the shared G2 registry (kvbm.shared_g2)
G3_REGISTRY_KIND = "g3reg"   # ... of the shared G3 slot table and its checksums (kvbm.shared_g3)
G3_SUMS_KIND = "g3sum"
# Segments an engine process owns: CPU-mode device memory (dev) and its transfer lanes (lane).
_DEV_RE = re.compile(r"^kvbm-(?P<inst>[A-Za-z0-9_-]+)-(?:dev|lane)-(?P<pid>\d+)-\d+$")


def shm_space() -> tuple[int, int]:
    """(free, total) bytes of /dev/shm for this user."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def check_shm_room(nbytes: int, what: str) -> None:
    """/dev/shm is RAM shared with every process of the machine (and in a container often 64 MB):
    refuse a segment it cannot hold, before anything is started, and say so when one would take
    most of what is left."""
    free, total = shm_space()
    if nbytes > free:
        raise ConfigError(f"{what} needs {nbytes / 1e9:.3f} GB of {SHM_DIR}, which has {free / 1e9:.3f} GB free "
                          f"of {total / 1e9:.3f} GB: shrink it, or enlarge {SHM_DIR} (e.g. docker --shm-size)")
    if nbytes > SHM_WARN_SHARE * free:
        logger.warning("%s takes %.3f GB of %s: %.0f%% of the %.3f GB free (%.3f GB in all); the machine's other "
                       "processes share this memory", what, nbytes / 1e9, SHM_DIR, 100 * nbytes / free, free / 1e9,
                       total / 1e9)


def segment_name(instance_id: str, kind: str = "g2") -> str:
    return f"kvbm-{instance_id}-{kind}"


def pid_alive(pid: int) -> bool:
    """False for a pid that does not exist or is a zombie (dead, not yet reaped by its parent)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:
        return True  # no /proc: kill(0) is all we know


def process_start_time(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks after boot (field 22 of /proc/<pid>/stat), or
    None when it does not exist or is a zombie. A pid reused by a later process has a later one."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rpartition(b")")[2].split()
    except OSError:
        return None
    # fields[0] is field 3 (state), so field 22 (starttime) is fields[19]
    if len(fields) < 20 or fields[0] == b"Z":
        return None
    return int(fields[19])


def check_private(st: os.stat_result, path: str, directory: bool = False) -> None:
    """Raises KvbmError unless `st` (an lstat/fstat result) is ours and closed to everyone else:
    a directory of mode 0700, or a regular file with no group/other bits. What another local user
    could have planted (a segment another engine maps, an endpoints.json pointing at their
    sockets, a folder they can write) is refused, never trusted."""
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    mode = stat.S_IMODE(st.st_mode)
    if not kind_ok:
        raise PermissionRefusedError(f"{path} is not a {'directory' if directory else 'regular file'} "
                                     f"(a symlink or special file where kvbm expects its own)")
    if st.st_uid != os.getuid():
        raise PermissionRefusedError(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}); "
                                     f"refusing it")
    if (mode != 0o700) if directory else (mode & 0o077):
        raise PermissionRefusedError(f"{path} has mode {mode:#o}; "
                                     f"expected {'0700' if directory else 'no group/other access (0600)'}")


def check_private_dir(path: str) -> bool:
    """False when `path` does not exist; True when it is our 0700 directory (lstat: not a symlink);
    KvbmError otherwise."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    check_private(st, path, directory=True)
    return True


class Segment:
    """A mapped /dev/shm file. Create it with `create`, map an existing one with `attach`."""

    def __init__(self, name: str, fd: int, size: int, owner: bool, populate: bool = False) -> None:
        self.name = name
        self.size = size
        self.owner = owner
        self._fd = fd
        # MAP_POPULATE: a process that attaches a warm segment builds its page tables now, not as
        # minor faults inside its first copies.
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        self.map = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = None
        self._pinned = False
        self.address = self._address()

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    def fileno(self) -> int:
        """The segment file's descriptor (flock: kvbm.shared_g3's build lock)."""
        return self._fd

    @classmethod
    def create(cls, name: str, size: int, replace: bool = False,
               progress: Callable[[int], None] | None = None, reserve: int | None = None) -> Segment:
        """`progress(bytes_reserved)` is called between chunks of the reservation (seconds for a
        pool of many GB). `reserve`: bytes reserved from the start (None: all); the rest is a hole
        that takes no memory until `reserve(offset, length)` claims a part of it."""
        if size <= 0:
            raise KvbmError(f"segment {name}: size must be > 0, got {size}")
        path = os.path.join(SHM_DIR, name)
        if replace:
            _unlink_quiet(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError as err:
            raise LifecycleError(f"shared-memory segment {path} already exists (another instance, or "
                            "a stale one the start-up clean-up did not claim)") from err
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            try:
                # Reserve the pages now: on a tmpfs too small for the segment this fails here with
                # ENOSPC instead of killing the first process that touches the missing pages (SIGBUS).
                # In chunks, so that progress can be reported.
                upto = size if reserve is None else min(size, reserve)
                for lo in range(0, upto, FALLOCATE_CHUNK):
                    os.posix_fallocate(fd, lo, min(FALLOCATE_CHUNK, upto - lo))
                    if progress is not None:
                        progress(min(lo + FALLOCATE_CHUNK, size))
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.ENOMEM):
                    st = os.statvfs(SHM_DIR)
                    raise KvbmError(f"cannot allocate a {size}-byte segment in {SHM_DIR}: {st.f_bavail * st.f_frsize} "
                                    f"bytes free (enlarge it, e.g. docker --shm-size, or shrink the tier)") from err
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            return cls(name, fd, size, owner=True)
        except BaseException:
            os.close(fd)
            _unlink_quiet(path)
            raise

    @classmethod
    def attach(cls, name: str, size: int | None = None, populate: bool = False) -> Segment:
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as err:
            raise KvbmError(f"cannot open shared-memory segment {path}: {err}") from err
        try:
            st = os.fstat(fd)
            check_private(st, path)  # another user's segment would feed (or receive) our KV bytes
            actual = st.st_size
            if actual <= 0 or (size is not None and actual < size):
                raise KvbmError(f"segment {path} is {actual} bytes, expected at least {max(size or 1, 1)}")
            try:
                return cls(name, fd, size or actual, owner=False, populate=populate)
            except (OSError, ValueError) as err:
                raise KvbmError(f"cannot map shared-memory segment {path} ({actual} bytes): {err}") from err
        except BaseException:
            os.close(fd)
            raise

    def reserve(self, offset: int, length: int) -> None:
        """Claims the memory of [offset, offset + length) now (posix_fallocate), so that a full
        /dev/shm fails here with a KvbmError, not later with SIGBUS in whoever touches it."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise KvbmError(f"segment {self.name}: reserve [{offset}, {offset + length}) outside "
                            f"its {self.size} bytes")
        if length == 0:
            return
        try:
            os.posix_fallocate(self._fd, offset, length)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.ENOMEM):
                free, _ = shm_space()
                raise KvbmError(f"segment {self.name}: cannot reserve {length} bytes of {SHM_DIR} "
                                f"({free} bytes free)") from err
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise

    def discard(self, offset: int, length: int) -> None:
        """Gives the memory of the whole pages in [offset, offset + length) back (MADV_REMOVE):
        they read as zeros afterwards, in every process that maps the segment."""
        lo = (offset + PAGE - 1) // PAGE * PAGE
        hi = (offset + length) // PAGE * PAGE
        if hi <= lo or self.map is None:
            return
        try:
            self.map.madvise(mmap.MADV_REMOVE, lo, hi - lo)
        except (AttributeError, OSError):
            # not Linux, or not tmpfs: zeros are what the caller needs; the memory stays claimed
            self.map[lo:hi] = bytes(hi - lo)

    def _address(self) -> int:
        import ctypes
        buf = (ctypes.c_char * self.size).from_buffer(self.map)
        addr = ctypes.addressof(buf)
        del buf  # the export would keep the mmap from closing
        return addr

    def prefault(self, threads: int = 0, progress: Callable[[int], None] | None = None) -> float:
        """Touches every page on `threads` threads (faulting a huge segment on one thread takes
        seconds; the kernel's page allocation scales with threads), PREFAULT_CHUNK bytes at a time
        so that `progress(bytes_touched)` can be called while they run. Returns the seconds the
        touching took (importing torch, seconds on a cold start, is not part of it)."""
        import torch
        whole = self.tensor()
        threads = threads or min(8, os.cpu_count() or 1)
        chunks = iter(range(0, self.size, PREFAULT_CHUNK))
        lock = threading.Lock()
        touched = [0]

        def touch() -> None:
            # zero_ is a memset in ATen, with the GIL released: real parallel page faults.
            with torch.inference_mode():
                while True:
                    with lock:
                        lo = next(chunks, None)
                    if lo is None:
                        return
                    hi = min(lo + PREFAULT_CHUNK, self.size)
                    whole[lo:hi].zero_()
                    with lock:
                        touched[0] += hi - lo

        workers = [threading.Thread(target=touch, daemon=True)
                   for _ in range(min(threads, (self.size + PREFAULT_CHUNK - 1) // PREFAULT_CHUNK))]
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        try:
            for t in workers:
                t.start()
            for t in workers:
                while t.is_alive():
                    t.join(0.1)
                    if progress is not None:
                        progress(touched[0])
        finally:
            torch.set_num_threads(prev)
        elapsed = time.perf_counter() - t0
        if progress is not None:
            progress(touched[0])
        return elapsed

    def hold(self) -> None:
        """Takes a shared flock on the segment for as long as this process has it open: the kernel
        drops it when the process dies, so sweeps tell a live owner from a dead one even when the
        pid in the name belongs to another pid namespace that shares /dev/shm."""
        fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)

    def pin(self) -> float:
        """cudaHostRegister over the whole mapping; returns seconds taken."""
        from kvbm._fast import native
        t0 = time.perf_counter()
        native.cuda_host_register(self.address, self.size)
        self._pinned = True
        return time.perf_counter() - t0

    def tensor(self) -> torch.Tensor:
        """A uint8 torch tensor over the whole segment (shares the memory)."""
        import torch
        if self._view is None:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "buffer is not writable" is about bytes objects
                self._view = torch.frombuffer(self.map, dtype=torch.uint8)
        return self._view

    def close(self) -> None:
        if self._pinned:
            try:
                from kvbm._fast import native
                native.cuda_host_unregister(self.address)
            except KvbmError:
                logger.warning("cudaHostUnregister of %s failed", self.name, exc_info=True)
            self._pinned = False
        if self.map is not None:
            if self._view is None:
                try:
                    self.map.close()
                except BufferError:
                    logger.debug("segment %s still exported; the mapping goes with its last user", self.name)
            # else: torch.frombuffer keeps a reference to the mmap object, not a buffer export, so an
            # explicit close would unmap memory that tensors still point into. Dropping our reference
            # unmaps it when the last of those tensors goes.
            self._view = None
            self.map = None  # type: ignore[assignment]
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        _unlink_quiet(self.path)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if self.owner:
            self.unlink()


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_dead_device_segment(name: str, pid: int) -> bool:
    """Unlinks the device segment `name` when its engine is gone: its pid is dead and nobody holds
    the segment's flock (Segment.hold). Only our own regular files; True when removed."""
    if pid_alive(pid):
        return False
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live engine holds it (its pid is from another pid namespace)
        _unlink_quiet(path)
        return True
    finally:
        os.close(fd)


def clean_stale_segments(instance_id: str, include_host_pool: bool) -> list[str]:
    """Unlinks this instance's segments whose owner is dead: device segments of dead engines and,
    when the caller holds the instance lock, the host pool and shared registry segments of a killed
    supervisor. Returns their names (the caller logs them)."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    prefix = f"kvbm-{instance_id}-"
    for name in names:
        if not name.startswith(prefix):
            continue
        match = _DEV_RE.match(name)
        if match is not None and match.group("inst") == instance_id:
            if _remove_dead_device_segment(name, int(match.group("pid"))):
                removed.append(name)
        elif include_host_pool and name in [segment_name(instance_id, kind) for kind in
                                             ("g2", REGISTRY_KIND, G3_REGISTRY_KIND, G3_SUMS_KIND)]:
            _unlink_quiet(os.path.join(SHM_DIR, name))
            removed.append(name)
    return removed


def clean_dead_device_segments() -> list[str]:
    """Unlinks the CPU-mode device segments (kvbm-<id>-dev-<pid>-<n>) of dead engines of this
    user, whatever their instance: under the default random instance id no later start of the same
    instance would ever find them. Called when an engine creates its device segment and when
    kvbm-workers starts. Returns their names (the caller logs them)."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    removed = [name for name in names
               if (match := _DEV_RE.match(name)) is not None
               and _remove_dead_device_segment(name, int(match.group("pid")))]
    return removed


class RuntimeDir:
    """The 0700 per-instance folder: sockets, the lock file (holding the supervisor's pid)."""

    LOCK = "supervisor.lock"

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock_fd = -1

    def ensure(self) -> None:
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        try:
            os.mkdir(self.path, 0o700)
            os.chmod(self.path, 0o700)  # whatever the umask took away
        except FileExistsError:
            pass
        # lstat: a symlink, another user's folder or one others can enter is refused, not repaired
        # (a folder that was open may hold what they planted).
        if not check_private_dir(self.path):
            raise KvbmError(f"runtime dir {self.path} vanished while it was being created")

    def owner(self) -> tuple[int, bool]:
        """(pid, alive) of the supervisor that holds, or last held, the instance lock: alive when a
        process holds the lock now (the kernel drops it when its holder dies, SIGKILL included);
        pid 0 when the lock file names none (no lock file, or its owner is still writing it).
        Probes with a shared lock held for a moment, which a starting supervisor's acquire waits out."""
        if not check_private_dir(self.path):
            return 0, False
        lock_path = os.path.join(self.path, self.LOCK)
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return 0, False
        try:
            check_private(os.fstat(fd), lock_path)
            raw = os.pread(fd, 32, 0).decode(errors="replace").strip()
            pid = int(raw) if raw.isdigit() else 0
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return pid, True
                raise
            fcntl.flock(fd, fcntl.LOCK_UN)
            return pid, False
        finally:
            os.close(fd)

    def acquire(self) -> list[str]:
        """Takes the instance lock; returns the leftovers of a dead previous owner it removed.
        Raises KvbmError when a live supervisor holds it."""
        self.ensure()
        lock_path = os.path.join(self.path, self.LOCK)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + ACQUIRE_PROBE_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                busy = err.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
                if busy and time.monotonic() < deadline:
                    time.sleep(0.01)  # an owner() probe holds a shared lock for a moment
                    continue
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                if busy:
                    raise LifecycleError(f"kvbm-workers already runs for {self.path} (pid {owner or '?'})") from err
                raise
        previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
        removed = []
        for name in os.listdir(self.path):
            if name != self.LOCK:
                target = os.path.join(self.path, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    _unlink_quiet(target)
                removed.append(name)
        if removed:
            logger.warning("removed leftovers of a previous kvbm-workers (pid %s) in %s: %s",
                           previous or "?", self.path, removed)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return removed

    @property
    def held(self) -> bool:
        """This process took the lock (acquire) and has not released it."""
        return self._lock_fd >= 0

    def release_and_remove(self) -> None:
        """Removes every file of the folder and the folder itself, then drops the lock. Nothing
        when the lock was never taken: the folder is then another supervisor's."""
        if self._lock_fd < 0:
            return
        if os.path.isdir(self.path):
            for name in os.listdir(self.path):
                if name != self.LOCK:
                    _unlink_quiet(os.path.join(self.path, name))
            _unlink_quiet(os.path.join(self.path, self.LOCK))
            try:
                os.rmdir(self.path)
            except OSError:
                logger.warning("runtime dir %s not empty at shutdown", self.path)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


@dataclass
class SharedBuffers:
    """CPU-mode "device" memory: a layout's buffers placed in one segment the workers can map.

    `tensors` are uint8 tensors over the segment (one per layout buffer); the register message
    names them by their offsets in it (kvbm.transfer.memory_map)."""
    segment: Segment
    tensors: list
    offsets: list[int]

    @classmethod
    def allocate(cls, layout: BlockLayout, instance_id: str) -> SharedBuffers:
        """One uint8 tensor per layout buffer."""
        return cls.allocate_like((layout.buffer_bytes,), "uint8", layout.num_buffers(), instance_id)

    @classmethod
    def allocate_like(cls, shape: tuple[int, ...], dtype, count: int, instance_id: str) -> SharedBuffers:
        """`count` contiguous tensors of `shape` and `dtype` (a torch dtype or its name), each
        starting on a page boundary of one segment."""
        torch_dtype, size = _tensor_bytes(shape, dtype)
        if count < 1:
            raise ConfigError(f"shared tensors: count {count}, expected >= 1")
        stride = (size + PAGE - 1) // PAGE * PAGE
        seq = next(_segment_seq)
        seg = Segment.create(segment_name(instance_id, f"dev-{os.getpid()}-{seq}"), stride * count)
        seg.hold()  # until this process dies or closes it: sweeps leave it alone meanwhile
        whole = seg.tensor()
        offsets = [i * stride for i in range(count)]
        tensors = [whole[o:o + size].view(torch_dtype).view(tuple(int(d) for d in shape)) for o in offsets]
        return cls(seg, tensors, offsets)

    @classmethod
    def emulated_device(cls, shape: tuple[int, ...], dtype, count: int, instance_id: str, what: str) -> SharedBuffers:
        """allocate_like for an engine's CPU-mode KV cache: the segments of dead engines (under
        random instance ids nobody else would) are removed first, and /dev/shm must have room."""
        gone = clean_dead_device_segments()
        if gone:
            logger.warning("removed the device segments of dead engines: %s", ", ".join(gone))
        check_shm_room(count * _tensor_bytes(shape, dtype)[1], what)
        return cls.allocate_like(shape, dtype, count, instance_id)

    def close(self) -> None:
        self.tensors = []
        self.segment.close()
        self.segment.unlink()


_segment_seq = itertools.count(1)  # per-process sequence of device segment names


def _tensor_bytes(shape: tuple[int, ...], dtype) -> tuple[torch.dtype, int]:
    """(torch dtype, bytes) of a tensor of `shape` and `dtype` (a torch dtype or its name)."""
    import torch
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype) or not shape or any(int(d) < 1 for d in shape):
        raise ConfigError(f"shared tensors need a torch dtype and a shape of positive sizes; got {dtype!r}, "
                          f"{tuple(shape)}")
    size = torch_dtype.itemsize
    for dim in shape:
        size *= int(dim)
    return torch_dtype, size
