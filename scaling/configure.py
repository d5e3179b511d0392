"""From YAML, presets and ``--set`` overrides to a validated ``ExperimentConfig``, and
its hash; the schema itself (the dataclasses and their reasons) is ``scaling.config``.

``load_config`` validates while it builds: an unknown key, a wrong type or an
out-of-range value raises ``ConfigError`` naming the full key path, the value and
what is allowed. ``resolve`` turns a preset name or a path into a file; every
entry point (the pipeline, the studies, bench/) reads its configuration through
this module and only parses its own argv.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from scaling.config import (
    ConfigError,
    ConfigFileError,
    ExperimentConfig,
    check,
    did_you_mean,
    same_fraction,
)

PRESETS = Path(__file__).resolve().parent.parent / "configs"


class _Loader(yaml.SafeLoader):
    """YAML as researchers write it: ``1e-3`` is a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str, source: str) -> Any:
    """``text`` parsed; a syntax error names ``source`` (a file, a flag) and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigFileError(source, f"{source}{where}: not valid YAML ({problem})") from None


def read_yaml(path: str | os.PathLike[str]) -> Any:
    return parse_yaml(Path(path).read_text(), str(path))



# FractionSettings field -> the finetune key it replaces.
PER_FRACTION_KEYS = {"head_layer": "finetune.head_layer", "epochs": "finetune.epochs",
                     "base_lr": "finetune.optim.base_lr", "min_steps": "finetune.min_steps",
                     "subset_file": "finetune.subset_file"}


def check_per_fraction_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> None:
    """An override of a key that ``finetune.per_fraction`` sets for some fraction would
    be silently replaced there: stop instead, naming both."""
    for name, key in PER_FRACTION_KEYS.items():
        if key not in overrides:
            continue
        covered = [f for f, s in cfg.finetune.per_fraction.items()
                   if getattr(s, name) is not None]
        if covered:
            raise ConfigError(
                key, overrides[key],
                f"not with finetune.per_fraction setting {name} for fractions "
                f"{', '.join(f'{f:g}' for f in covered)}: set it there (e.g. "
                f"finetune.per_fraction='{{{covered[0]:g}: {{{name}: ...}}}}'), or clear it "
                "with finetune.per_fraction={}")


def resolve_fraction(cfg: ExperimentConfig, keep: tuple[str, ...] = ()) -> ExperimentConfig:
    """``cfg`` with ``finetune.per_fraction``'s entry for ``finetune.label_fraction``
    written into the fine-tuning fields, and ``per_fraction`` emptied: so a stage's
    key and recorded config hold the settings it ran, and one fraction's settings
    never change another's key. Dotted keys in ``keep`` (a study's axes) win."""
    ft = cfg.finetune
    if not ft.per_fraction:
        return cfg
    overrides: dict[str, Any] = {"finetune.per_fraction": {}}
    if ft.label_fraction is not None:
        match = [s for f, s in ft.per_fraction.items() if same_fraction(f, ft.label_fraction)]
        for name, key in PER_FRACTION_KEYS.items():
            value = getattr(match[0], name) if match else None
            if value is not None and key not in keep:
                overrides[key] = value
    return with_overrides(cfg, overrides)


def fraction_configs(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """One configuration per label fraction, its ``finetune.per_fraction`` settings resolved."""
    if not cfg.label_fractions:
        return [resolve_fraction(cfg)]
    return [resolve_fraction(with_overrides(cfg, {"finetune.label_fraction": f,
                                                  "finetune.labels_per_class": None}))
            for f in cfg.label_fractions]


T = TypeVar("T")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is Literal:
        check(value in args, key, value, "one of " + ", ".join(repr(a) for a in args)
              + did_you_mean(value, [str(a) for a in args]))
        return value
    if origin is tuple:
        check(isinstance(value, list | tuple), key, value, "a list")
        item = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
        check(len(value) == len(args), key, value, f"a list of {len(args)} values")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in pairs)
    if origin is dict:
        check(isinstance(value, dict), key, value, "a mapping")
        key_type, item = args
        out = {}
        for k, v in value.items():
            if key_type is float and isinstance(k, str):
                try:  # YAML reads `1.0e-2:` as a string key in places; JSON keys are strings
                    k = float(k)
                except ValueError:
                    raise ConfigError(f"{key}[{k!r}]", k, "a number as the key") from None
            k = _convert(key_type, k, f"{key}[{k!r}]")
            out[k] = _convert(item, v, f"{key}[{k!r}]")
        return out
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, value, f"a mapping of {tp.__name__} fields")
        return from_dict(tp, value, key)
    if tp is bool:
        check(isinstance(value, bool), key, value, "true or false")
    elif tp is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
    elif tp is float:
        check(isinstance(value, int | float) and not isinstance(value, bool), key, value,
              "a number")
        return float(value)
    elif tp is str:
        check(isinstance(value, str), key, value, "a string")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, validating every key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            path = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(path, data[key], f"known keys here: {', '.join(names)}"
                              + did_you_mean(key, names))
    kwargs = {
        k: _convert(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.under(prefix) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    """A short, stable content hash: equal configs name equal runs."""
    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        raise TypeError(f"cannot hash {type(obj).__name__}")

    blob = json.dumps(cfg, default=plain, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def with_overrides(cfg: T, overrides: dict[str, Any]) -> T:
    """Return ``cfg`` with dotted keys replaced, e.g. {"pretrain.epochs": 5}; re-validated."""
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
            check(isinstance(node[p], dict), dotted, value, "a key inside a section")
            node = node[p]
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> (
    ExperimentConfig
):
    """Read a YAML experiment config; missing keys take the dataclass defaults."""
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError("<root>", data, f"a mapping at the top of {path}")
    cfg = from_dict(ExperimentConfig, data)
    if not overrides:
        return cfg
    cfg = with_overrides(cfg, overrides)
    check_per_fraction_overrides(cfg, overrides)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as a mapping of dotted keys to YAML-parsed values."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError("--set", item, "KEY=VALUE, e.g. pretrain.epochs=5")
        key, value = item.split("=", 1)
        out[key] = parse_yaml(value, f"--set {key}")
    return out


def resolve(config: str) -> Path:
    """A YAML path as given, or the preset ``configs/<config>.yaml``."""
    path = Path(config)
    if path.exists():
        return path
    preset = PRESETS / f"{config}.yaml"
    if preset.exists():
        return preset
    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    raise ConfigError("config", config, f"a YAML file or a preset: {', '.join(names)}"
                      + did_you_mean(config, names))


# The GPU presets' lanes, sized by the dry run's memory plan (docs/cluster.md).
# CIFAR-10: one GPU a lane; the largest cell (R50 1x +SK, batch 1,024) needs 41.4 GiB,
# which the 48 GB L40S of cluster/gpu.yaml's gpu-1x holds without checkpointing.
# Its worker asks for GPU_1X, which only gpu-1x nodes offer: a 1-GPU lane never holds
# an 8-GPU node (pass --set runtime.node_resource=null on clusters without it).
CIFAR_LANE: dict[str, Any] = {"runtime.gpus_per_worker": 1, "runtime.node_resource": "GPU_1X"}
# ImageNet: 16 GPUs a lane (two 8x A100 80 GB nodes) with activation checkpointing:
# batch 4,096 is 256 a GPU, and R152 2x +SK pretraining needs 55 GiB of the 80. On 8
# GPUs even checkpointed it needs 102 GiB; unchecked on 16, 145. Loader workers per
# GPU: cpus_per_worker - 1 (a node's 96 vCPUs over 8 GPUs, one core for the loop).
IMAGENET_LANE: dict[str, Any] = {
    "runtime.workers": 16, "runtime.gpus_per_worker": 1, "runtime.cpus_per_worker": 12,
    "runtime.activation_checkpointing": True}
