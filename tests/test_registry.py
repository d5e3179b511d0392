"""The stage registry: the one list every stage list derives from."""

import pytest

from scaling.configure import with_overrides
from scaling.stages.registry import ORDER, STAGES, stage_key, with_inputs
from scaling.study.plan import make_study, required_stages


def test_every_stage_starts_from_a_registered_earlier_stage():
    for name, spec in STAGES.items():
        assert spec.input is None or ORDER[spec.input] < ORDER[name]
    assert with_inputs(("distill",)) == ("pretrain", "finetune", "distill")
    assert with_inputs(["supervised", "finetune"]) == ("pretrain", "finetune", "supervised")
    with pytest.raises(ValueError, match="stage='probe'; allowed: pretrain, finetune"):
        with_inputs(("probe",))


def test_a_key_follows_its_input_stage_and_nothing_else(tiny):
    longer = with_overrides(tiny, {"pretrain.epochs": tiny.pretrain.epochs + 1})
    changed = {s for s in STAGES if stage_key(tiny, s) != stage_key(longer, s)}
    assert changed == {"pretrain", "finetune", "distill"}  # the baseline never pretrains
    runtime = with_overrides(tiny, {"runtime.log_every": 7, "runtime.workers": 3})
    assert all(stage_key(tiny, s) == stage_key(runtime, s) for s in STAGES)


def test_a_study_plans_the_stages_it_needs(tiny):
    study = make_study("s", tiny, {"width": [0.0625]}, ("distill",))
    assert required_stages(study) == ("pretrain", "finetune", "distill")


def test_unknown_stage_runs_nothing_and_says_what_there_is(tiny, tmp_path):
    from scaling.stages.registry import run

    with pytest.raises(ValueError, match="stage='probe'; allowed: pretrain, finetune, distill"):
        run("probe", tiny, tmp_path / "p")
    with pytest.raises(ValueError, match="needs its input stage directory \\(pretrain\\)"):
        run("finetune", tiny, tmp_path / "f")
    assert not (tmp_path / "p").exists() and not (tmp_path / "f").exists()
