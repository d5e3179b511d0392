"""How far one cell of the default study moves when only the thread count changes.

    .venv/bin/python bench/reproducibility.py [--threads 2 1 2] [--width 0.0625] [--fraction 0.001]

Takes the cell (ResNet-18 at ``--width``, ``--fraction`` of the labels, replicate 0)
from studies/model_size.py's ``local`` preset and runs its pretraining and
fine-tuning from scratch once per entry of ``--threads``, each in a fresh process
with ``torch.set_num_threads(n)`` and its own storage. Prints, per run, the models'
sha256 and the validation and test top-1 (pretraining: its linear probe's). The
same thread count twice shows what one machine repeats; 1 against 2 threads is the
nearest this machine comes to another CPU (another summation order in the same
kernels). Another CPU generation (AVX2 vs
AVX-512) changes the kernels themselves, which this cannot show.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
sys.path.insert(0, sys.argv[5])
from scaling.study.plan import cells
from studies.cli import build, parser
from studies.model_size import STUDY

study = build(STUDY, parser(STUDY).parse_args(["--preset", "local"]))
cell = next(c for c in cells(study) if dict(c.values) == {
    "model.depth": 18, "model.width": float(sys.argv[2]),
    "finetune.label_fraction": float(sys.argv[3]), "replicate": 0})
from scaling.configure import with_overrides
from scaling.runtime.local import pipeline_jobs, run_local
cfg = with_overrides(cell.config, {"runtime.workers": 0})
out = []
for job in pipeline_jobs(cfg, sys.argv[4]):
    if job.stage not in ("pretrain", "finetune") or (
            job.stage == "finetune" and job.cfg.finetune.label_fraction != float(sys.argv[3])):
        continue
    r = run_local(job.stage, job.cfg, job.out, job.input)
    m = r["metrics"]
    out.append({"stage": r["stage"], "sha256": r["model_sha256"][:12],
                "val_top1": m.get("val_top1", m.get("linear_val_top1")),
                "top1": m.get("test_top1", m.get("linear_top1"))})
print("RESULT " + json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1, 2])
    p.add_argument("--width", type=float, default=0.0625)
    p.add_argument("--fraction", type=float, default=0.001)
    args = p.parse_args()
    print(f"R18 {args.width:g}x at {100 * args.fraction:g}% labels, replicate 0, local preset")
    print(f"{'threads':>7}  {'stage':<9} {'sha256':<12}  {'val top-1':>9}  {'test top-1':>10}")
    for n in args.threads:
        with tempfile.TemporaryDirectory() as root:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.width),
                                   str(args.fraction), root, str(REPO)],
                                  capture_output=True, text=True, cwd=REPO)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"threads {n} failed:\n{proc.stderr[-3000:]}")
        for r in json.loads(line[0][7:]):
            val = "-" if r["val_top1"] is None else f"{100 * r['val_top1']:.2f}"
            test = "-" if r["top1"] is None else f"{100 * r['top1']:.2f}"
            print(f"{n:>7}  {r['stage']:<9} {r['sha256']:<12}  {val:>9}  {test:>10}", flush=True)


if __name__ == "__main__":
    main()
