"""Bad input as a new user gives it, through the command lines' own ``main(argv)``
(in this process: what a shell adds, the exit status and stderr of a real process,
is tests/test_study.py's smoke test): one line naming the file or key, the value and
what is allowed; exit 2; nothing computed is lost. Damaged results on disk are named
and recomputed, never reused."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from study_runs import in_process

from scaling.stage_result import load_final_models

REPO = Path(__file__).resolve().parent.parent


def _entry(args: tuple[str, ...]):
    """The main(argv) a command line ``python ARGS`` runs, and its argv."""
    import importlib

    if args[0] == "-m" and args[1] in ("scaling.pipeline", "scaling.study.cluster",
                                       "analysis.report"):
        return importlib.import_module(args[1]).main, list(args[2:])
    if args[0].startswith("studies/"):
        from studies.cli import main

        study = importlib.import_module(f"studies.{Path(args[0]).stem}").STUDY
        return (lambda argv: main(study, argv)), list(args[1:])
    return None, list(args)


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python ARGS``: in this process where the command has a main(argv) (stdout and
    stderr captured, SystemExit taken as the status), else in a real one (bench/)."""
    main, argv = _entry(args)
    if main is None:
        return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True,
                              text=True, timeout=300)
    return in_process(main, argv)


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The run stopped with status 2 and one line on stderr holding ``words``."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def tiny_config(tmp_path: Path, **changes) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg.update(label_fractions=[0.5], runtime={"device": "cpu"})
    cfg["pretrain"]["epochs"] = 1
    cfg["finetune"]["epochs"] = 1
    cfg["supervised"]["epochs"] = 1
    cfg.update(changes)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def pipeline(cfg: Path, out: Path, *sets: str) -> subprocess.CompletedProcess:
    return run("-m", "scaling.pipeline", str(cfg), "--out", str(out),
               *(a for s in sets for a in ("--set", s)))


