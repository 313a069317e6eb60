"""The disk tier's files (kvbm/workers/disk/files.py): slot placement, private folder and files,
preallocation and its space errors, the O_DIRECT fallback, one writer per instance."""
from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvbm.errors import DiskError, DiskSpaceError, LifecycleError, PermissionRefusedError
from kvbm.workers.disk.files import ALIGN, DataFiles, Geometry, InstanceDir


def test_slots_spread_over_the_files():
    g = Geometry.of(block_bytes=5000, num_slots=10, num_files=4)
    assert g.slot_bytes == 8192  # rounded up to 4 KiB
    files, offsets = g.locate(np.arange(10))
    assert files.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert offsets.tolist() == [0] * 4 + [8192] * 4 + [16384] * 2
    assert [g.slots_in_file(f) for f in range(4)] == [3, 3, 2, 2]
    assert sum(g.file_bytes(f) for f in range(4)) == g.total_bytes == 10 * 8192
    assert Geometry.of(4096, 2, 8).num_files == 2  # no empty files
    with pytest.raises(DiskError, match="num_slots 0"):
        Geometry.of(4096, 0, 4)


def test_files_are_private_and_preallocated(tmp_path):
    folder = InstanceDir(str(tmp_path / "g3"), "inst-1")
    folder.ensure()
    g = Geometry.of(65536, 10, 3)
    files = DataFiles.create(folder, g)
    try:
        assert stat.S_IMODE(os.lstat(folder.path).st_mode) == 0o700
        for f, p in enumerate(files.paths):
            st = os.stat(p)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_size == g.file_bytes(f) and st.st_blocks * 512 >= st.st_size
        assert files.direct  # /tmp here is ext4; tmpfs since 6.6 takes O_DIRECT too
        files.sync([0, 2])
    finally:
        files.close()


def test_reopen_with_another_geometry_resizes(tmp_path):
    folder = InstanceDir(str(tmp_path), "a")
    folder.ensure()
    DataFiles.create(folder, Geometry.of(4096, 12, 4)).close()
    files = DataFiles.create(folder, Geometry.of(4096, 4, 2))
    files.close()
    assert sorted(os.listdir(folder.path)) == ["data.000", "data.001"]
    assert [os.path.getsize(p) for p in files.paths] == [2 * 4096, 2 * 4096]


def test_o_direct_refused_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, mode=0o777, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    folder = InstanceDir(str(tmp_path), "a")
    folder.ensure()
    with caplog.at_level(logging.WARNING):
        files = DataFiles.create(folder, Geometry.of(4096, 4, 2))
    files.close()
    assert not files.direct and "refuses O_DIRECT" in caplog.text


def test_a_block_size_off_4k_turns_o_direct_off(tmp_path, caplog):
    folder = InstanceDir(str(tmp_path), "a")
    folder.ensure()
    with caplog.at_level(logging.WARNING):
        files = DataFiles.create(folder, Geometry.of(1000, 4, 2))
    files.close()
    assert not files.direct and "not a multiple of 4096" in caplog.text


def test_symlinks_and_foreign_modes_are_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "g3").mkdir()
    os.symlink(real, tmp_path / "g3" / "a")
    with pytest.raises(PermissionRefusedError, match="not a directory"):
        InstanceDir(str(tmp_path / "g3"), "a").ensure()
    (tmp_path / "g3" / "b").mkdir(mode=0o755)
    os.chmod(tmp_path / "g3" / "b", 0o755)
    with pytest.raises(PermissionRefusedError, match="mode 0o755"):
        InstanceDir(str(tmp_path / "g3"), "b").ensure()
    folder = InstanceDir(str(tmp_path / "g3"), "c")
    folder.ensure()
    os.symlink(tmp_path / "elsewhere", folder.data_path(0))
    with pytest.raises(DiskError, match="cannot open disk tier file"):
        DataFiles.create(folder, Geometry.of(4096, 2, 1))
    with pytest.raises(DiskError, match="instance_id"):
        InstanceDir(str(tmp_path), "../x")


def test_one_writer_per_instance(tmp_path):
    first = InstanceDir(str(tmp_path), "a")
    first.ensure()
    first.lock()
    second = InstanceDir(str(tmp_path), "a")
    with pytest.raises(LifecycleError, match="open in another process"):
        second.lock()
    first.unlock()
    second.lock()
    second.unlock()


def test_more_than_the_free_space_is_refused_before_allocating(tmp_path):
    folder = InstanceDir(str(tmp_path), "a")
    folder.ensure()
    vfs = os.statvfs(str(tmp_path))
    slots = (vfs.f_blocks * vfs.f_frsize) // ALIGN + 1  # more than the whole file system
    want = rf"needs \d+ more bytes for {slots} slots of 4096 bytes .* bytes are free"
    with pytest.raises(DiskSpaceError, match=want):
        DataFiles.create(folder, Geometry.of(4096, slots, 4))
    assert all(os.path.getsize(folder.data_path(f)) == 0 for f in range(4))


def test_a_file_size_limit_fails_preallocation_with_the_bytes(tmp_path):
    """EFBIG under RLIMIT_FSIZE (SIGXFSZ ignored), in a child process: the same path as ENOSPC."""
    code = textwrap.dedent(f"""
        import resource, signal
        from kvbm.errors import DiskSpaceError
        from kvbm.workers.disk.files import DataFiles, Geometry, InstanceDir
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        folder = InstanceDir({str(tmp_path)!r}, "a")
        folder.ensure()
        try:
            DataFiles.create(folder, Geometry.of(65536, 8, 2))
        except DiskSpaceError as err:
            print("DiskSpaceError:", err)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert "DiskSpaceError: cannot preallocate 262144 bytes for" in out.stdout
    assert "File too large" in out.stdout
