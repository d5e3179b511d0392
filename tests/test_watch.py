"""scaling.study.watch on a study folder: one snapshot, --follow until done, and
an exit status that says when Ray could not be reached."""

import hashlib
import json
import os
import threading

from scaling import storage
from scaling.study import watch


def _finish(stages, stage: str, key: str) -> None:
    where = storage.stage_location(str(stages), stage, key)
    model = os.path.join(where, "final", "model.pt")
    os.makedirs(os.path.dirname(model), exist_ok=True)
    with open(model, "wb") as f:
        f.write(b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    storage.write_text(where, "result.json", json.dumps({"model_sha256": sha, "top1": 0.5}))


def _study(tmp_path):
    study = tmp_path / "s" / "demo"
    study.mkdir(parents=True)
    runs = [["pretrain", "aaa"], ["finetune", "bbb"]]
    (study / "study.json").write_text(json.dumps({"study": "demo", "runs": runs}))
    _finish(tmp_path / "s" / "stages", "pretrain", "aaa")
    return study


def test_follow_refreshes_until_every_stage_run_has_finished(tmp_path, capsys):
    study = _study(tmp_path)
    assert watch.main([str(study)]) == 0  # one snapshot, even while unfinished
    once = capsys.readouterr().out
    assert "1/2 stage runs finished" in once and "finetune-bbb: waiting" in once

    later = threading.Timer(0.5, _finish, (tmp_path / "s" / "stages", "finetune", "bbb"))
    later.start()
    assert watch.main([str(study), "--follow", "0.05"]) == 0  # returns by itself once done
    later.join()
    snapshots = capsys.readouterr().out.split("--- ")[1:]  # into a pipe: stamped, in turn
    assert len(snapshots) >= 2 and "1/2 stage runs finished" in snapshots[0], snapshots
    assert "2/2 stage runs finished" in snapshots[-1]


def test_ray_unreachable_exits_1_and_a_folder_that_is_no_study_exits_2(tmp_path, capsys,
                                                                       monkeypatch):
    fake = tmp_path / "bin" / "ray"  # a `ray` CLI that finds no cluster, as Ray's does
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'ConnectionError: Could not find any running Ray "
                    "instance.' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert watch.main([str(_study(tmp_path)), "--ray"]) == 1
    err = capsys.readouterr().err
    assert "ray status failed: ConnectionError: Could not find any running Ray" in err
    assert watch.main([str(tmp_path), "--follow", "0.05"]) == 2
    assert "holds no study.json" in capsys.readouterr().err


def test_a_finished_study_gets_a_summary_and_table_gives_every_row(tmp_path, capsys):
    """Issue 37: a finished study printed a raw 108-row table with NaNs and seconds to
    6 decimals."""
    import pandas as pd

    study = _study(tmp_path)
    _finish(tmp_path / "s" / "stages", "finetune", "bbb")
    pd.DataFrame([
        {"cell": "c1", "stage": "pretrain", "status": "executed", "train_seconds": 100.123456,
         "finetune.label_fraction": 0.01},
        {"cell": "c1", "stage": "finetune", "status": "executed", "top1": 0.7012,
         "val_top1": 0.7, "train_seconds": 20.5, "finetune.label_fraction": 0.01},
        {"cell": "c2", "stage": "finetune", "status": "reused", "top1": 0.8,
         "val_top1": 0.79, "train_seconds": 25.0, "finetune.label_fraction": 0.1},
    ]).to_csv(study / "results.csv", index=False)
    assert watch.main([str(study)]) == 0
    out = capsys.readouterr().out
    assert "2 cells, 3 (cell, stage) rows: 2 executed, 1 reused; 0.03 h" in out
    assert "1%" in out and "10%" in out and "70.1" in out and "80.0" in out
    assert "nan" not in out.lower() and "100.123456" not in out and "--table" in out
    assert watch.main([str(study), "--table"]) == 0
    rows = capsys.readouterr().out
    assert "100.123456" not in rows and " 100" in rows and "-" in rows and "NaN" not in rows
