"""Training curves for watching a study: TensorBoard event files in the study's
folder, and optionally MLflow (through Ray's own MLflow logger callback).

Each stage has its own tags on its own step axis (``pretrain/loss``,
``pretrain/lr``, ``finetune/loss``, ..., ``pretrain/knn_val_top1``), one run per
cell. Live points arrive with the trials' progress reports (at checkpoints); when
a stage finishes, its whole history (every ``runtime.log_every`` steps) and its
final metrics are written from the study's curves.csv (scaling.study.training_curves), so a
curve is complete however often it reported.

    tensorboard --logdir runs/model_size-local/tensorboard
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback

from scaling.stage_result import CURVES
from scaling.study.training_curves import Curves

FINAL = ("val_top1", "test_top1", "knn_val_top1", "knn_top1", "linear_val_top1",
         "linear_top1", "teacher_val_top1", "teacher_test_top1", "train_seconds")
Points = list[tuple[int, dict[str, float]]]


def _curve(stage: str, points: Iterable[Mapping[str, Any]]) -> Points:
    return [(int(p["step"]), {f"{stage}/{k}": float(p[k]) for k in CURVES if k in p})
            for p in points]


def stage_points(result: dict[str, Any], curves: Curves) -> Points:
    """(step, {tag: value}) for one trial report: a live progress point, or, when a
    stage has finished (event executed/reused), its history and final metrics from
    the study's curves (scaling.study.training_curves)."""
    stage = result.get("stage")
    if not stage:
        return []
    if "total_steps" in result:  # progress at a checkpoint: the points since the last one
        return _curve(stage, result.get("points", []))
    if result.get("event") not in ("executed", "reused"):
        return []
    steps: dict[int, dict[str, float]] = {}
    for row in curves.of(stage, result["key"]):
        if row["lr"] == "" and (row["metric"] in CURVES or row["metric"] in FINAL):
            steps.setdefault(int(row["step"]), {})[f"{stage}/{row['metric']}"] = row["value"]
    return sorted(steps.items())


class Unseen:
    """Keeps each tag's steps increasing: a finished stage's history repeats the points
    already reported live, and TensorBoard takes a step going back for a restart."""

    def __init__(self) -> None:
        self.last: dict[tuple[str, str], int] = {}

    def __call__(self, cell: str, points: Points) -> Points:
        out = []
        for step, values in points:
            fresh = {t: v for t, v in values.items() if step > self.last.get((cell, t), -1)}
            self.last |= {(cell, t): step for t in fresh}
            if fresh:
                out.append((step, fresh))
        return out


def run_name(cell: str) -> str:
    """A cell id as a folder name (its '=' and ',' kept; '/' and spaces replaced)."""
    return re.sub(r"[^A-Za-z0-9=,._-]", "_", cell)


class TensorBoard(tune.Callback):
    """Event files under ``logdir/<cell>/``, written by the sweep's driver."""

    def __init__(self, logdir: Path, curves: Curves) -> None:
        self.logdir, self.curves = logdir, curves
        self.writers: dict[str, Any] = {}
        self.unseen = Unseen()

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        from tensorboardX import SummaryWriter

        cell = trial.config["cell"]["id"]
        if cell not in self.writers:
            # purge_step=0 hides what an interrupted run of this cell wrote: a trial that
            # runs again reports every stage's whole history, reused ones included.
            self.writers[cell] = SummaryWriter(str(self.logdir / run_name(cell)), purge_step=0)
            write_hparams(self.writers[cell], trial.config["cell"].get("axes", {}))
        writer = self.writers[cell]
        for step, values in self.unseen(cell, stage_points(result, self.curves)):
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)
        writer.flush()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        for writer in self.writers.values():
            writer.close()


# The final metrics TensorBoard's HParams tab puts beside each cell's axis values.
HPARAM_METRICS = ("finetune/test_top1", "supervised/test_top1", "pixels/test_top1",
                  "distill/test_top1", "pretrain/linear_val_top1")


def write_hparams(writer: Any, axes: dict[str, Any]) -> None:
    """The cell's axis values as TensorBoard hparams, in its own run: the HParams tab
    then filters and sorts runs by width, label fraction, replicate, ..."""
    from tensorboardX.summary import hparams

    values = {k: v if isinstance(v, bool | int | float | str) else str(v)
              for k, v in axes.items()}
    for summary in hparams(values, dict.fromkeys(HPARAM_METRICS, 0.0)):
        writer.file_writer.add_summary(summary)


class MLflow(MLflowLoggerCallback):
    """Ray's MLflow logger, one MLflow run per cell, with the stages' own tags and
    steps instead of Tune's one joined curve; params: the cell's axis values (its
    whole configuration is in results.csv)."""

    def __init__(self, tracking_uri: str, experiment: str, curves: Curves) -> None:
        super().__init__(tracking_uri=tracking_uri, experiment_name=experiment,
                         save_artifact=False)
        self.curves = curves
        self.unseen = Unseen()

    def log_trial_start(self, trial: Any) -> None:
        if trial not in self._trial_runs:
            cell = trial.config["cell"]
            run = self.mlflow_util.start_run(tags={"cell": cell["id"]}, run_name=cell["id"])
            self._trial_runs[trial] = run.info.run_id
            self.mlflow_util.log_params(run_id=self._trial_runs[trial],
                                        params_to_log={"cell": cell["id"], **cell["axes"]})

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        points = stage_points(result, self.curves)
        for step, values in self.unseen(trial.config["cell"]["id"], points):
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=values,
                                         step=step)


def check_mlflow(uri: str) -> None:
    """Fail before the sweep starts if MLflow is missing or ``uri`` does not answer."""
    from scaling.config import ConfigError

    try:
        import mlflow
    except ImportError:
        raise ConfigError("--mlflow", uri, "a tracking URI, with mlflow installed "
                          "(pip install mlflow-skinny)") from None
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - MLflow raises its own and the stores' errors
        first = str(e).split(". ")[0]
        raise ConfigError("--mlflow", uri, f"a tracking URI MLflow can use ({first})") from None
