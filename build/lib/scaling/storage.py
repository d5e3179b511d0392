"""Where stage results live: a local directory (the default; also an NFS mount),
or any URI pyarrow opens (``s3://bucket/runs``, ``gs://...``, ``file:///...``).

Stages always compute in a local directory. For a URI that directory is a
scratch mirror on the node (``$SCALING_SCRATCH``, default ``$TMPDIR/scaling-<uid>``):
a stage's input is fetched into it, and its outputs (``final/model.pt``, then
``result.json`` as the "finished" mark) are published back. Checkpoints in
between travel through Ray Train's own storage, so a worker on a fresh node
resumes from ``ray.train.get_checkpoint()``.

S3-compatible endpoints (MinIO, moto) are reached through the standard
``AWS_ENDPOINT_URL`` environment variable, credentials through the usual AWS ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

from scaling.records import StageResult

Location = str | Path
RESULT = "result.json"
MODEL = "final/model.pt"


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


def _fs(location: Location) -> tuple[Any, str]:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(str(location))
    return fs, path


def read_text(location: Location, file: str) -> str | None:
    """A small file's text, or None if it does not exist."""
    if not is_uri(location):
        local = Path(location, file)
        return local.read_text() if local.exists() else None
    import pyarrow.fs

    fs, path = _fs(location)
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
    fs, path = _fs(location)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{file}") as f:
        f.write(text.encode())


def write_bytes(location: Location, file: str, data: bytes) -> None:
    """One file written whole (a figure, a report)."""
    if not is_uri(location):
        from scaling.atomic import atomic_write

        atomic_write(Path(location, file), lambda f: f.write(data))
        return
    fs, path = _fs(location)
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

    fs, path = _fs(location)
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

    fs, path = _fs(location)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)


def download_dir(location: Location, target: Path) -> None:
    """Copy a directory to ``target`` (a new local path), whole or not at all."""
    import pyarrow.fs

    tmp = target.with_name(f".{target.name}.{os.getpid()}.download")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)  # pyarrow creates no local directory itself
    fs, path = _fs(location) if is_uri(location) else (pyarrow.fs.LocalFileSystem(),
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
    fs, path = _fs(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(f"{path}/{file}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_local_result(stage_dir: Path) -> StageResult | None:
    """A finished stage's result, or None where there is none. A result.json that
    does not parse, or whose final/model.pt is missing or fails its sha256, is set
    aside (result.json.corrupt) with a warning naming the file: the stage then runs
    again from its last checkpoint instead of handing a corrupt model on."""
    path = stage_dir / "result.json"
    if not path.exists():
        return None
    try:
        result: StageResult = json.loads(path.read_text())
        problem = _model_problem(stage_dir / "final" / "model.pt", result["model_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"{path} is unreadable ({type(e).__name__}: {e})"
    if problem is None:
        return result
    print(f"warning: {problem}; the stage is recomputed from its last checkpoint",
          file=sys.stderr, flush=True)
    with contextlib.suppress(FileNotFoundError):  # another worker set it aside first
        os.replace(path, path.with_name("result.json.corrupt"))
    return None


# sha256 of final models already verified, by (path, mtime, size): a sweep looks
# at a finished stage many times and a large model takes seconds to hash.
_verified: dict[tuple[str, int, int], str] = {}


def _model_problem(model: Path, expected: str) -> str | None:
    try:
        st = model.stat()
    except FileNotFoundError:
        return f"{model} is missing"
    key = (str(model), st.st_mtime_ns, st.st_size)
    if key not in _verified:
        _verified[key] = sha256(model.read_bytes())
    if _verified[key] != expected:
        return f"{model} does not match its result.json's sha256 (truncated or corrupt)"
    return None


def stage_location(root: Location, stage: str, key: str) -> Location:
    """A stage run's directory under ``root``: ``<stage>-<key>`` (registry.stage_key)."""
    return join(root, f"{stage}-{key}")


def read_result(location: Location) -> StageResult | None:
    if not is_uri(location):
        return read_local_result(Path(location))
    text = read_text(location, RESULT)
    if text is None:
        return None
    try:
        return cast(StageResult, json.loads(text))
    except ValueError as e:  # the model's sha256 is checked where it is fetched
        print(f"warning: {join(location, RESULT)} is unreadable ({e}); the stage is "
              "recomputed", file=sys.stderr, flush=True)
        delete(location, RESULT)
        return None


def fetch(location: Location) -> Path:
    """A finished stage's result and final models, as a local directory."""
    local = local_dir(location)
    if not is_uri(location) or read_local_result(local) == read_result(location):
        return local
    import pyarrow.fs

    fs, path = _fs(location)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.fetch")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "final").mkdir(parents=True)
    # result.json first: the model it describes is at least as new (publish writes
    # the model first), and load_final_models checks the pair by sha256.
    for file in (RESULT, MODEL):
        pyarrow.fs.copy_files(f"{path}/{file}", str(tmp / file), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(local)
    except OSError:  # a mirror is there already: another worker on this node, or stale
        if read_local_result(local) != read_result(location):
            shutil.rmtree(local, ignore_errors=True)
            tmp.rename(local)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return local


def publish(local: Path, location: Location) -> None:
    """Upload a finished stage's outputs; result.json last, so it marks completion."""
    if not is_uri(location):
        return
    import pyarrow.fs

    fs, path = _fs(location)
    fs.create_dir(f"{path}/final", recursive=True)
    for file in (MODEL, RESULT):
        pyarrow.fs.copy_files(str(local / file), f"{path}/{file}", destination_filesystem=fs,
                              source_filesystem=pyarrow.fs.LocalFileSystem())


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
