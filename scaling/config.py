"""The configuration schema: frozen dataclasses, one per concept and one per stage.

Defaults follow the paper's CIFAR/ImageNet settings scaled to the small default
dataset; the comment beside each says why. Each dataclass checks its own values
and raises ``ConfigError`` naming the key, the value and what is allowed; reading
YAML, presets, overrides and hashing live in ``scaling.configure``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from scaling.catalog import CATALOG


class ConfigError(ValueError):
    """A bad configuration value: ``key`` is the dotted path from the root."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid; allowed: {allowed}")

    def under(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.value, self.allowed)


class ConfigFileError(ConfigError):
    """A config problem whose message is whole (a file that does not parse, ...)."""

    def __init__(self, key: str, message: str) -> None:
        self.key, self.value, self.allowed = key, None, message
        ValueError.__init__(self, message)


def did_you_mean(word: Any, choices: Iterable[str]) -> str:
    """"; did you mean 'width'?" when ``word`` is a near miss of one of ``choices``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


# Blocks per group and block type for each supported depth (reference BLOCKS table);
# scaling.model.resnet builds them.
LAYERS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}


@dataclass(frozen=True)
class ModelConfig:
    depth: int = 50  # the paper's smallest model; studies sweep 18..152
    width: float = 1.0  # fractional widths (1/16 ... 1/2) keep the depths at CPU scale
    sk_ratio: float = 0.0  # 0.0625 in the released SK models; > 0 also turns on ResNet-D
    stem: Literal["auto", "imagenet", "small"] = "auto"  # auto: small stem for <= 32 px

    def __post_init__(self) -> None:
        check(self.depth in LAYERS, "depth", self.depth, f"one of {sorted(LAYERS)}")
        check(0 < self.width <= 8 and round(64 * self.width) >= 1, "width", self.width,
              "0 < width <= 8 with 64*width >= 1 (e.g. 0.0625, 0.25, 1, 2, 3)")
        check(0 <= self.sk_ratio < 1, "sk_ratio", self.sk_ratio, "0 <= sk_ratio < 1")

    def resolved_stem(self, image_size: int) -> Literal["imagenet", "small"]:
        if self.stem != "auto":
            return self.stem
        return "small" if image_size <= 32 else "imagenet"


@dataclass(frozen=True)
class HeadConfig:
    num_layers: int = 3  # SimCLRv2's deeper head (v1 used 2)
    out_dim: int = 128  # contrastive embedding size in the reference

    def __post_init__(self) -> None:
        check(1 <= self.num_layers <= 5, "num_layers", self.num_layers, "1..5")
        check(self.out_dim >= 1, "out_dim", self.out_dim, ">= 1")


@dataclass(frozen=True)
class DataConfig:
    # A dataset of the catalog (scaling/catalog.py): its size, classes, default root
    # and loader. Fashion-MNIST is small, real, and installable offline from Debian.
    name: str = "fashion-mnist"
    root: str | None = None  # None: the catalog's default (Fashion-MNIST: the system copy)
    download: bool = False  # never fetch unless asked: tests and clusters stay offline
    # Side of the images the network sees. imagefolder: crops resized to it (None:
    # 224); synthetic: generated at it (None: 16); in-memory sets are resized to it once
    # at load (bilinear, antialiased; None: native, 28 Fashion-MNIST, 32 CIFAR, 96 STL-10).
    image_size: int | None = None
    # A class-balanced validation split carved from the training split, for every
    # choice (presets, LRs, recipes); the test split only reports. None: the
    # catalog's size for the dataset.
    val_size: int | None = None
    val_seed: int = 0  # which images go to validation (recorded in every result)
    # Image names (or indices) never put in validation: the official ImageNet 10%
    # list (which holds the 1% list), so the paper's label subsets stay whole.
    val_excluded_file: str | None = None

    def __post_init__(self) -> None:
        check(self.name in CATALOG, "name", self.name, "one of " + ", ".join(
            repr(n) for n in CATALOG) + did_you_mean(self.name, CATALOG))
        check(self.image_size is None or self.image_size >= 8, "image_size", self.image_size,
              "null or >= 8")
        check(not self.download or self.root is not None, "download", self.download,
              "true only together with data.root")
        check(self.val_size is None or self.val_size >= 0, "val_size", self.val_size,
              "null (the dataset's default) or >= 0 (0: no validation split)")

    def resolved_val_size(self) -> int:
        return CATALOG[self.name].val_size if self.val_size is None else self.val_size


@dataclass(frozen=True)
class AugmentConfig:
    crop_min_scale: float = 0.08  # reference area range [0.08, 1]
    color_strength: float = 0.5  # the paper's CIFAR strength; ImageNet uses 1.0
    color_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0  # the paper blurs on ImageNet only

    def __post_init__(self) -> None:
        check(0 < self.crop_min_scale <= 1, "crop_min_scale", self.crop_min_scale, "0 < x <= 1")
        check(0 <= self.color_strength <= 2, "color_strength", self.color_strength, "0..2")
        for key in ("color_p", "grayscale_p", "blur_p"):
            v = getattr(self, key)
            check(0 <= v <= 1, key, v, "a probability in [0, 1]")



@dataclass(frozen=True)
class OptimConfig:
    name: Literal["lars", "sgd"] = "lars"
    base_lr: float = 0.1  # pretraining: 0.1 * sqrt(4096) = 6.4 in the paper
    lr_scaling: Literal["linear", "sqrt"] = "sqrt"  # sqrt is better for small batches
    momentum: float = 0.9
    weight_decay: float = 1e-4  # reference pretraining value
    warmup_fraction: float = 0.05  # linear warmup over the first 5% of steps (paper)

    def __post_init__(self) -> None:
        check(self.base_lr > 0, "base_lr", self.base_lr, "> 0")
        check(0 <= self.momentum < 1, "momentum", self.momentum, "0 <= momentum < 1")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check(0 <= self.warmup_fraction < 1, "warmup_fraction", self.warmup_fraction, "[0, 1)")


@dataclass(frozen=True)
class MemoryConfig:
    queue_size: int = 0  # 0: plain NT-Xent; the paper used 64K negatives
    momentum: float = 0.999  # EMA decay of the memory network (MoCo's value)

    def __post_init__(self) -> None:
        check(self.queue_size >= 0, "queue_size", self.queue_size, ">= 0 (0 disables)")
        check(0 < self.momentum < 1, "momentum", self.momentum, "0 < momentum < 1")


def _check_epochs_batch(epochs: int, batch_size: int) -> None:
    check(epochs >= 1, "epochs", epochs, ">= 1")
    check(batch_size >= 2, "batch_size", batch_size, ">= 2")


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 100  # the paper uses 800 on ImageNet; small data needs fewer passes
    batch_size: int = 512  # global; negatives = 2 * batch - 2 per anchor
    temperature: float = 0.2  # the paper's CIFAR value (0.1 on ImageNet)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    global_bn: bool = True  # SyncBatchNorm across workers; per-replica BN hurts (paper)

    def __post_init__(self) -> None:
        _check_epochs_batch(self.epochs, self.batch_size)
        check(self.temperature > 0, "temperature", self.temperature, "> 0")


@dataclass(frozen=True)
class FractionSettings:
    """Fine-tuning settings for one label fraction; unset (null) fields keep finetune's."""

    head_layer: int | None = None
    epochs: int | None = None
    base_lr: float | None = None
    min_steps: int | None = None
    subset_file: str | None = None

    def __post_init__(self) -> None:
        check(self.head_layer is None or 0 <= self.head_layer <= 5, "head_layer",
              self.head_layer, "null or 0..head.num_layers")
        check(self.epochs is None or self.epochs >= 1, "epochs", self.epochs, "null or >= 1")
        check(self.base_lr is None or self.base_lr > 0, "base_lr", self.base_lr, "null or > 0")
        check(self.min_steps is None or self.min_steps >= 0, "min_steps", self.min_steps,
              "null or >= 0")


