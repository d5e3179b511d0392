"""Teacher size x student size x label fraction x unlabelled set: the paper's
distillation results (self-distillation and big-to-small). Each teacher is
pretrained and fine-tuned once and distilled into every student."""

import sys

from scaling.configure import CIFAR_LANE, IMAGENET_LANE
from studies.cli import (
    LOCAL_SCHEDULE,
    Preset,
    StudyDef,
    findings_preset,
    main,
)

STUDY = StudyDef(
    name="distillation",
    doc=__doc__,
    presets={
        "local": Preset("fmnist-cpu", {"width": [0.125], "student_width": [0.0625, 0.125]},
                        LOCAL_SCHEDULE),
        # F2 as the paper states it: model_size's width-1/8 teachers at 1% labels into
        # themselves (student vs teacher) and into width 1/16 (vs model_size's width
        # 1/16 fine-tuned on the same labels), 40 epochs of the training images each.
        # One label count: distillation is the grid's most expensive stage.
        "fmnist-cpu": findings_preset({
            "width": [0.125], "student_width": [0.0625, 0.125], "label_fraction": [0.01]},
            ("pretrain", "finetune", "distill")),
        # What the unlabelled set does: the training images, real images of another
        # domain (handwritten digits, mnist-5k) and synthetic dead-leaves images, each
        # for the same number of steps (840: 4 epochs of the training images), for a
        # width-1/8 teacher at 2% labels, 3 independent replicates (each its own
        # pretraining, subset and fine-tuning).
        "unlabelled": Preset("fmnist-cpu", {
            "width": [0.125], "label_fraction": [0.02], "replicate": [0, 1, 2],
            "unlabelled": ["fashion-mnist", "mnist-5k", "dead-leaves"]},
            LOCAL_SCHEDULE | {"distill.min_steps": 840},
            stages=("pretrain", "finetune", "distill")),
        # Same data, or CIFAR-100's images as the unlabelled set.
        "cifar10-gpu": Preset("cifar10-gpu", {
            "depth": [50], "width": [1.0, 2.0], "student_depth": [18, 50],
            "unlabelled": ["cifar10", "cifar100"], "label_fraction": [0.01, 0.1]},
            CIFAR_LANE | {"runtime.activation_checkpointing": True}),
        "imagenet-gpu": Preset("imagenet-gpu", {
            "depth": [152], "width": [2.0, 3.0], "sk": [0.0625], "student_depth": [50, 152],
            "label_fraction": [0.01, 0.1]},
            IMAGENET_LANE | {"runtime.workers": 32}),
    },
)

if __name__ == "__main__":
    sys.exit(main(STUDY))
