"""The stage registry: each stage's name, the stage whose result it starts from,
the settings its key hashes, the function that runs it, its FLOP formula, the
metrics it reports, and whether it runs per label fraction. Every list of stages
(the pipeline's chain, a study's plan and dependencies, the results' order and
columns, the estimates, bench/throughput.py) derives from ``STAGES``; adding a stage
is one entry here. ``run`` is the one way to run a stage.

A stage's key is a hash of exactly what it depends on (runtime settings never
count), its input stage's key included: equal keys name equal runs, which is what
dedup, reuse and resume rest on. The stage modules are imported when a stage runs,
so planning a study does not load them (nor torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaling import stage_result, storage
from scaling.catalog import CATALOG
from scaling.config import DataConfig, ExperimentConfig, ModelConfig
from scaling.configure import config_hash, fraction_configs
from scaling.records import StageResult
from scaling.storage import Location

if TYPE_CHECKING:  # torch; only a running stage needs it
    from scaling.stages.stage_run import StageInputs
    from scaling.train.env import Env


# Metrics every stage run reports (scaling.stages.stage_run.finish, or its own).
TRAINING_METRICS = ("params", "params_with_head", "forward_flops_per_image", "images_per_s",
                    "train_seconds", "wall_seconds", "peak_memory_bytes", "final_loss")
CLASSIFIER_METRICS = ("test_top1", "val_top1")  # a classifier's top-1, test and validation


@dataclass(frozen=True)
class Stage:
    """One stage: how it runs, what it reads, what its key hashes, what it costs and
    reports. Every list of stages, every key, FLOP estimate and results column reads
    these entries."""

    name: str
    input: str | None  # the stage whose result directory it starts from
    # What its key hashes besides the seed, the model and the data.
    depends: Callable[[ExperimentConfig], dict[str, Any]]
    function: Callable[[StageInputs], StageResult]
    # Training FLOPs of one run, given the forward FLOPs per image of a model on the
    # run's data (scaling.study.plan.stage_flops supplies them).
    flops: Callable[[ExperimentConfig, Callable[[ModelConfig], float]], float]
    metrics: tuple[str, ...]  # the result.json metrics it reports
    per_fraction: bool  # once per label fraction (pretraining: once for all)
    # False: the key hashes the data and ``depends`` only, no seed and no model (the
    # pixel arm: one run serves every model and seed with the same labels).
    keyed_on_model: bool = True
    # Images one training step passes through the network; None: no network and no
    # training step (no memory plan, no rate).
    step_images: Callable[[ExperimentConfig], int] | None = None
    # The network it trains and the data it trains on (distillation: the student, on
    # its unlabelled set), for the speed estimate.
    network: Callable[[ExperimentConfig], ModelConfig] = lambda c: c.model
    trains_on: Callable[[ExperimentConfig], DataConfig] = lambda c: c.data

    @property
    def trains(self) -> bool:
        return self.step_images is not None


def _labels(cfg: ExperimentConfig) -> dict[str, Any]:
    ft = cfg.finetune
    labels = {"fraction": ft.label_fraction, "per_class": ft.labels_per_class,
              "seed": ft.subset_seed}
    # Only where set, so the keys of runs without a subset file stay what they were.
    return labels | ({"file": ft.subset_file} if ft.subset_file is not None else {})


# The functions: each imports its module when a stage runs, so that planning a study
# (this registry, the keys, the FLOPs) never loads torch.
def _pretrain(job: StageInputs) -> StageResult:
    from scaling.stages.pretrain import pretrain

    return pretrain(job)


def _finetune(job: StageInputs) -> StageResult:
    from scaling.stages.finetune import finetune

    return finetune(job)


def _distill(job: StageInputs) -> StageResult:
    from scaling.stages.distill import distill

    return distill(job)


def _supervised(job: StageInputs) -> StageResult:
    from scaling.stages.finetune import supervised

    return supervised(job)


def _pixels(job: StageInputs) -> StageResult:
    from scaling.stages.pixels import pixels

    return pixels(job)


# FLOP formulas: 3x forward per image per pass (forward and backward), on the training
# images outside validation; the projection head is ignored (small).
def _train_images(data: DataConfig, validation: bool = True) -> int:
    return CATALOG[data.name].images - (data.resolved_val_size() if validation else 0)


def _pretrain_flops(cfg: ExperimentConfig, fwd: Callable[[ModelConfig], float]) -> float:
    return 3 * fwd(cfg.model) * 2 * _train_images(cfg.data) * cfg.pretrain.epochs


def _classifier_flops(stage: str) -> Callable[[ExperimentConfig, Callable[[ModelConfig], float]],
                                              float]:
    def flops(cfg: ExperimentConfig, fwd: Callable[[ModelConfig], float]) -> float:
        s = cfg.finetune if stage == "finetune" else cfg.supervised
        fraction = cfg.finetune.label_fraction or 1.0
        steps = max(fraction * _train_images(cfg.data) * s.epochs, s.min_steps * s.batch_size)
        return max(1, len(s.lr_grid)) * 3 * fwd(cfg.model) * steps  # one run per grid LR

    return flops


def _distill_flops(cfg: ExperimentConfig, fwd: Callable[[ModelConfig], float]) -> float:
    # The teacher's forward besides the student's training; another unlabelled set
    # is cropped to the teacher's input (scaling.stages.distill), and all of it is used.
    unl = cfg.distill.unlabelled or cfg.data
    n = _train_images(unl, validation=unl == cfg.data)
    dc = cfg.distill
    return (3 * fwd(cfg.student) + fwd(cfg.model)) * max(n * dc.epochs,
                                                        dc.min_steps * dc.batch_size)


def _pixels_flops(cfg: ExperimentConfig, fwd: Callable[[ModelConfig], float]) -> float:
    # No network: the ridge's Gram matrix and kNN's distances to validation.
    shape = CATALOG[cfg.data.name]
    side = min(cfg.data.image_size or shape.side, cfg.pixels.max_side)
    d = shape.channels * side * side
    labelled = (cfg.finetune.label_fraction or 1.0) * _train_images(cfg.data)
    return 2 * labelled * d * d + 2 * labelled * d * 2 * cfg.data.resolved_val_size()


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("pretrain", None, lambda c: {"head": c.head, "pretrain": c.pretrain,
                                       "evaluate": c.evaluate},
          _pretrain, _pretrain_flops,
          ("linear_top1", "linear_val_top1", "knn_top1", "knn_val_top1",
           # The same probes on raw pixels: the line a representation must beat.
           "pixel_linear_top1", "pixel_linear_val_top1", "pixel_knn_top1",
           "pixel_knn_val_top1", *TRAINING_METRICS),
          per_fraction=False, step_images=lambda c: 2 * c.pretrain.batch_size),
    Stage("finetune", "pretrain", lambda c: {"pretrained": stage_key(c, "pretrain"),
                                             "finetune": c.finetune},
          _finetune, _classifier_flops("finetune"),
          (*CLASSIFIER_METRICS, "labelled_examples", *TRAINING_METRICS),
          per_fraction=True, step_images=lambda c: c.finetune.batch_size),
    Stage("distill", "finetune", lambda c: {"teacher": stage_key(c, "finetune"),
                                            "distill": c.distill},
          _distill, _distill_flops,
          (*CLASSIFIER_METRICS, "teacher_test_top1", "teacher_val_top1", *TRAINING_METRICS),
          per_fraction=True, step_images=lambda c: c.distill.batch_size,
          network=lambda c: c.student, trains_on=lambda c: c.distill.unlabelled or c.data),
    Stage("supervised", None, lambda c: {"labels": _labels(c), "supervised": c.supervised},
          _supervised, _classifier_flops("supervised"),
          (*CLASSIFIER_METRICS, "labelled_examples", *TRAINING_METRICS),
          per_fraction=True, step_images=lambda c: c.supervised.batch_size),
    # The ridge classifier on the cell's labels beside the arm chosen on validation.
    Stage("pixels", None, lambda c: {"labels": _labels(c), "pixels": c.pixels},
          _pixels, _pixels_flops,
          (*CLASSIFIER_METRICS, "labelled_examples", "pixel_ridge_top1", "pixel_ridge_val_top1",
           "pixel_knn_top1", "pixel_knn_val_top1", *TRAINING_METRICS),
          per_fraction=True, keyed_on_model=False),
)}
ORDER = {name: i for i, name in enumerate(STAGES)}  # dependency order, for sorting


def stage(name: str) -> Stage:
    """The entry of ``name``; an unknown stage is an error naming the known ones."""
    if name not in STAGES:
        raise ValueError(f"stage={name!r}; allowed: {', '.join(STAGES)}")
    return STAGES[name]


def stage_key(cfg: ExperimentConfig, name: str) -> str:
    """Hash of what stage ``name`` depends on (runtime settings never count)."""
    spec = stage(name)
    parts: dict[str, Any] = {"data": cfg.data}
    if spec.keyed_on_model:
        parts = {"seed": cfg.seed, "model": cfg.model} | parts
    return config_hash(parts | spec.depends(cfg))


def stage_dir(root: Location, cfg: ExperimentConfig, name: str) -> Location:
    """Where a stage's result lives: a local directory or a URI (scaling.storage)."""
    return storage.stage_location(root, name, stage_key(cfg, name))