def _check_lr_grid(grid: tuple[float, ...]) -> None:
    check(all(lr > 0 for lr in grid) and len(set(grid)) == len(grid),
          "lr_grid", grid, "distinct base LRs > 0, or [] for optim.base_lr alone")


def _check_min_steps(min_steps: int) -> None:
    check(min_steps >= 0, "min_steps", min_steps, ">= 0 (0: epochs alone set the schedule)")


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 60  # paper: 60 on 1%, 30 on 10% and 100%
    batch_size: int = 256
    head_layer: int = 1  # ft_proj_selector: 1 for 1%/10% labels, 0 for 100%
    label_fraction: float | None = 0.01  # class-balanced; or set labels_per_class
    labels_per_class: int | None = None
    subset_seed: int = 0
    # Epochs grow until the schedule has at least this many steps: 1% of a small set
    # is a few batches, and 60 epochs of 2 steps is no fine-tuning at all.
    min_steps: int = 0
    # The labelled subset as a file (image names or indices; relative paths also
    # resolve against the project, e.g. subsets/imagenet/1percent.txt); null: a
    # random class-balanced subset of label_fraction / labels_per_class.
    subset_file: str | None = None
    # Per label fraction, e.g. {0.01: {epochs: 60}, 1.0: {head_layer: 0, epochs: 30}}
    # (the paper's schedule). Resolved into the fields above for each fraction's run;
    # an entry's fields win over the ones above (a study's axes win over both).
    per_fraction: dict[float, FractionSettings] = field(default_factory=dict)
    # Base LRs to try, as the supervised baseline's (SupervisedConfig.lr_grid): one
    # run each, the best validation top-1 is the stage's result. Empty: optim.base_lr.
    lr_grid: tuple[float, ...] = ()
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        base_lr=0.005, weight_decay=0.0, warmup_fraction=0.0))  # reference fine-tuning

    def __post_init__(self) -> None:
        _check_epochs_batch(self.epochs, self.batch_size)
        _check_min_steps(self.min_steps)
        check(0 <= self.head_layer <= 5, "head_layer", self.head_layer, "0..head.num_layers")
        for f in self.per_fraction:
            check(0 < f <= 1, f"per_fraction[{f!r}]", f, "label fractions in (0, 1] as keys")
        _check_lr_grid(self.lr_grid)
        check(not self.lr_grid or all(s.base_lr is None for s in self.per_fraction.values()),
              "lr_grid", self.lr_grid, "[] while finetune.per_fraction sets base_lr (the grid "
              "replaces it: clear per_fraction with finetune.per_fraction={})")
        check((self.label_fraction is None) != (self.labels_per_class is None),
              "label_fraction", self.label_fraction,
              "exactly one of label_fraction and labels_per_class set")
        if self.label_fraction is not None:
            check(0 < self.label_fraction <= 1, "label_fraction", self.label_fraction, "(0, 1]")
        if self.labels_per_class is not None:
            check(self.labels_per_class >= 1, "labels_per_class", self.labels_per_class, ">= 1")


