import os
import tempfile

import pytest
import torch

from scaling.config import ExperimentConfig
from scaling.configure import load_config

# The speed cache of scaling.study.estimate: never the user's, and fresh per run
# (subprocesses inherit it).
os.environ["SCALING_CACHE_DIR"] = tempfile.mkdtemp(prefix="scaling-cache-")


@pytest.fixture(autouse=True)
def _threads():
    # Keep tests predictable on small CI machines.
    torch.set_num_threads(2)


@pytest.fixture
def tiny() -> ExperimentConfig:
    """The tiny preset on synthetic data, on the CPU, for stage tests."""
    from scaling.configure import PRESETS

    return load_config(PRESETS / "tiny.yaml", {"runtime.device": "cpu"})
