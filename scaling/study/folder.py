"""A study's folder in the storage holds one configuration's results.

``study.json`` records the grid (cells, their keys, the axes and the base
configuration): the report reads which cells belong to the study, and a run of
another configuration under the same name is refused naming what differs, instead
of replacing the results (``--name`` gives it a folder of its own; finished stage
runs are shared by every study in a storage, so nothing is computed twice).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from typing import Any

from scaling import storage
from scaling.config import ConfigFileError
from scaling.configure import to_dict
from scaling.storage import Location
from scaling.study import results
from scaling.study.plan import (
    SHORT,
    Study,
    cell_key,
    cells,
    distinct_runs,
    grid_hash,
    required_stages,
)


def study_record(study: Study) -> dict[str, Any]:
    """study.json: what the grid is (cells, their keys, the base configuration), for
    the report (which cells are missing), for provenance, and to tell studies apart."""
    grid = cells(study)
    base = {k: v for k, v in to_dict(study.base).items() if k not in ("runtime", "name")}
    record = {"study": study.name, "grid_hash": grid_hash(study),
            "cells": [c.id for c in grid], "keys": [cell_key(study, c) for c in grid],
            "stages": list(required_stages(study)),
            "runs": [[s, k] for s, keyed in distinct_runs(study).items() for k in keyed],
            "axes": {SHORT.get(k, k): list(v) for k, v in study.axes},
            "config": results.flatten(base),
            "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable),
                                                          *sys.argv]),
            "git_commit": results.git_commit()}
    return dict(json.loads(json.dumps(record)))  # as it reads back: tuples become lists


def with_primaries(study_dir: Location, record: dict[str, Any], primaries: list[str] | None,
                   sequential: dict[str, Any] | None = None) -> dict[str, Any]:
    """``record`` with the study's pre-registered primary findings (and the sequential
    design that tests them, if any): those already in its study.json (a resumed run
    keeps them), or ``primaries`` with the time and commit they were registered at.
    Registering them after the study has results, or changing them, is refused like
    any other configuration change: Holm's family and the looks' levels are fixed
    before the data they test."""
    text = storage.read_text(study_dir, "study.json")
    stored = json.loads(text) if text else {}
    old, old_design = stored.get("primaries"), stored.get("sequential")
    kept = {k: v for k, v in (("primaries", old), ("sequential", old_design)) if v}
    if primaries is None or (old and old.get("findings") == primaries
                             and (sequential is None or sequential == old_design)):
        return record | kept
    has_results = bool(storage.list_names(storage.join(study_dir, "cells"), ".json"))
    if old or has_results:
        was = ",".join(old["findings"]) if old else "none"
        raise StudyClash(f"{study_dir} holds results of the study {record['study']!r} with "
                         f"primary findings {was}"
                         + (" and a sequential design" if old_design else "")
                         + f"; --primary {','.join(primaries)}"
                         + (" with another sequential design" if sequential else "")
                         + " would choose the test after seeing data. Nothing was run or "
                         "written. Pass --name NEW for a new pre-registered study (new "
                         "replicates: --axis replicate=...)")
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = record | {"primaries": {"findings": primaries, "registered": now,
                                  "git_commit": record.get("git_commit")}}
    return out | ({"sequential": sequential} if sequential else {})


class StudyClash(ConfigFileError):
    """The study's folder holds the results of another configuration."""

    def __init__(self, message: str) -> None:
        super().__init__("--name", message)


def check_owner(study_dir: Location, record: dict[str, Any]) -> None:
    """A study folder holds one configuration's results. Another configuration under
    the same name stops here, naming what differs, before anything is written."""
    text = storage.read_text(study_dir, "study.json")
    if text is None:
        return
    try:
        old = json.loads(text)
    except ValueError as e:
        raise ConfigFileError("--name", f"{study_dir}/study.json does not parse ({e}); "
                              "restore or remove that file") from None
    same = (old.get("grid_hash") == record["grid_hash"] if "grid_hash" in old
            else old.get("cells") == record["cells"])  # written by an older version
    if same:
        return
    raise StudyClash(f"{study_dir} holds the study {record['study']!r} with another "
                     f"configuration ({difference(old, record)}); nothing was run or written. "
                     "Pass --name NEW to keep both (finished stage runs are shared: nothing "
                     "computed runs again), or use another --storage")


def difference(old: dict[str, Any], new: dict[str, Any], most: int = 4) -> str:
    """What differs between two study records, e.g. 'finetune.epochs 15 -> 2'."""
    out = []
    for part in ("axes", "config"):
        a, b = old.get(part, {}), new.get(part, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                label = f"axis {key}" if part == "axes" else key
                out.append(f"{label} {json.dumps(a.get(key, '-'))} -> "
                           f"{json.dumps(b.get(key, '-'))}")
    if not out:
        return "another grid"
    more = f", and {len(out) - most} more" if len(out) > most else ""
    return "; ".join(out[:most]) + more