@dataclass(frozen=True)
class DistillConfig:
    epochs: int = 60
    batch_size: int = 256
    # Epochs grow until the schedule has at least this many steps (as fine-tuning's):
    # unlabelled sets of different sizes then get the same budget.
    min_steps: int = 0
    # null: the paper's choice, 0.1 for self-distillation and 1.0 big-to-small.
    temperature: float | None = None
    alpha: float = 0.0  # weight of the label loss; the paper's best runs use 0
    student: ModelConfig | None = None  # None: self-distillation (teacher's architecture)
    unlabelled: DataConfig | None = None  # None: the pretraining set
    # null: pretraining's LARS recipe (the paper distils with its pretraining settings).
    optim: OptimConfig | None = None

    def __post_init__(self) -> None:
        _check_epochs_batch(self.epochs, self.batch_size)
        _check_min_steps(self.min_steps)
        check(self.temperature is None or self.temperature > 0, "temperature",
              self.temperature, "null (0.1 self-distillation, 1.0 otherwise) or > 0")
        check(0 <= self.alpha <= 1, "alpha", self.alpha, "0 <= alpha <= 1")


@dataclass(frozen=True)
class SupervisedConfig:
    epochs: int = 90  # the paper's supervised baseline schedule
    batch_size: int = 256
    min_steps: int = 0  # the same budget rule as fine-tuning (FinetuneConfig.min_steps)
    # Base LRs to try: one run each, and the baseline is the run with the best
    # validation top-1 (so it is tuned as well as fine-tuning is, and never on
    # test). Empty: optim.base_lr alone.
    lr_grid: tuple[float, ...] = ()
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="sgd", base_lr=0.1, lr_scaling="linear", weight_decay=1e-4))

    def __post_init__(self) -> None:
        _check_epochs_batch(self.epochs, self.batch_size)
        _check_min_steps(self.min_steps)
        _check_lr_grid(self.lr_grid)


