"""How long a study's remaining stage runs take on this machine, from speeds
measured here: a few training steps (forward and backward) of each model the runs
train, timed on the device they would use. Training steps only: evaluation
(probes, validation and test passes) and process start-up come on top.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from scaling.config import ExperimentConfig, ModelConfig
from scaling.stages.registry import STAGES
from scaling.study.plan import DATA_SHAPES, _forward_flops, model_label, stage_flops
from scaling.train.env import pick_device

MAX_BATCH = 512  # images per timed step at most (a step's rate depends on its batch)
BUDGET_S = 60.0  # stop measuring new models after this; the slowest rate so far serves


@dataclass(frozen=True)
class Estimate:
    seconds: float  # training steps of the runs still to go, one after another
    device: str
    rates: dict[str, float]  # "model @batch": measured training FLOP/s


@functools.cache
def training_rate(model: ModelConfig, data_name: str, image_size: int | None,
                  device: str, batch: int) -> float:
    """Measured training FLOP/s (3x forward per image) of ``model`` on ``device`` at
    ``batch`` images a step."""
    from scaling.model.network import build_encoder

    _, channels, side, _, _ = DATA_SHAPES[data_name]
    side = image_size or side
    dev = torch.device(device)
    net = build_encoder(model, channels, side).to(dev).train()
    x = torch.randn(batch, channels, side, side, device=dev)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        net(x).float().square().mean().backward()

    step()  # warm-up: allocation, kernel selection
    if dev.type == "cuda":
        torch.cuda.synchronize()
    steps, started = 0, time.perf_counter()
    while steps < 3 or (time.perf_counter() - started < 0.5 and steps < 20):
        step()
        steps += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    return 3 * _forward_flops(model, data_name, image_size) * batch / seconds


def _step_batch(cfg: ExperimentConfig, stage: str) -> int:
    """Images one training step of ``stage`` passes through the network."""
    batch = {"pretrain": 2 * cfg.pretrain.batch_size, "finetune": cfg.finetune.batch_size,
             "distill": cfg.distill.batch_size, "supervised": cfg.supervised.batch_size}[stage]
    return min(batch, MAX_BATCH)


def wall_clock(runs: list[tuple[str, ExperimentConfig]]) -> Estimate:
    """Seconds of training for ``runs`` (stage, configuration) here, one after another."""
    device = str(pick_device(runs[0][1].runtime.device)) if runs else "cpu"
    rates: dict[str, float] = {}
    total, started = 0.0, time.perf_counter()
    # The largest first: if measuring runs out of time, the small ones are guessed.
    # Stages without a training step (the pixel arm's closed forms) take seconds.
    trained = [(s, c) for s, c in runs if STAGES[s].trains]
    for stage, cfg in sorted(trained, key=lambda r: -stage_flops(r[1], r[0])):
        model = (cfg.distill.student or cfg.model) if stage == "distill" else cfg.model
        data = (cfg.distill.unlabelled or cfg.data) if stage == "distill" else cfg.data
        batch = _step_batch(cfg, stage)
        label = f"{model_label(model)} @{batch}"
        if label not in rates:
            if rates and time.perf_counter() - started > BUDGET_S:
                rates[label] = min(rates.values())  # out of time: assume the slowest rate
            else:
                rates[label] = training_rate(model, data.name, data.image_size, device, batch)
        total += stage_flops(cfg, stage) / rates[label]
    return Estimate(total, device, rates)
