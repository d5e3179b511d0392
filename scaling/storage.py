"""Where stage results live: a local directory (the default; also an NFS mount),
or any URI pyarrow opens (``s3://bucket/runs``, ``gs://...``, ``file:///...``).
What a stage result is, and how it is written, read, verified, fetched and
published, is ``scaling.stage_result``'s.

Stages always compute in a local directory. For a URI that directory is a
scratch mirror on the node (``$SCALING_SCRATCH``, default ``$TMPDIR/scaling-<uid>``):
a stage's input is fetched into it, and its outputs are published back. Checkpoints in
between travel through Ray Train's own storage, so a worker on a fresh node
resumes from ``ray.train.get_checkpoint()``.

S3-compatible endpoints (MinIO, moto) are reached through the standard
``AWS_ENDPOINT_URL`` environment variable, credentials through the usual AWS ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

Location = str | Path


def is_uri(location: Location) -> bool:
    return isinstance(location, str) and "://" in location


def parse(text: str) -> Location:
    """A location from its text form (a CLI argument, a Ray config value)."""
    return text if is_uri(text) else Path(text)


def join(location: Location, *parts: str) -> Location:
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return Path(location, *parts)


def parent(location: Location) -> Location:
    if is_uri(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return Path(location).parent


def name(location: Location) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def absolute(location: Location) -> Location:
    return location if is_uri(location) else Path(location).resolve()


def scratch_root() -> Path:
    default = Path(tempfile.gettempdir()) / f"scaling-{os.getuid()}"
    return Path(os.environ.get("SCALING_SCRATCH", default))


def local_dir(location: Location) -> Path:
    """The directory a stage computes in: the location itself, or its node-local mirror."""
    if not is_uri(location):
        return Path(location)
    digest = hashlib.sha256(str(location).encode()).hexdigest()[:12]
    return scratch_root() / digest / name(location)


def filesystem(location: Location) -> tuple[Any, str]:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(str(location))
    return fs, path


def read_text(location: Location, file: str) -> str | None:
    """A small file's text, or None if it does not exist."""
    if not is_uri(location):
        local = Path(location, file)
        return local.read_text() if local.exists() else None
    import pyarrow.fs

    fs, path = filesystem(location)
    target = f"{path}/{file}"
    if fs.get_file_info(target).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(target) as f:
        return bytes(f.read()).decode()


def write_text(location: Location, file: str, text: str) -> None:
    """One object written whole (object stores make single puts atomic)."""
    if not is_uri(location):
        from scaling.atomic import atomic_write_text

        atomic_write_text(Path(location, file), text)
        return
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{file}") as f:
        f.write(text.encode())


def write_bytes(location: Location, file: str, data: bytes) -> None:
    """One file written whole (a figure, a report)."""
    if not is_uri(location):
        from scaling.atomic import atomic_write

        atomic_write(Path(location, file), lambda f: f.write(data))
        return
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{file}") as f:
        f.write(data)


def list_names(location: Location, suffix: str = "") -> list[str]:
    """Names of the files directly in ``location`` ending with ``suffix``, sorted;
    none where it does not exist."""
    if not is_uri(location):
        folder = Path(location)
        if not folder.is_dir():
            return []
        return sorted(f.name for f in folder.iterdir() if f.is_file() and
                      f.name.endswith(suffix) and not f.name.startswith("."))
    import pyarrow.fs

    fs, path = filesystem(location)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos
                  if i.type == pyarrow.fs.FileType.File and i.base_name.endswith(suffix))


def list_dirs(location: Location) -> list[str]:
    """Names of the directories directly in ``location``, sorted; none where it
    does not exist."""
    if not is_uri(location):
        folder = Path(location)
        return sorted(f.name for f in folder.iterdir() if f.is_dir()) if folder.is_dir() else []
    import pyarrow.fs

    fs, path = filesystem(location)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)


def download_dir(location: Location, target: Path) -> None:
    """Copy a directory to ``target`` (a new local path), whole or not at all."""
    import pyarrow.fs

    tmp = target.with_name(f".{target.name}.{os.getpid()}.download")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)  # pyarrow creates no local directory itself
    fs, path = filesystem(location) if is_uri(location) else (pyarrow.fs.LocalFileSystem(),
                                                       str(location))
    pyarrow.fs.copy_files(path, str(tmp), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    try:
        tmp.rename(target)
    except OSError:  # another worker on this node got it first
        shutil.rmtree(tmp, ignore_errors=True)


def delete(location: Location, file: str) -> None:
    if not is_uri(location):
        Path(location, file).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(f"{path}/{file}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stage_location(root: Location, stage: str, key: str) -> Location:
    """A stage run's directory under ``root``: ``<stage>-<key>`` (registry.stage_key)."""
    return join(root, f"{stage}-{key}")


def check_writable(location: Location, key: str) -> None:
    """Fail before any work if ``location`` cannot be written; ``key`` names the flag.
    Raises ConfigError (scaling.config) naming the location and why."""
    from scaling.config import ConfigError

    probe = f".write-probe-{os.getpid()}"
    try:
        write_text(location, probe, "ok")
        delete(location, probe)
    except OSError as e:
        raise ConfigError(key, str(location), "a directory or URI this machine can write "
                          f"({type(e).__name__}: {e})") from None
