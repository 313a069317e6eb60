"""The disk tier's files: one instance's private folder under disk_path and its preallocated data files.

Parts, in the order `DataFiles.create` uses them:
  Geometry      block and slot sizes, slot and file counts; where slot s lives: file s % N at offset
                (s // N) * slot_bytes, so consecutive slots spread over the files and their I/O runs
                in parallel. Slots are the block size rounded up to 4 KiB (O_DIRECT alignment)
  InstanceDir   <disk_path>/<instance_id>/, mode 0700, ours (lstat: a symlink or another user's
                folder is refused), with an flock on its `lock` file so that one process at a time
                writes an instance's files; paths of the data files and the journal
  DataFiles     N files, mode 0600, opened with O_NOFOLLOW and O_DIRECT (without it, and a logged
                warning, where the file system refuses O_DIRECT or the block size is not a multiple
                of 4 KiB), preallocated with posix_fallocate after a free-space check; ENOSPC,
                EDQUOT and EFBIG raise DiskSpaceError naming the bytes. `open_peer` opens another
                instance's files read-only (the shared-directory case), never preallocating them.

No I/O of blocks here (io.py moves them through NIXL); these are file descriptors, sizes and fsync.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
from dataclasses import dataclass

import numpy as np

from kvbm.errors import DiskError, DiskSpaceError, LifecycleError, PermissionRefusedError
from kvbm.shm import check_private

logger = logging.getLogger(__name__)

ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffers (the page size; >= any logical block)
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_INSTANCE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def slot_bytes_for(block_bytes: int) -> int:
    return -(-block_bytes // ALIGN) * ALIGN


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where blocks live in an instance's data files."""

    block_bytes: int  # bytes of one block (what is written, read and checksummed)
    slot_bytes: int   # block_bytes rounded up to ALIGN: the stride of slots inside a file
    num_slots: int    # slots over all files
    num_files: int    # data files; slot s lives in file s % num_files

    @classmethod
    def of(cls, block_bytes: int, num_slots: int, num_files: int) -> Geometry:
        if block_bytes <= 0 or num_slots <= 0 or num_files <= 0:
            raise DiskError(f"disk geometry: block_bytes {block_bytes}, num_slots {num_slots}, "
                            f"num_files {num_files}: each must be >= 1")
        return cls(block_bytes, slot_bytes_for(block_bytes), num_slots, min(num_files, num_slots))

    def slots_in_file(self, f: int) -> int:
        return (self.num_slots - f + self.num_files - 1) // self.num_files

    def file_bytes(self, f: int) -> int:
        return self.slots_in_file(f) * self.slot_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def locate(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file index, byte offset) of each slot; slots must be in [0, num_slots)."""
        s = np.asarray(slots, dtype=np.int64)
        return s % self.num_files, (s // self.num_files) * self.slot_bytes


def check_instance_id(instance_id: str) -> str:
    if not isinstance(instance_id, str) or not _INSTANCE_RE.fullmatch(instance_id):
        raise DiskError(f"instance_id: 1-64 letters, digits, '_' or '-', got {instance_id!r}")
    return instance_id


class InstanceDir:
    """<disk_path>/<instance_id>/: the folder holding one instance's data files, journal and lock."""

    LOCK = "lock"
    JOURNAL = "journal"

    def __init__(self, disk_path: str, instance_id: str) -> None:
        self.disk_path = os.path.abspath(disk_path)
        self.instance_id = check_instance_id(instance_id)
        self.path = os.path.join(self.disk_path, instance_id)
        self._lock_fd = -1

    def data_path(self, f: int) -> str:
        return os.path.join(self.path, f"data.{f:03d}")

    @property
    def journal_path(self) -> str:
        return os.path.join(self.path, self.JOURNAL)

    def ensure(self) -> None:
        """Creates the folder (0700) where missing; refuses one that is not ours and private."""
        os.makedirs(self.disk_path, mode=0o700, exist_ok=True)
        try:
            os.mkdir(self.path, 0o700)
            os.chmod(self.path, 0o700)  # whatever the umask took away
        except FileExistsError:
            pass
        except OSError as err:
            raise DiskError(f"cannot create the disk tier folder {self.path}: {err}") from err
        check_private(os.lstat(self.path), self.path, directory=True)

    def lock(self) -> None:
        """One writer per instance: an flock on <folder>/lock, held until `unlock` (or process exit)."""
        fd = os.open(os.path.join(self.path, self.LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LifecycleError(f"the disk tier folder {self.path} is open in another process") from err
            raise DiskError(f"cannot lock {self.path}/{self.LOCK}: {err}") from err
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = -1


def _open_file(path: str, flags: int, direct: bool) -> tuple[int, bool]:
    """Opens with O_DIRECT when asked and the file system allows it; (fd, direct) as opened."""
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT, 0o600), True
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            logger.warning("%s: the file system refuses O_DIRECT (%s); using the page cache", path, err)
    return os.open(path, flags, 0o600), False


def _allocated_bytes(st: os.stat_result) -> int:
    return st.st_blocks * 512


class DataFiles:
    """The data files of one instance, open. `fds[f]` is file f; `direct` says whether O_DIRECT is on."""

    def __init__(self, paths: list[str], fds: list[int], geometry: Geometry, direct: bool, writable: bool) -> None:
        self.paths = paths
        self.fds = fds
        self.geometry = geometry
        self.direct = direct
        self.writable = writable

    @classmethod
    def create(cls, folder: InstanceDir, geometry: Geometry, direct: bool = True) -> DataFiles:
        """Opens (creating where missing) and preallocates the instance's data files to the geometry.

        Files beyond num_files from an earlier geometry are removed; a file longer than its slots is
        cut. The free-space check runs before any byte is allocated, so a store that cannot fit fails
        before it fills the disk."""
        if direct and geometry.block_bytes % ALIGN:
            logger.warning("disk tier: block of %d bytes is not a multiple of %d; O_DIRECT off (page cache)",
                           geometry.block_bytes, ALIGN)
            direct = False
        paths = [folder.data_path(f) for f in range(geometry.num_files)]
        fds: list[int] = []
        opened_direct = direct
        try:
            for p in paths:
                try:
                    fd, d = _open_file(p, os.O_RDWR | os.O_CREAT, direct and opened_direct)
                except OSError as err:
                    raise DiskError(f"cannot open disk tier file {p}: {err}") from err
                fds.append(fd)
                opened_direct = opened_direct and d
                check_private(os.fstat(fd), p)
            if direct and not opened_direct:
                # One mode for all files: reopen those that did get O_DIRECT without it.
                for i, p in enumerate(paths):
                    os.close(fds[i])
                    fds[i] = _open_file(p, os.O_RDWR, False)[0]
            cls._preallocate(paths, fds, geometry, folder.disk_path)
            cls._remove_extra(folder, geometry.num_files)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        logger.info("disk tier files: %d x %.1f MiB in %s (O_DIRECT %s)", geometry.num_files,
                    geometry.file_bytes(0) / 2**20, folder.path, "on" if opened_direct else "off")
        return cls(paths, fds, geometry, opened_direct, writable=True)

    @staticmethod
    def _preallocate(paths: list[str], fds: list[int], geometry: Geometry, disk_path: str) -> None:
        stats = [os.fstat(fd) for fd in fds]
        need = sum(max(0, geometry.file_bytes(f) - _allocated_bytes(st)) for f, st in enumerate(stats))
        vfs = os.statvfs(disk_path)
        free = vfs.f_bavail * vfs.f_frsize
        if need > free:
            raise DiskSpaceError(f"disk tier at {disk_path} needs {need} more bytes for {geometry.num_slots} "
                                 f"slots of {geometry.slot_bytes} bytes ({geometry.total_bytes} in all); "
                                 f"{free} bytes are free")
        for f, (p, fd, st) in enumerate(zip(paths, fds, stats)):
            want = geometry.file_bytes(f)
            if st.st_size == want and _allocated_bytes(st) >= want:
                continue  # a warm restart: allocated already (glibc's fallback would rewrite every block)
            try:
                if st.st_size > want:
                    os.ftruncate(fd, want)
                os.posix_fallocate(fd, 0, want)
            except OSError as err:
                if err.errno in _SPACE_ERRNOS:
                    raise DiskSpaceError(f"cannot preallocate {want} bytes for {p}: {os.strerror(err.errno)} "
                                         f"({need} bytes needed over {len(paths)} files, {free} were free)") from err
                raise DiskError(f"cannot preallocate {want} bytes for {p}: {err}") from err

    @staticmethod
    def _remove_extra(folder: InstanceDir, num_files: int) -> None:
        f = num_files
        while os.path.lexists(folder.data_path(f)):
            os.unlink(folder.data_path(f))
            f += 1

    @classmethod
    def open_peer(cls, folder: InstanceDir, geometry: Geometry) -> DataFiles:
        """Another instance's files, read-only, never created or resized: a missing file raises
        DiskError (that peer's blocks cannot be read), a short one fails the reads that pass its end."""
        direct = geometry.block_bytes % ALIGN == 0
        paths = [folder.data_path(f) for f in range(geometry.num_files)]
        fds: list[int] = []
        try:
            for p in paths:
                try:
                    fd, direct = _open_file(p, os.O_RDONLY, direct)
                except OSError as err:
                    raise DiskError(f"cannot open peer file {p}: {err}") from err
                fds.append(fd)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise PermissionRefusedError(f"{p} is not a regular file")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(paths, fds, geometry, direct, writable=False)

    def sync(self, files: np.ndarray | list[int]) -> None:
        """fdatasync of the given files: their written blocks (and, for preallocated extents, the
        metadata that marks them written) are durable when this returns."""
        for f in sorted({int(x) for x in files}):
            try:
                os.fdatasync(self.fds[f])
            except OSError as err:
                raise DiskError(f"fdatasync of {self.paths[f]} failed: {err}") from err

    def sizes(self) -> list[int]:
        return [os.fstat(fd).st_size for fd in self.fds]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