@dataclass(frozen=True)
class EvalConfig:
    knn_k: int = 200  # the common kNN-monitor setting (Wu et al. 2018)
    knn_temperature: float = 0.1
    linear_steps: int = 100  # L-BFGS iterations of the logistic-regression probe

    def __post_init__(self) -> None:
        check(self.knn_k >= 1, "knn_k", self.knn_k, ">= 1")
        check(self.knn_temperature > 0, "knn_temperature", self.knn_temperature, "> 0")
        check(self.linear_steps >= 1, "linear_steps", self.linear_steps, ">= 1")


@dataclass(frozen=True)
class PixelsConfig:
    """The baseline with no network at all: classifiers on the raw pixels of exactly
    the cell's labelled subset, every setting chosen on validation. Pretraining is
    only worth its cost where it beats this (on Fashion-MNIST, a ridge classifier on
    pixels beat fine-tuning at every label count of the 2-core studies)."""

    # Ridge regression to one-hot targets, a linear classifier in closed form: every
    # value from one eigendecomposition. In units of the mean squared norm of a centred
    # image, so one grid serves 28x28 grey and 32x32 colour alike.
    ridge_grid: tuple[float, ...] = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0)
    knn_k: tuple[int, ...] = (1, 3, 5, 10, 20)  # Euclidean, majority vote
    # Larger images are area-averaged to this side first (ImageNet's 224 px: 32, the
    # downsampled-ImageNet benchmarks' size), so the fit stays a d x d problem.
    max_side: int = 32

    def __post_init__(self) -> None:
        check(bool(self.ridge_grid) and all(v > 0 for v in self.ridge_grid),
              "ridge_grid", self.ridge_grid, "a non-empty list of values > 0")
        check(bool(self.knn_k) and all(k >= 1 for k in self.knn_k), "knn_k",
              self.knn_k, "a non-empty list of integers >= 1")
        check(self.max_side >= 1, "max_side", self.max_side, ">= 1")