def with_inputs(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``names`` plus every stage they start from, in dependency order."""
    need = set(names)
    for name in list(need):
        dep = stage(name).input
        while dep:
            need.add(dep)
            dep = STAGES[dep].input
    return tuple(s for s in STAGES if s in need)


def stage_runs(cfg: ExperimentConfig, root: Location
               ) -> list[tuple[str, ExperimentConfig, Location]]:
    """(stage, its configuration, its directory) in the order the pipeline runs them."""
    runs: list[tuple[str, ExperimentConfig, Location]] = [
        (s.name, cfg, stage_dir(root, cfg, s.name)) for s in STAGES.values() if not s.per_fraction]
    for c in fraction_configs(cfg):
        runs += [(s.name, c, stage_dir(root, c, s.name))
                 for s in STAGES.values() if s.per_fraction]
    return runs


def run(name: str, cfg: ExperimentConfig, out: Path, input_dir: Path | None = None,
        env: Env | None = None) -> StageResult:
    """Run stage ``name`` into the local directory ``out``, and return its result.

    What every stage starts with happens here: a finished ``out`` is returned as it
    is (read and verified), ``env`` defaults to this process, and the stage gets its
    inputs (configuration, directories, the environment and the data's splits, loaded
    when first asked for).
    """
    spec = stage(name)
    if spec.input is not None and input_dir is None:
        raise ValueError(f"stage {name!r} needs its input stage directory ({spec.input})")
    done = stage_result.read_local_result(out)
    if done is not None:
        return done
    from scaling.stages.stage_run import StageInputs
    from scaling.train.env import Env

    return spec.function(StageInputs(cfg, out, input_dir, env or Env.local(cfg.runtime)))