def test_a_damaged_finished_stage_is_recomputed_not_reused(tmp_path):
    cfg = tiny_config(tmp_path)
    assert pipeline(cfg, tmp_path).returncode == 0
    pre = next(tmp_path.glob("tiny/pretrain-*"))
    ft = next(tmp_path.glob("tiny/finetune-*"))
    model = pre / "final" / "model.pt"
    good = model.read_bytes()
    model.write_bytes(good[: len(good) // 2])  # truncated
    (ft / "result.json").write_text('{"stage": "finetune", ')  # cut off mid-write
    again = pipeline(cfg, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{model} does not match its result.json's sha256" in again.stderr
    assert f"{ft / 'result.json'} is unreadable" in again.stderr
    assert "Traceback" not in again.stderr
    load_final_models(pre)  # verifies the sha256 again
    assert load_final_models(ft)
    assert (ft / "result.json.corrupt").exists()  # kept for a look, out of the way


@pytest.mark.parametrize("sets, words", [
    (["data.name=fashion-mnist", "data.root=EMPTY"],
     ["data.root=", "holds no Fashion-MNIST train files", "data.download: true"]),
    (["pretrain.batch_size=512"], ["pretrain.batch_size=512 is invalid", "<= 224"]),
    (["data.name=imagefolder", "data.root=FOLDER"], ["is not an image folder", "CLASS/IMAGE"]),
])
def test_bad_data_stops_with_one_line(tmp_path, sets, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "folder" / "train" / "not-a-class").mkdir(parents=True)  # no images
    sets = [s.replace("EMPTY", str(tmp_path / "empty")).replace("FOLDER", str(tmp_path / "folder"))
            for s in sets]
    one_line_error(pipeline(tiny_config(tmp_path), tmp_path / "out", *sets), *words)


def test_an_image_that_does_not_decode_is_named(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (20, 20), (60 * i, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    bad = tmp_path / "train" / "b" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    proc = pipeline(tiny_config(tmp_path), tmp_path / "out", "data.name=imagefolder",
                    f"data.root={tmp_path}", "data.image_size=16", "data.val_size=0",
                    "pretrain.batch_size=4", "runtime.loader_workers=1")
    one_line_error(proc, f"{bad} does not decode", "replace or remove it")


def test_cuda_without_a_gpu_and_an_out_under_a_file(tmp_path):
    cfg = tiny_config(tmp_path)
    if not torch.cuda.is_available():
        one_line_error(pipeline(cfg, tmp_path, "runtime.device=cuda"),
                       "runtime.device='cuda' is invalid", "no CUDA device is visible")
    (tmp_path / "a-file").write_text("")
    one_line_error(pipeline(cfg, tmp_path / "a-file" / "runs"),
                   "--out=", "a directory or URI this machine can write", "NotADirectoryError")


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("name: x\npretrain: {epochs: 2\nmodel: {depth: 18}\n")
    one_line_error(run("-m", "scaling.pipeline", str(cfg)), f"{cfg}, line 3", "not valid YAML")
    spec = tmp_path / "study.yaml"
    spec.write_text("axes:\n  width: [0.0625\n")
    one_line_error(run("studies/model_size.py", "--file", str(spec), "--dry-run"),
                   f"{spec}, line 3", "not valid YAML")


def test_a_float_is_written_as_researchers_write_it(tmp_path):
    from scaling.configure import load_config, parse_overrides

    cfg = tiny_config(tmp_path)
    loaded = load_config(cfg, parse_overrides(["pretrain.optim.base_lr=1e-3"]))
    assert loaded.pretrain.optim.base_lr == pytest.approx(1e-3)
    proc = run("studies/model_size.py", "--dry-run", "--axis", "width=0.0625", "--storage",
               str(tmp_path / "s"), "--set", "pretrain.optim.base_lr=1e-3")
    assert proc.returncode == 0, proc.stderr


def test_repeated_flags_all_count(tmp_path):
    # The first --set is kept (its bad value is reported) and the config is not
    # taken for a --set value.
    one_line_error(run("-m", "scaling.pipeline", "--set", "model.depth=7", "--set",
                       "pretrain.epochs=1", "tiny"), "model.depth=7 is invalid")
    one_line_error(run("studies/model_size.py", "--seeds", "5,6", "--repeats", "2", "--dry-run"),
                   "--repeats=2 is invalid", "not both")
    # --dry-run refuses what the run would refuse on this machine.
    one_line_error(run("studies/model_size.py", "--dry-run", "--storage", str(tmp_path / "s"),
                       "--set", "runtime.workers=64"), "runtime.workers=64 is invalid")


def test_cluster_errors_name_the_key_not_the_whole_config(tmp_path):
    base = yaml.safe_load((REPO / "cluster" / "gpu.yaml").read_text())
    unknown, missing = tmp_path / "unknown.yaml", tmp_path / "missing.yaml"
    unknown.write_text(yaml.safe_dump({**base, "max_worker": 3}))
    missing.write_text(yaml.safe_dump({k: v for k, v in base.items() if k != "provider"}))
    line = one_line_error(run("-m", "scaling.study.cluster", str(unknown)),
                          f"{unknown}: max_worker is not a key", "max_workers")
    assert "available_node_types':" not in line and len(line) < 600
    one_line_error(run("-m", "scaling.study.cluster", str(missing)), "provider is missing")


@pytest.mark.parametrize("command, usage", [
    (["studies/head_depth.py"], "python studies/head_depth.py"),
    (["studies/distillation.py"], "python studies/distillation.py"),
    (["-m", "analysis.report"], "python -m analysis.report"),
    (["-m", "scaling.study.cluster"], "python -m scaling.study.cluster"),
    (["-m", "scaling.pipeline"], "python -m scaling.pipeline"),
    (["bench/throughput.py"], None), (["bench/augment.py"], None), (["bench/folder.py"], None),
    (["bench/gpu.py"], None), (["bench/sweep.py"], None),
])
def test_help_names_its_own_command_and_explains_every_flag(command, usage):
    proc = run(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    if usage:
        assert text.startswith(f"usage: {usage}")
    if "studies/" in command[0]:
        assert "model_size.py" not in text
    assert "single process, no Ray" not in text
    options = text[text.index("options:"):].splitlines()[1:]
    for i, line in enumerate(options):
        flag = re.match(r"^  (-\S+(?: \S+)?(?:, -\S+(?: \S+)?)*)(\s{2,}\S.*)?$", line)
        if flag and not flag.group(2) and not line.startswith("  -h"):
            nxt = options[i + 1] if i + 1 < len(options) else ""
            assert nxt.startswith(" " * 10) and nxt.strip(), f"no help for {line.strip()}"


@pytest.mark.parametrize("argv, guess", [
    (["--axis", "widht=0.1"], "did you mean 'width'?"),
    (["--axis", "model.widht=0.1"], "did you mean 'model.width'?"),
    (["--preset", "fmnist-cpux"], "did you mean 'fmnist-cpu'?"),
    (["--set", "model.widht=0.5"], "did you mean 'width'?"),
    (["--set", "model.stem=imagnet"], "did you mean 'imagenet'?"),
])
def test_a_near_miss_gets_a_did_you_mean(argv, guess):
    from scaling.config import ConfigError
    from studies.cli import build, parser
    from studies.model_size import STUDY

    with pytest.raises(ConfigError) as e:
        build(STUDY, parser(STUDY).parse_args(argv))
    assert str(e.value).endswith(guess), str(e.value)


def test_a_far_miss_gets_no_guess():
    from scaling.config import ConfigError
    from scaling.configure import resolve

    near = pytest.raises(ConfigError, resolve, "fmnist-cp").value
    far = pytest.raises(ConfigError, resolve, "zzzzzz").value
    assert "did you mean 'fmnist-cpu'" in str(near) and "did you mean" not in str(far)


@pytest.mark.parametrize("value", ["-5", "0", "nan"])
def test_a_gpu_memory_that_is_no_memory_is_refused(value, capsys):
    """Issue 37: --gpu-memory -5 was taken as a limit."""
    from studies.cli import main
    from studies.model_size import STUDY

    assert main(STUDY, ["--gpu-memory", value, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-memory" in err and "above 0" in err and value in err.lower()


def test_a_missing_dataset_says_the_flag_that_fetches_it(tmp_path):
    """Issue 37: the cifar10-gpu dry run said what was missing, not the fix."""
    from scaling.catalog import root_problem

    text = root_problem("cifar10", str(tmp_path / "nowhere"), download=False)
    assert "--set data.download=true" in text and "--set data.root=PATH" in text
    assert root_problem("cifar10", str(tmp_path / "nowhere"), download=True) is None


def test_help_lists_each_presets_stages_and_names_the_pixel_arm():
    """Issue 37: --help said every cell self-distils (the default preset does not)."""
    from studies.cli import parser
    from studies.model_size import STUDY

    text = " ".join(parser(STUDY).format_help().split())
    assert "pixel arm" in text and "self-distils" not in text.split("also self-distil")[0]
    assert "local: pretrain, finetune, supervised, pixels;" in text
    assert "quick: pretrain, finetune, distill, supervised, pixels" in text
    assert "for intervals use --replicates" in text


def test_a_full_disk_is_one_line_and_the_same_command_resumes(tmp_path):
    """Issue 37: the pipeline writing to a 1.5 MB tmpfs printed OSError: [Errno 28]
    with a traceback. Now: one line naming the folder, exit 1, every result written
    verifies, and after space is freed the same command finishes. Needs a tmpfs mount
    (root); skipped where that is not allowed."""
    import json
    import shutil as sh
    import subprocess
    import sys

    from scaling import stage_result

    disk = tmp_path / "disk"
    disk.mkdir()
    mount = sh.which("mount")
    if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", "size=1500k", "tmpfs",
                                        str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    try:
        cmd = [sys.executable, "-m", "scaling.pipeline", "configs/tiny.yaml", "--out", str(disk),
               "--set", "runtime.device=cpu"]
        full = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-2000:]
        err = full.stderr.strip().splitlines()
        assert "Traceback" not in full.stderr and len(err) == 1, full.stderr[-2000:]
        assert err[0].startswith("error: no space left on the device holding " + str(disk))
        finished = [d for d in (disk / "tiny").iterdir() if (d / "result.json").exists()]
        assert all(stage_result.read_result(d) is not None for d in finished)
        subprocess.run([mount, "-o", "remount,size=64m", str(disk)], check=True)
        again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert all(json.loads((d / "result.json").read_text()) for d in finished)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
