"""A stage result's one owner (scaling.stage_result) and the study's curves.csv."""

import json

import pandas as pd
import pytest

from scaling import stage_result
from scaling.stages.registry import stage_runs
from scaling.study import training_curves
from scaling.study.training_curves import Curves


def test_curves_hold_every_run_and_every_lr_of_a_grid_read_once(tiny_chain, tmp_path,
                                                                  monkeypatch):
    cfg, root = tiny_chain
    runs = {(s, d.name.split("-", 1)[1]) for s, _, d in stage_runs(cfg, root)}
    study = tmp_path / "study"
    table = Curves(study, root)
    assert sorted(table.update(sorted(runs))) == sorted(runs)
    df = training_curves.read(study)
    assert set(zip(df["stage"], df["stage_key"], strict=True)) == runs
    for stage, key in runs:
        result = json.loads((root / f"{stage}-{key}" / "result.json").read_text())
        rows = df[(df["stage"] == stage) & (df["stage_key"] == key) & (df["lr"] == "")]
        loss = rows[rows["metric"] == "loss"]
        assert list(loss["step"]) == [p["step"] for p in result["history"]]
        assert list(loss["value"]) == pytest.approx([p["loss"] for p in result["history"]])
        final = rows[rows["step"] == result["step"]].set_index("metric")["value"]
        for k, v in result["metrics"].items():
            if v is not None and k not in stage_result.CURVES:
                assert final[k] == pytest.approx(v), (stage, k)
        grid = result["protocol"].get("lr_grid_val_top1") or {}
        assert sorted(set(df[(df["stage_key"] == key) & (df["lr"] != "")]["lr"])) == sorted(grid)
    assert any(stage == "supervised" for stage, _ in runs) and (df["lr"] == "0.2").any()

    # A second sweep invocation reads the table back and no stage run again.
    monkeypatch.setattr(stage_result, "read_result", lambda *a: pytest.fail("read again"))
    again = Curves(study, root)
    assert again.update(sorted(runs)) == []
    assert again.of(*sorted(runs)[0]) == table.of(*sorted(runs)[0])
    assert pd.read_csv(study / "curves.csv").shape[0] == len(df)


def test_an_unfinished_run_has_no_curves_yet(tiny_chain, tmp_path):
    cfg, root = tiny_chain
    (pre,) = root.glob("pretrain-*")
    (pre / "result.json").unlink()
    table = Curves(tmp_path / "study", root)
    assert table.update([("pretrain", pre.name.split("-", 1)[1])]) == []
    assert not (tmp_path / "study" / "curves.csv").exists()


def test_a_model_that_fails_its_sha256_is_not_loaded(tiny_chain):
    cfg, root = tiny_chain
    (pre,) = root.glob("pretrain-*")
    assert set(stage_result.load_final_models(pre)) >= {"encoder", "head"}
    model = pre / "final" / "model.pt"
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(stage_result.CheckpointError, match="sha256"):
        stage_result.load_final_models(pre)
    assert (pre / "result.json.corrupt").exists()  # set aside: the stage runs again
    assert stage_result.read_local_result(pre) is None


def test_each_cells_tensorboard_run_carries_its_axes_as_hparams(tmp_path):
    """Issue 37: runs could not be filtered by width or label fraction."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboardX import SummaryWriter

    from scaling.study.tracking import HPARAM_METRICS, write_hparams

    writer = SummaryWriter(str(tmp_path))
    write_hparams(writer, {"width": 0.0625, "label_fraction": 0.1, "replicate": 2,
                           "lr_grid": [0.1, 0.4]})
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info.hparams
    assert start["width"].number_value == 0.0625 and start["replicate"].number_value == 2
    assert start["label_fraction"].number_value == 0.1
    assert start["lr_grid"].string_value == "[0.1, 0.4]"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == set(HPARAM_METRICS)
