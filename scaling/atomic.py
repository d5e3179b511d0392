"""Atomic file writes: write a temporary sibling, fsync, then rename over the target.

A reader (or a process restarted after a kill) sees either the old file or the
complete new one, never a partial write. The file gets the mode any other new file
would (0666 less the umask): mkstemp's 0600 would hide results from a colleague
on shared storage.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def _umask() -> int:
    # Linux reports it without changing it; os.umask can only read by setting,
    # which races with other threads creating files.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class DiskFull(OSError):
    """A write that found no space (or no quota) left: names the folder and the file,
    so the message says where to free space. What was written before stays whole."""

    def __init__(self, target: Path, cause: OSError) -> None:
        super().__init__(cause.errno, f"no space left on the device holding {target.parent} "
                                      f"(writing {target.name}: {cause.strerror}); free space "
                                      "there and run the same command: everything finished "
                                      "before is kept", str(target))


FULL = (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        if e.errno in FULL:
            raise DiskFull(target, e) from None
        raise
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in FULL:
            raise DiskFull(target, e) from None
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))
