"""A stage result: the one owner of its format. A finished stage directory holds

    final/model.pt    the unwrapped state dicts of the result (torch, weights only)
    result.json       metrics, protocol, history, config; written last, with the
                      model's sha256: the stage is finished when it is there

This module writes it (``write_result``), reads and verifies it (``read_result``,
``read_local_result``: a result whose model fails its sha256 is set aside and the
stage runs again), loads the models (``load_final_models``), moves it between a
node and a URI (``fetch``, ``publish``), and turns its history into tidy curve rows
(``curve_rows``: what the sweep's curves.csv holds). Nothing else opens these files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from scaling import storage
from scaling.atomic import atomic_write, atomic_write_text
from scaling.records import StageResult
from scaling.storage import Location

RESULT = "result.json"
MODEL = "final/model.pt"
CURVES = ("loss", "lr", "images_per_s")  # what each history point holds besides its step


class CheckpointError(RuntimeError):
    """A checkpoint or final model that is missing, or fails its sha256."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_result(stage_dir: Path, models: dict[str, Any], result: Mapping[str, Any]
                 ) -> StageResult:
    """Save the final unwrapped state dicts, then result.json (the 'finished' mark)."""
    import torch

    buf = io.BytesIO()
    torch.save(models, buf)
    data = buf.getvalue()
    atomic_write(stage_dir / MODEL, lambda f: f.write(data))
    text = json.dumps({**result, "model_sha256": sha256(data)}, indent=1, sort_keys=True)
    atomic_write_text(stage_dir / RESULT, text)
    written: StageResult = json.loads(text)  # callers see exactly what a re-run reads
    return written


def read_local_result(stage_dir: Path) -> StageResult | None:
    """A finished stage's result, or None where there is none. A result.json that
    does not parse, or whose final/model.pt is missing or fails its sha256, is set
    aside (result.json.corrupt) with a warning naming the file: the stage then runs
    again from its last checkpoint instead of handing a corrupt model on."""
    path = stage_dir / RESULT
    if not path.exists():
        return None
    try:
        result: StageResult = json.loads(path.read_text())
        problem = _model_problem(stage_dir / MODEL, result["model_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"{path} is unreadable ({type(e).__name__}: {e})"
    if problem is None:
        return result
    _set_aside(stage_dir, problem)
    return None


def _set_aside(stage_dir: Path, problem: str) -> None:
    print(f"warning: {problem}; the stage is recomputed from its last checkpoint",
          file=sys.stderr, flush=True)
    path = stage_dir / RESULT
    with contextlib.suppress(FileNotFoundError):  # another worker set it aside first
        os.replace(path, path.with_name("result.json.corrupt"))


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


def read_result(location: Location) -> StageResult | None:
    if not storage.is_uri(location):
        return read_local_result(Path(location))
    text = storage.read_text(location, RESULT)
    if text is None:
        return None
    try:
        return cast(StageResult, json.loads(text))
    except ValueError as e:  # the model's sha256 is checked where it is fetched
        print(f"warning: {storage.join(location, RESULT)} is unreadable ({e}); the stage is "
              "recomputed", file=sys.stderr, flush=True)
        storage.delete(location, RESULT)
        return None


def fetch(location: Location) -> Path:
    """A finished stage's result and final models, as a local directory."""
    local = storage.local_dir(location)
    if not storage.is_uri(location) or read_local_result(local) == read_result(location):
        return local
    import pyarrow.fs

    fs, path = storage.filesystem(location)
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
    if not storage.is_uri(location):
        return
    import pyarrow.fs

    fs, path = storage.filesystem(location)
    fs.create_dir(f"{path}/final", recursive=True)
    for file in (MODEL, RESULT):
        pyarrow.fs.copy_files(str(local / file), f"{path}/{file}", destination_filesystem=fs,
                              source_filesystem=pyarrow.fs.LocalFileSystem())


def load_final_models(stage_dir: Path) -> dict[str, Any]:
    """The finished stage's state dicts, verified against result.json's sha256 (the
    bytes loaded are the bytes hashed) and loaded with ``weights_only=True``."""
    import torch

    try:
        result = json.loads((stage_dir / RESULT).read_text())
        data = (stage_dir / MODEL).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{stage_dir} has no result.json or final/model.pt: the stage "
                              "has not finished") from None
    digest = sha256(data)
    if digest != result.get("model_sha256"):
        problem = f"{stage_dir / MODEL} does not match its result.json's sha256"
        _set_aside(stage_dir, problem)
        raise CheckpointError(f"{problem}: the stage is unfinished (result.json set aside)")
    st = (stage_dir / MODEL).stat()
    _verified[(str(stage_dir / MODEL), st.st_mtime_ns, st.st_size)] = digest
    models: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    return models


def curve_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run as tidy rows (step, metric, value): each history point's ``CURVES``,
    then, at the run's last step, its final metrics (the others: top-1s, probes,
    sizes, times). Non-finite values (a diverged loss) are left out."""
    def finite(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    rows = [{"step": int(p["step"]), "metric": k, "value": float(p[k])}
            for p in result.get("history", []) for k in CURVES if finite(p.get(k))]
    return rows + [{"step": int(result["step"]), "metric": k, "value": float(v)}
                   for k, v in result.get("metrics", {}).items()
                   if k not in CURVES and finite(v)]
