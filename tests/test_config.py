import dataclasses

import pytest

from scaling.config import ConfigError, ExperimentConfig, FinetuneConfig, ModelConfig
from scaling.configure import config_hash, load_config, with_overrides


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_maps_onto_dataclasses(tmp_path):
    cfg = load_config(write(tmp_path, """
name: tiny
model: {depth: 18, width: 0.0625, sk_ratio: 0.0625}
pretrain:
  epochs: 2
  optim: {name: sgd, base_lr: 1}
distill:
  student: {depth: 18, width: 0.03125}
"""))
    assert cfg.model == ModelConfig(depth=18, width=0.0625, sk_ratio=0.0625)
    assert cfg.pretrain.epochs == 2 and cfg.pretrain.optim.base_lr == 1.0
    assert isinstance(cfg.pretrain.optim.base_lr, float)
    assert cfg.distill.student.width == 0.03125
    assert cfg.head.num_layers == 3  # defaults fill the rest
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ("model: {depht: 50}", "model.depht", "known keys here: depth"),
    ("model: {depth: 42}", "model.depth", "one of [18, 34, 50, 101, 152, 200]"),
    ("model: {width: 0}", "model.width", "0 < width <= 8"),
    ("pretrain: {optim: {lr_scaling: cubic}}", "pretrain.optim.lr_scaling", "'linear', 'sqrt'"),
    ("pretrain: {epochs: '10'}", "pretrain.epochs", "an integer"),
    ("pretrain: {global_bn: 1}", "pretrain.global_bn", "true or false"),
    ("pretrain: {augment: {color_p: 1.5}}", "pretrain.augment.color_p", "[0, 1]"),
    ("finetune: {label_fraction: 0}", "finetune.label_fraction", "(0, 1]"),
    ("finetune: {labels_per_class: 13}", "finetune.label_fraction", "exactly one"),
    ("head: {num_layers: 2}\nfinetune: {head_layer: 3}", "finetune.head_layer", "0..head"),
    ("data: {name: mnist}", "data.name", "'fashion-mnist'"),
    ("data: {download: true}", "data.download", "data.root"),
    ("distill: {student: {depth: 7}}", "distill.student.depth", "one of"),
    ("model: 5", "model", "a mapping of ModelConfig"),
])
def test_bad_values_name_key_value_and_allowed(tmp_path, text, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert err.value.key == key
    assert fragment in str(err.value)
    assert str(err.value).startswith(f"{key}=")


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_overrides_revalidate():
    cfg = ExperimentConfig()
    new = with_overrides(cfg, {"pretrain.epochs": 3, "distill.student.depth": 18})
    assert new.pretrain.epochs == 3 and new.distill.student.depth == 18
    assert cfg.pretrain.epochs != 3
    with pytest.raises(ConfigError, match="pretrain.epochs=0"):
        with_overrides(cfg, {"pretrain.epochs": 0})


def test_hash_is_stable_and_content_based():
    a, b = ExperimentConfig(), ExperimentConfig()
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(with_overrides(a, {"seed": 1}))


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="labels_per_class"):
        FinetuneConfig(label_fraction=None, labels_per_class=0)
