"""Model size x label fraction: the paper's Table 1 and its "bigger models are more
label-efficient" figure. Every cell pretrains (shared across label fractions),
fine-tunes from the head's middle layer, and trains the baselines without
pretraining on the same labels: the supervised network and the pixel arm (ridge or
kNN on the labelled pixels, chosen on validation). The presets `quick`,
`cifar10-gpu` and `imagenet-gpu` also self-distil; `--preset` below lists each
preset's stages."""

import sys

from scaling.configure import CIFAR_LANE, IMAGENET_LANE
from studies.cli import (
    BASELINE_GRID,
    LOCAL_SCHEDULE,
    Preset,
    StudyDef,
    findings_preset,
    main,
)

LOCAL_FRACTIONS = [0.001, 0.01, 0.1]

STUDY = StudyDef(
    name="model_size",
    doc=__doc__,
    presets={
        # Fashion-MNIST on 2 cores in under 15 minutes: three widths, three label counts
        # a decade apart (54, 540 and 5,400 images), 3 independent replicates (each its
        # own pretraining seed, labelled subset and fine-tuning seed): fine-tuning
        # against the tuned supervised baseline and the pixel arm, no distillation.
        # Traded on time, not on any result: 3 replicates instead of 2 subsets of one
        # pretraining cost 3x the pretraining, so the counts went from five to three
        # (the dry run estimated 15.5 minutes of training steps with five). Fine-tuning's
        # LR per count is the one the fmnist-cpu grid chose on validation at 0.1%, 1%
        # and 10% (mean over its 12 runs a count, docs/results.md).
        "local": Preset("fmnist-cpu", {
            "depth": [18], "width": [0.0625, 0.125, 0.25],
            "label_fraction": LOCAL_FRACTIONS, "replicate": [0, 1, 2]},
            LOCAL_SCHEDULE | BASELINE_GRID | {
                "label_fractions": LOCAL_FRACTIONS, "finetune.per_fraction": {
                    0.001: {"base_lr": 0.005}, 0.01: {"base_lr": 0.02}, 0.1: {"base_lr": 0.02}}},
            stages=("pretrain", "finetune", "supervised", "pixels")),
        # The whole pipeline, distillation included, in about 6 minutes on 2 cores:
        # two widths, 1% and 10% labels, one subset (a smoke run; no intervals).
        "quick": Preset("fmnist-cpu", {"depth": [18], "width": [0.0625, 0.125]}, LOCAL_SCHEDULE),
        # F1 and F4 (docs/results.md): the local study's models at 0.1%, 1% and 10%
        # labels, 3 independent replicates, on the findings' budgets; its 1% teachers
        # and small models serve the distillation study (F2).
        "fmnist-cpu": findings_preset({
            "depth": [18], "width": [0.0625, 0.125, 0.25], "label_fraction": [0.001, 0.01, 0.1]},
            ("pretrain", "finetune", "supervised", "pixels")),
        "cifar10-gpu": Preset("cifar10-gpu", {
            "depth": [18, 50], "width": [0.5, 1.0], "sk": [0.0, 0.0625],
            "label_fraction": [0.01, 0.1, 1.0]}, CIFAR_LANE),
        # The paper's grid (R152 3x+SK is one more cell: --axis, or a --file).
        "imagenet-gpu": Preset("imagenet-gpu", {
            "depth": [50, 101, 152], "width": [1.0, 2.0], "sk": [0.0, 0.0625],
            "label_fraction": [0.01, 0.1, 1.0]},
            IMAGENET_LANE),
    },
)

if __name__ == "__main__":
    sys.exit(main(STUDY))
