"""Checkpoints: the contract between stages and the unit of resumption.

Layout of one stage directory (documented in docs/checkpoints.md):

    checkpoints/step-000000120/state.pt   model/optimiser/queue/RNG state dicts
    checkpoints/step-000000120/meta.json  step, epoch, sha256 of state.pt, history
    final/model.pt                        unwrapped state dicts of the result
    result.json                           written last: the stage is finished

Every file is written atomically and every checkpoint directory appears by one
rename, so a kill leaves either the previous checkpoint or the new one. Loading
verifies the sha256 and uses ``weights_only=True``; a corrupt latest checkpoint
is reported and the previous one is used.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scaling.atomic import atomic_write, atomic_write_text
from scaling.stage_result import CheckpointError, sha256


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    stage_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int = 2
) -> Path:
    """Write ``state`` (tensors, dicts, numbers) and ``meta`` (JSON) as step ``step``."""
    root = stage_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = root / f".step-{step:09d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    data = _to_bytes(state)
    atomic_write(tmp / "state.pt", lambda f: f.write(data))
    meta = {**meta, "step": step, "sha256": sha256(data)}
    atomic_write_text(tmp / "meta.json", json.dumps(meta))
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_dir(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load one checkpoint directory, verifying its checksum. Raises CheckpointError."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        data = (path / "state.pt").read_bytes()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if sha256(data) != meta.get("sha256"):
        raise CheckpointError(f"{path}: state.pt does not match its sha256 (truncated or corrupt)")
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means corrupt
        raise CheckpointError(f"{path}: state.pt does not load ({e})") from None
    return state, meta


def latest_checkpoint(stage_dir: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The newest checkpoint that verifies; older ones are the fallback."""
    for path in sorted((stage_dir / "checkpoints").glob("step-*"), reverse=True):
        try:
            return load_checkpoint_dir(path)
        except CheckpointError as e:
            print(f"warning: {e}; falling back to the previous checkpoint", file=sys.stderr)
    return None


def to_host(state: Any) -> Any:
    """A copy of ``state`` whose tensors are on the CPU and no longer change as
    training goes on (a GPU tensor's copy, or a CPU tensor's clone): what a writer on
    another thread may serialise while the next steps run."""
    from torch.utils._pytree import tree_map_only

    return tree_map_only(torch.Tensor, lambda t: t.detach().to("cpu", copy=True), state)


class BackgroundSaver:
    """Writes one checkpoint at a time on a thread of its own (serialise, hash, write,
    fsync, prune): the training loop only waits for the copy to the host. A second
    save waits for the first; ``wait`` returns the last one's path (or raises its
    error). The thread is not a daemon: a stage that fails after a save still
    finishes writing it before the process exits."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._path: Path | None = None
        self._error: BaseException | None = None

    def submit(self, save: Callable[[], Path]) -> None:
        self.wait()

        def run() -> None:
            try:
                self._path = save()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._error = e

        self._path = None
        self._thread = threading.Thread(target=run, name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> Path | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._path
