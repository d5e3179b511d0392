"""What stages hand on, as types: a stage's result (its result.json), the metrics in
it, a point of its training curve, the progress a running stage reports, and the
events that frame each stage a runner runs.

On disk and over Ray they are plain JSON objects; these TypedDicts let mypy check
every reader (the runtime, the sweep, the results table, analysis/) against what
the stages write, instead of string keys agreed on by convention.
"""

from __future__ import annotations

from typing import Any, TypedDict


class CurvePoint(TypedDict):
    """The mean loss since the previous point, at ``runtime.log_every`` steps."""

    step: int
    epoch: int
    loss: float
    lr: float
    images_per_s: float


class Metrics(TypedDict, total=False):
    # Every stage (stage_run.StageRun.finish, train.measure.size_metrics).
    params: int  # the encoder's: the paper's model size
    params_with_head: int
    forward_flops_per_image: int
    images_per_s: float
    train_seconds: float  # summed over an LR grid's runs
    wall_seconds: float  # likewise
    peak_memory_bytes: int
    final_loss: float | None
    # Classifiers (fine-tuning, the supervised baseline, distillation's student).
    val_top1: float | None  # None without a validation split
    test_top1: float
    labelled_examples: int
    teacher_val_top1: float | None
    teacher_test_top1: float
    # Pretraining: kNN and linear probes of the frozen encoder, and of raw pixels.
    knn_val_top1: float | None
    knn_top1: float
    linear_val_top1: float | None
    linear_top1: float
    pixel_knn_val_top1: float | None
    pixel_knn_top1: float
    pixel_linear_val_top1: float | None
    pixel_linear_top1: float


class _Result(TypedDict):
    stage: str
    step: int
    metrics: Metrics
    history: list[CurvePoint]
    protocol: dict[str, Any]  # how the number was made; its keys differ by stage
    resumed_from: int | None
    world_size: int
    node: str
    device: str
    config: dict[str, Any]  # the ExperimentConfig as written (config.to_dict)
    model_sha256: str  # of final/model.pt; written last, with the result


class StageResult(_Result, total=False):
    labels_file: str  # fine-tuning and the baseline: the labelled indices used


class ProgressReport(TypedDict, total=False):
    """What a running stage reports at every checkpoint (``Env.report``): where it is,
    the curve points since its previous report, and the latest point's values."""

    stage: str
    variant: str  # which run of an LR grid ("lr 0.02"); absent outside a grid
    step: int
    total_steps: int
    epochs: int
    eta_s: float
    resumed_from: int | None
    points: list[CurvePoint]
    epoch: int
    loss: float
    lr: float
    images_per_s: float


class StageEvent(TypedDict):
    """What a watcher (a Tune trial) hears of a stage: "start", then "executed" with
    the stage's test accuracy (None for pretraining); or "reused" for one found
    finished."""

    stage: str
    key: str
    event: str
    top1: float | None