@dataclass(frozen=True)
class RuntimeConfig:
    """How a run executes. Not part of any stage's identity (see stage_key)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    compile: bool = False  # torch.compile on CUDA; its warm-up dominates short runs
    checkpoint_every: int = 0  # steps between checkpoints; 0: at the end of each epoch
    # > 0: a checkpoint about every this many minutes instead (decided at log points,
    # so every worker agrees), written off the training thread: the GPU
    # presets' 10 (cifar10-gpu's epoch is ~40 steps; a 190 MB checkpoint each epoch,
    # hashed and fsynced in the loop, cost more than the minutes it could save).
    checkpoint_minutes: float = 0.0
    # Most steps between progress lines and loss-curve points (a stage logs at least
    # about 20 points however short it is: scaling/stages/stage_run.py).
    log_every: int = 20
    keep_checkpoints: int = 2  # the previous one is the fallback for a corrupt latest
    # Decode processes for imagefolder data (training and evaluation); None: one per
    # core this process may use, less one for the training loop, at most 8.
    loader_workers: int | None = None
    # Where imagefolder JPEGs are decoded and cropped: "loader" (PIL, in the loader
    # workers) or "device" (the workers only read files; nvJPEG and roi_align on
    # the GPU, scaling.data.jpeg). Same boxes; pixels within the resamplers' rounding.
    decode: Literal["loader", "device"] = "loader"
    # Keep only each ResNet block's input for the backward and recompute the rest:
    # saved activations fall several-fold for one more forward's compute (~+1/3 a
    # step). Off: a plan that fits without it runs faster (the dry run's memory plan).
    activation_checkpointing: bool = False
    # Ray Train (scaling.runtime.ray_train); the single-process pipeline ignores these.
    # Data-parallel workers per stage (the global batch is split); 0: run the stage
    # in the calling process (a study's trial), without Ray Train's start-up cost.
    workers: int = 1
    cpus_per_worker: int = 1  # Ray's default; a 2-core machine fits 1 trial x 1 worker
    gpus_per_worker: int = 0  # 1 on GPU clusters (NCCL); 0: CPU workers on gloo
    max_failures: int = 3  # worker-group restarts from the last checkpoint
    # A custom resource each worker also asks one unit of, so Ray (and the autoscaler)
    # places the group only on node types that offer it: cluster/gpu.yaml gives its
    # 1-GPU nodes GPU_1X, and the 1-GPU lanes ask for it (none lands on an 8-GPU node).
    node_resource: str | None = None
    # The process group's collective timeout (TorchConfig.timeout_s): the longest rank
    # 0 may evaluate alone while the others wait in a barrier (the probe is bounded
    # by evaluate.probe_max_train so an ImageNet probe stays well inside it).
    collective_timeout_s: int = 1800

    def __post_init__(self) -> None:
        check(self.workers >= 0, "workers", self.workers, ">= 0 (0: in the calling process)")
        check(self.cpus_per_worker >= 1, "cpus_per_worker", self.cpus_per_worker, ">= 1")
        check(self.gpus_per_worker >= 0, "gpus_per_worker", self.gpus_per_worker, ">= 0")
        check(self.max_failures >= 0, "max_failures", self.max_failures, ">= 0")
        check(self.collective_timeout_s >= 1, "collective_timeout_s", self.collective_timeout_s,
              ">= 1 (seconds)")
        check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0")
        check(self.checkpoint_minutes >= 0, "checkpoint_minutes", self.checkpoint_minutes,
              ">= 0 (0: by checkpoint_every or epochs)")
        check(self.log_every >= 1, "log_every", self.log_every, ">= 1")
        check(self.keep_checkpoints >= 2, "keep_checkpoints", self.keep_checkpoints, ">= 2")
        check(self.loader_workers is None or self.loader_workers >= 0, "loader_workers",
              self.loader_workers, "null (follow the machine's cores) or >= 0")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    seed: int = 0  # model init, batch order and augmentation (subsets use subset_seed)
    # The pipeline fine-tunes, distils and trains the supervised baseline once per
    # fraction; empty: only finetune.label_fraction / labels_per_class.
    label_fractions: tuple[float, ...] = (0.01, 0.1)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    pixels: PixelsConfig = field(default_factory=PixelsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        unlabelled_only = [n for n, d in CATALOG.items() if not d.labelled]
        check(self.data.name not in unlabelled_only, "data.name", self.data.name,
              f"a labelled set ({' and '.join(unlabelled_only)} serve only as "
              "distill.unlabelled)")
        for f in self.label_fractions:
            check(0 < f <= 1, "label_fractions", self.label_fractions, "fractions in (0, 1]")
        check(self.finetune.head_layer <= self.head.num_layers, "finetune.head_layer",
              self.finetune.head_layer, f"0..head.num_layers ({self.head.num_layers})")
        for f, s in self.finetune.per_fraction.items():
            if self.label_fractions:
                check(any(same_fraction(f, g) for g in self.label_fractions),
                      f"finetune.per_fraction[{f}]", f,
                      f"one of label_fractions {list(self.label_fractions)}")
            if s.head_layer is not None:
                check(s.head_layer <= self.head.num_layers,
                      f"finetune.per_fraction[{f}].head_layer", s.head_layer,
                      f"0..head.num_layers ({self.head.num_layers})")

        for key, grid in (("finetune", self.finetune.lr_grid),
                          ("supervised", self.supervised.lr_grid)):
            check(not grid or self.data.val_size != 0, f"{key}.lr_grid", grid,
                  "[] when data.val_size is 0 (choosing needs a validation split)")

    @property
    def student(self) -> ModelConfig:
        return self.distill.student or self.model

    @property
    def self_distillation(self) -> bool:
        """A student of the teacher's architecture, however it was written."""
        return self.student == self.model

    def distill_temperature(self) -> float:
        if self.distill.temperature is not None:
            return self.distill.temperature
        return 0.1 if self.self_distillation else 1.0  # the paper's two settings

    def distill_optim(self) -> OptimConfig:
        return self.distill.optim or self.pretrain.optim


def same_fraction(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))
