import os
import tempfile
from pathlib import Path

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


@pytest.fixture(scope="session")
def _tiny_chain(tmp_path_factory) -> tuple[ExperimentConfig, Path]:
    """The tiny preset's whole chain (pretraining, then per fraction fine-tuning,
    distillation, the supervised baseline with a 2-LR grid, the pixel arm), run once
    per session."""
    from scaling.configure import PRESETS
    from scaling.runtime.local import run_pipeline

    cfg = load_config(PRESETS / "tiny.yaml", {"runtime.device": "cpu",
                                              "supervised.lr_grid": [0.05, 0.2]})
    root = tmp_path_factory.mktemp("tiny-chain")
    torch.set_num_threads(2)
    run_pipeline(cfg, root)
    return cfg, root


@pytest.fixture
def tiny_chain(_tiny_chain, tmp_path) -> tuple[ExperimentConfig, Path]:
    """A finished tiny chain of your own (a copy of the session's): its
    configuration and the stage directories' root."""
    import shutil

    cfg, root = _tiny_chain
    shutil.copytree(root, tmp_path / "chain")
    return cfg, tmp_path / "chain"


@pytest.fixture(scope="session")
def reference_study(tmp_path_factory):
    """tests/study_runs.py's study run once, uninterrupted, into a storage of its own:
    its spec, storage and the finished process (stdout, stderr). Tests that start
    from it copy the storage; tests that interrupt the same study compare with it."""
    from types import SimpleNamespace

    import study_runs as s

    folder = tmp_path_factory.mktemp("reference-study")
    spec = s.write_spec(folder)
    done = s.run(s.command(spec, folder / "S"))
    s.ok(done)
    return SimpleNamespace(spec=spec, storage=folder / "S", process=done)
