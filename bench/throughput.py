"""Training throughput of each stage: a bare PyTorch loop vs the project's stage vs Ray Train.

    .venv/bin/python bench/throughput.py [--config fmnist-cpu] [--epochs 1] [--repeats 2]

For the same model, batch, data, optimiser and augmentation, each stage runs as
  (a) ``bare``:  a plain loop written below (batch, augment, forward, loss,
                 backward, step; fixed learning rate, no bookkeeping),
  (b) ``stage``: the project's stage function in a single process,
  (c) ``ray``:   the same stage on Ray Train with 1 worker (same thread count).
Every run is a fresh Python process (so no run inherits another's warm caches,
threads or Ray daemons), in the order a b c a b c ... so that drift on the
machine shows up as spread between repeats, not as a ratio. Images/s counts the
training steps only (pretraining: image pairs), from the first step to the last.
Prints each run, the median per variant, and the ratios b/a and c/a.
``--profile`` also runs torch's profiler in every run and prints, per stage, the
operators' self CPU time summed over that variant's runs, side by side: where a
variant's extra time goes, operator by operator.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scaling.config import ExperimentConfig, OptimConfig
from scaling.configure import from_dict, load_config, resolve, to_dict
from scaling.data.augment import CROP_FLIP, augment, view_spec
from scaling.data.datasets import ImageData
from scaling.data.loaders import load_dataset
from scaling.model.network import build_classifier, build_contrastive
from scaling.stage_result import load_final_models
from scaling.stages import registry
from scaling.stages.finetune import pretrained_classifier
from scaling.train.env import Env
from scaling.train.optimizer import build_optimizer
from scaling.train.schedule import LRSchedule

VARIANTS = ("bare", "stage", "ray")


# --- (a) the bare loops -------------------------------------------------------

def plain_nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over 2N embeddings; rows i and i+N are the two views of image i.
    Scaled as the reference (and scaling.train.losses): 2x the mean over the 2N anchors."""
    n = z.shape[0] // 2
    z = F.normalize(z, dim=1)
    sim = (z @ z.T / temperature).fill_diagonal_(float("-inf"))  # 2Nx2N, no self-pairs
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return 2 * F.cross_entropy(sim, targets)


