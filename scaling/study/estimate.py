"""How long a study's remaining stage runs take on this machine, from speeds
measured here: a few training steps (forward and backward) of each model the runs
train, timed on the device they would use. Training steps only: evaluation
(probes, validation and test passes) and process start-up come on top.

A speed measured on an idle machine is kept (``rates.json`` under
``$SCALING_CACHE_DIR``, default ``~/.cache/simclrv2-scaling``), keyed by the CPU or
GPU, the thread count, torch's version, the model, input size and batch: the next
estimate reuses it instead of timing again. A speed measured while other work ran
is used once, not kept, and the estimate says the load it was measured under.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scaling.catalog import CATALOG
from scaling.config import ExperimentConfig, ModelConfig
from scaling.stages.registry import STAGES
from scaling.study.plan import _forward_flops, model_label, stage_flops
from scaling.train.env import pick_device

MAX_BATCH = 512  # images per timed step at most (a step's rate depends on its batch)
BUDGET_S = 60.0  # stop measuring new models after this; the slowest rate so far serves


BUSY = 0.25  # load average per core above which the machine counts as busy


@dataclass(frozen=True)
class Estimate:
    seconds: float  # training steps of the runs still to go, one after another
    device: str
    rates: dict[str, float]  # "model @batch": measured training FLOP/s
    cached: int = 0  # how many of the rates came from the cache
    load: float | None = None  # load average per core when rates were measured now

    def provenance(self) -> str:
        """Where the speeds came from, and whether to trust them."""
        measured = len(self.rates) - self.cached
        said = [f"{self.cached} cached from an idle machine ({cache_file()})"] if self.cached \
            else []
        if measured and self.load is not None and self.load > BUSY:
            said.append(f"{measured} measured just now while the machine was busy (load "
                        f"{self.load:.2f} a core): expect the runs to be faster than this")
        elif measured:
            said.append(f"{measured} measured just now")
        return "speeds: " + "; ".join(said)


def cache_file() -> Path:
    root = os.environ.get("SCALING_CACHE_DIR") or "~/.cache/simclrv2-scaling"
    return Path(root).expanduser() / "rates.json"


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}|torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # Linux names the model
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return f"{cpu}|{torch.get_num_threads()} threads|torch {torch.__version__}"


def _read_cache() -> dict[str, float]:
    try:
        cached = json.loads(cache_file().read_text())
        return {k: float(v) for k, v in cached.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}  # none yet, or unreadable: measure again


def _write_cache(rates: dict[str, float]) -> None:
    from scaling.atomic import atomic_write_text

    with contextlib.suppress(OSError):  # a read-only home: the estimate stands, not kept
        atomic_write_text(cache_file(), json.dumps(_read_cache() | rates, indent=1))


def _load_per_core() -> float | None:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return None


@functools.cache
def training_rate(model: ModelConfig, data_name: str, image_size: int | None,
                  device: str, batch: int) -> float:
    """Measured training FLOP/s (3x forward per image) of ``model`` on ``device`` at
    ``batch`` images a step."""
    from scaling.model.network import build_encoder

    shape = CATALOG[data_name]
    channels, side = shape.channels, image_size or shape.side
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


def times_here(cfg: ExperimentConfig) -> bool:
    """Whether this machine can time the study's steps: a CPU study, or a GPU one
    where a GPU is."""
    return cfg.runtime.gpus_per_worker == 0 or torch.cuda.is_available()


def wall_clock(runs: list[tuple[str, ExperimentConfig]]) -> Estimate:
    """Seconds of training for ``runs`` (stage, configuration) here, one after another."""
    device = str(pick_device(runs[0][1].runtime.device)) if runs else "cpu"
    rates: dict[str, float] = {}
    machine, cache, fresh, cached = _machine(device), _read_cache(), {}, 0
    load = _load_per_core()  # before timing: our own steps would raise it
    total, started = 0.0, time.perf_counter()
    # The largest first: if measuring runs out of time, the small ones are guessed.
    # Stages without a training step (the pixel arm's closed forms) take seconds.
    trained = [(s, c) for s, c in runs if STAGES[s].trains]
    for stage, cfg in sorted(trained, key=lambda r: -stage_flops(r[1], r[0])):
        entry = STAGES[stage]
        model, data = entry.network(cfg), entry.trains_on(cfg)
        assert entry.step_images is not None
        batch = min(entry.step_images(cfg), MAX_BATCH)
        label = f"{model_label(model)} @{batch}"
        key = f"{machine}|{data.name}@{data.image_size}|{label}"
        if label not in rates:
            if key in cache:
                rates[label], cached = cache[key], cached + 1
            elif rates and time.perf_counter() - started > BUDGET_S:
                rates[label] = min(rates.values())  # out of time: assume the slowest rate
            else:
                rates[label] = fresh[key] = training_rate(model, data.name, data.image_size,
                                                          device, batch)
        total += stage_flops(cfg, stage) / rates[label]
    if fresh and (load is None or load <= BUSY):
        _write_cache(fresh)
    return Estimate(total, device, rates, cached, load if fresh else None)
