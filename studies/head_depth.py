"""Projection-head depth x fine-tune-from layer x label fraction: the paper's
head figure (a deeper head, fine-tuned from its middle layer, helps most at 1%).
Cells pretrain and fine-tune; most presets also train the baselines without
pretraining (the supervised network and the pixel arm); none distils. `--preset`
below lists each preset's stages."""

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
    name="head_depth",
    doc=__doc__,
    stages=("pretrain", "finetune", "supervised", "pixels"),
    presets={
        "local": Preset("fmnist-cpu", {"width": [0.0625], "head_depth": [2, 3],
                                       "ft_layer": [0, 1]}, LOCAL_SCHEDULE),
        # F3: SimCLR v1's head (2 layers, fine-tuned from the encoder) against v2's
        # (3, from the middle), for the smallest local model, where the paper places
        # the effect (small models, few labels); the 3-layer pretraining and its
        # layer-1 fine-tunes are model_size's. Traded for time on 2 cores: the width-1/4
        # model (its three 2-layer-head pretrainings, about 40 minutes) and 10% labels.
        "fmnist-cpu": findings_preset({
            "width": [0.0625], "head_depth": [2, 3], "ft_layer": [0, 1],
            "label_fraction": [0.001, 0.01]}, ("pretrain", "finetune")),
        "cifar10-gpu": Preset("cifar10-gpu", {"head_depth": [2, 3, 4], "ft_layer": [0, 1, 2],
                                              "label_fraction": [0.01, 0.1, 1.0]},
                              CIFAR_LANE),
        "imagenet-gpu": Preset("imagenet-gpu", {
            "head_depth": [2, 3, 4], "ft_layer": [0, 1, 2], "label_fraction": [0.01, 0.1, 1.0]},
            IMAGENET_LANE),
    },
)

if __name__ == "__main__":
    sys.exit(main(STUDY))