def _timed_loop(cfg: ExperimentConfig, n_images: int, batch: int, epochs: int,
                optim: OptimConfig, opt: torch.optim.Optimizer, step: Any,
                device: torch.device) -> dict[str, Any]:
    """Run ``step(indices)`` over ``epochs`` of shuffled full batches; time the steps.

    The learning rate follows the stage's warmup + cosine schedule, so the loop
    does the stage's arithmetic on the stage's kind of values.
    """
    rng = np.random.default_rng(cfg.seed)
    steps = n_images // batch * epochs
    orders = [rng.permutation(n_images) for _ in range(epochs)]
    order = np.concatenate([o[: n_images // batch * batch] for o in orders])
    schedule = LRSchedule.of(optim, batch, steps)
    started = time.perf_counter()
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = schedule(s)
        step(order[s * batch:(s + 1) * batch])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"steps": steps, "train_seconds": seconds, "images_per_s": steps * batch / seconds}


def _images(cfg: ExperimentConfig, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The training split on the device: uint8 NxCxHxW images, labels, class count."""
    d = cfg.data
    train = load_dataset(d.name, "train", d.root, d.download, d.image_size)
    if not isinstance(train, ImageData):
        sys.exit(f"data.name={d.name!r}: the bare loops need an in-memory dataset")
    return train.images.to(device), train.labels.to(device), train.num_classes


def bare_pretrain(cfg: ExperimentConfig, no_input: Path | None, device: torch.device
                  ) -> dict[str, Any]:
    p = cfg.pretrain
    env = Env(device)
    images, _, _ = _images(cfg, device)
    torch.manual_seed(cfg.seed)
    net = env.prepare(build_contrastive(cfg.model, cfg.head, images.shape[1], images.shape[2]))
    opt = build_optimizer(p.optim, net)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    view = view_spec(p.augment)

    def step(idx: np.ndarray) -> None:
        x = images[torch.from_numpy(idx).to(device)]
        views = torch.cat([augment(x, view, gen), augment(x, view, gen)])
        with env.autocast():
            z = net(env.images(views))[-1]
        loss = plain_nt_xent(z.float(), p.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _timed_loop(cfg, len(images), p.batch_size, p.epochs, p.optim, opt, step,
                       device)


def bare_finetune(cfg: ExperimentConfig, pretrained: Path, device: torch.device
                  ) -> dict[str, Any]:
    ft = cfg.finetune
    env = Env(device)
    images, labels, classes = _images(cfg, device)
    torch.manual_seed(cfg.seed)
    clf = pretrained_classifier(cfg, pretrained, images.shape[1], images.shape[2], classes)
    model = env.prepare(clf)  # in place; the unwrapped module names the optimiser's groups
    opt = build_optimizer(ft.optim, clf, exclude=[clf.classifier])
    gen = torch.Generator(device).manual_seed(cfg.seed)

    def step(idx: np.ndarray) -> None:
        i = torch.from_numpy(idx).to(device)
        with env.autocast():
            logits = model(env.images(augment(images[i], CROP_FLIP, gen)))
        loss = F.cross_entropy(logits.float(), labels[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    n = round(len(images) * (ft.label_fraction or 1.0))  # the bench fine-tunes on 100%
    return _timed_loop(cfg, n, ft.batch_size, ft.epochs, ft.optim, opt, step, device)


def bare_distill(cfg: ExperimentConfig, teacher_dir: Path, device: torch.device
                 ) -> dict[str, Any]:
    dc = cfg.distill
    env = Env(device)
    images, _, classes = _images(cfg, device)
    c, size = images.shape[1], images.shape[2]
    teacher = build_classifier(cfg.model, cfg.head, cfg.finetune.head_layer, c, size, classes)
    teacher.load_state_dict(load_final_models(teacher_dir)["classifier"])
    env.prepare(teacher)  # moves it in place (one process: no wrapper)
    teacher.eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    # As the stage: no head layers, pretraining's optimiser, the paper's temperature.
    student = build_classifier(cfg.student, cfg.head, 0, c, size, classes)
    model = env.prepare(student)
    optim = cfg.distill_optim()
    opt = build_optimizer(optim, student)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    t = cfg.distill_temperature()

    def step(idx: np.ndarray) -> None:
        view = env.images(augment(images[torch.from_numpy(idx).to(device)], CROP_FLIP, gen))
        with env.autocast():
            with torch.no_grad():
                target = F.softmax(teacher(view).float() / t, dim=1)
            logits = model(view).float()
        loss = -(target * F.log_softmax(logits / t, dim=1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _timed_loop(cfg, len(images), dc.batch_size, dc.epochs, optim, opt, step, device)


# The bare loops there are, by stage; the stages measured are the registry's that
# have one (the supervised baseline is fine-tuning's loop from scratch), in its order.
Bare = Callable[[ExperimentConfig, Any, torch.device], dict[str, Any]]
BARE: dict[str, Bare] = {"pretrain": bare_pretrain, "finetune": bare_finetune,
                        "distill": bare_distill}
STAGES = tuple(s for s in registry.STAGES if s in BARE)


# --- (b), (c): the project's stage, alone or on Ray Train ---------------------

def stage_run(variant: str, stage: str, cfg: ExperimentConfig, out: Path,
              input_dir: Path | None) -> dict[str, Any]:
    started = time.perf_counter()
    if variant == "stage":
        from scaling.runtime.local import run_local
        result = run_local(stage, cfg, out, input_dir)
    else:
        import ray

        from scaling.runtime.ray_train import run_stage
        ray.init(num_cpus=cfg.runtime.cpus_per_worker, num_gpus=cfg.runtime.gpus_per_worker,
                 include_dashboard=False, log_to_driver=False)
        result = run_stage(stage, cfg, out, input_dir)
        ray.shutdown()
    m = result["metrics"]
    return {"steps": result["step"], "train_seconds": m["train_seconds"],
            "images_per_s": m["images_per_s"], "stage_wall_seconds": m["wall_seconds"],
            "call_seconds": time.perf_counter() - started}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    if not spec.get("profile"):
        return run_variant(spec)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = run_variant(spec)
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    return {**result, "ops": ops}


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = from_dict(ExperimentConfig, spec["cfg"])
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    input_dir = Path(spec["input"]) if spec["input"] else None
    if spec["variant"] == "bare":
        return BARE[spec["stage"]](cfg, input_dir, device)
    return stage_run(spec["variant"], spec["stage"], cfg, Path(spec["out"]), input_dir)


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{spec['variant']} {spec['stage']} failed (exit {proc.returncode}):\n"
                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT "):]))


def bench_config(name: str, epochs: int, threads: int, device: str) -> ExperimentConfig:
    return load_config(resolve(name), {
        "pretrain.epochs": epochs, "finetune.epochs": epochs, "distill.epochs": epochs,
        # 100% labels: as many fine-tuning steps per epoch as the other stages
        "finetune.label_fraction": 1.0, "finetune.labels_per_class": None,
        "runtime.device": device, "runtime.log_every": 10_000,
        "runtime.workers": 1, "runtime.cpus_per_worker": threads,  # same threads on Ray
        "runtime.gpus_per_worker": int(device == "cuda"),
        "evaluate.linear_steps": 1, "evaluate.knn_k": 1,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fmnist-cpu", help="a preset or YAML to time")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per variant (medians and ranges are printed)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated stages to time (default: all)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated loop variants to compare (default: all)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the stages run")
    parser.add_argument("--profile", action="store_true",
                        help="per-operator self CPU time of each variant (torch profiler)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    stages, variants = args.stages.split(","), args.variants.split(",")
    for key, given, allowed in (("--stages", stages, STAGES), ("--variants", variants, VARIANTS)):
        bad = [g for g in given if g not in allowed]
        if bad:
            sys.exit(f"{key}={','.join(bad)} is invalid; allowed: {', '.join(allowed)}")
    threads = torch.get_num_threads()
    cfg = bench_config(args.config, args.epochs, threads, args.device)
    print(f"config {args.config}: R{cfg.model.depth} w{cfg.model.width} on {cfg.data.name}, "
          f"{args.epochs} epoch(s) per run, batch {cfg.pretrain.batch_size}, {threads} torch "
          f"threads, {args.device}, torch {torch.__version__}", flush=True)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        made: dict[str, Path] = {}  # stage -> a result directory later stages read

        def ensure(stage: str) -> Path:
            """A finished result of ``stage`` (and of its inputs), made once, untimed."""
            if stage not in made:
                prior = ensure(dep) if (dep := registry.STAGES[stage].input) else None
                made[stage] = Path(tmp) / f"{stage}-input"
                run_child(_spec("stage", stage, cfg, made[stage], prior, threads, args.device))
            return made[stage]

        for stage in stages:
            input_dir = ensure(dep) if (dep := registry.STAGES[stage].input) else None
            for r in range(args.repeats):
                for variant in variants:
                    out = Path(tmp) / f"{stage}-{variant}-{r}"
                    res = run_child(_spec(variant, stage, cfg, out, input_dir, threads,
                                          args.device) | {"profile": args.profile})
                    runs.setdefault((stage, variant), []).append(res)
                    extra = (f", stage wall {res['stage_wall_seconds']:.1f} s, call "
                             f"{res['call_seconds']:.1f} s" if variant != "bare" else "")
                    print(f"{stage:9s} {variant:6s} run {r + 1}: {res['images_per_s']:8.1f} "
                          f"img/s ({res['steps']} steps in {res['train_seconds']:.1f} s{extra})",
                          flush=True)
                    if variant == "stage" and stage not in made:
                        made[stage] = out
    print("\nmedian images/s (pretraining: image pairs) and ratios to the bare loop: of the "
          "medians, and the median [min, max] of each repeat's own ratio (runs side by side)")
    for stage in stages:
        rates = {v: [r["images_per_s"] for r in runs[(stage, v)]] for v in variants}
        med = {v: statistics.median(rates[v]) for v in variants}
        line = "  ".join(f"{v} {med[v]:7.1f}" for v in variants)
        print(f"{stage:9s} {line}")
        for v in variants:
            if v == "bare" or "bare" not in rates:
                continue
            paired = [x / b for x, b in zip(rates[v], rates["bare"], strict=True)]
            print(f"{'':9s} {v}/bare {med[v] / med['bare']:.3f}; per repeat "
                  f"{statistics.median(paired):.3f} [{min(paired):.3f}, {max(paired):.3f}]")
    if args.profile:
        for stage in stages:
            print_profile(stage, {v: runs[(stage, v)] for v in variants})


def print_profile(stage: str, runs: dict[str, list[dict[str, Any]]], top: int = 18) -> None:
    """Self CPU milliseconds per training step for each operator (summed over a
    variant's runs, divided by their steps). A stage's run also evaluates and
    counts FLOPs (forward-only ops); backward and optimiser ops are training's alone."""
    per_step: dict[str, dict[str, float]] = {}
    for v, rs in runs.items():
        steps = sum(r["steps"] for r in rs)
        for r in rs:
            for op, s in r["ops"].items():
                per_step.setdefault(op, {}).setdefault(v, 0.0)
                per_step[op][v] += 1e3 * s / steps
    print(f"\n{stage}: self CPU ms per training step, by operator")
    print(f"{'operator':<44}" + "".join(f"{v:>10}" for v in runs))
    ranked = sorted(per_step, key=lambda op: -max(per_step[op].values()))
    for op in ranked[:top]:
        print(f"{op[:43]:<44}" + "".join(f"{per_step[op].get(v, 0.0):10.2f}" for v in runs))
    print(f"{'all operators':<44}" + "".join(
        f"{sum(t.get(v, 0.0) for t in per_step.values()):10.2f}" for v in runs))


def _spec(variant: str, stage: str, cfg: ExperimentConfig, out: Path, input_dir: Path | None,
          threads: int, device: str) -> dict[str, Any]:
    return {"variant": variant, "stage": stage, "cfg": to_dict(cfg), "out": str(out),
            "input": str(input_dir) if input_dir else None, "threads": threads,
            "device": device}


if __name__ == "__main__":
    main()
