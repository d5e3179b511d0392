"""Run one real training step on the CPU and print its peak memory (a subprocess of
tests/test_footprint.py): the kernel's high-water mark of RSS, reset just before
the step's objects exist (/proc/self/clear_refs, 5), less the RSS then. glibc is
told to map every block of 64 KiB or more on its own (MALLOC_MMAP_THRESHOLD_), so
freed tensors leave RSS at once and the peak is the step's own."""

import json
import sys

import torch
import torch.nn.functional as F

from scaling.configure import PRESETS, load_config
from scaling.model.network import build_classifier, build_contrastive
from scaling.train.env import Env
from scaling.train.losses import nt_xent
from scaling.train.optimizer import build_optimizer


def main() -> None:
    stage, batch, checkpointing = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    torch.set_num_threads(1)
    cfg = load_config(PRESETS / "cifar10-gpu.yaml", {"model.depth": 18, "model.width": 0.5})
    env = Env(torch.device("cpu"), checkpointing=checkpointing)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS (VmHWM) starts again from here
    before = _status("VmRSS")
    views = 2 if stage == "pretrain" else 1
    if stage == "pretrain":
        net = build_contrastive(cfg.model, cfg.head, 3, 32)
    else:
        net = build_classifier(cfg.model, cfg.head, 0, 3, 32, 10)
    model = env.prepare(net)
    x = torch.randint(0, 255, (batch, 3, 32, 32), dtype=torch.uint8)
    v = x.float().div(255).repeat(views, 1, 1, 1)
    out = model(v)
    if stage == "pretrain":
        z1, z2 = out[-1].chunk(2)
        loss = nt_xent(z1, z2, 0.2, gather=False)
    else:
        loss = F.cross_entropy(out, torch.zeros(batch, dtype=torch.long))
    loss.backward()
    optimizer = build_optimizer(cfg.pretrain.optim if stage == "pretrain"
                                else cfg.supervised.optim, net)
    optimizer.step()
    print(json.dumps({"peak": _status("VmHWM") - before}))


def _status(key: str) -> int:
    """A /proc/self/status line in bytes (the kernel reports kB)."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024


if __name__ == "__main__":
    main()
