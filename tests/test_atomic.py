"""Atomic writes: all or nothing, and readable like any other new file."""

import os
import stat

import pytest

from scaling import storage
from scaling.atomic import atomic_write, atomic_write_text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_take_the_mode_the_umask_gives_any_new_file(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        written = atomic_write_text(tmp_path / "a" / "results.csv", "x\n")
        storage.write_text(str(tmp_path / "report"), "report.html", "<p>")
        (tmp_path / "plain").write_text("y")  # what open() would have made
    finally:
        os.umask(old)
    for path in (written, tmp_path / "report" / "report.html", tmp_path / "plain"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "results.csv", "old\n")

    def half_then_fail(f):
        f.write(b"new, half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]
