"""Predict an untrained model's fine-tuned top-1 from a study's (or a published
table's) other models, with a 95% prediction interval and what training it would cost:

    python -m analysis.predict runs/model_size-local --model depth=18,width=0.5
    python -m analysis.predict reference/simclrv2_table1.csv \\
        --model depth=152,width=3,sk=1 --fit-below 200

The law is the one with the smallest leave-one-model-out error on the data it is
fitted to (analysis/laws.py); the interval adds its out-of-sample residual spread to
the spread over resampled replicates. A model the data already has is held out of
the fit and its measured top-1 is printed beside. ``--fit-below M`` fits on models
under M million parameters only (a forward prediction).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from analysis import collect, laws, published
from analysis.curves import FitError, ceiling_of
from scaling import storage
from scaling.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from scaling.study.plan import Study


@dataclass(frozen=True)
class Source:
    df: pd.DataFrame  # collect.tidy's table
    spec: dict | None  # study.json (None: a published table)
    name: str


def load_source(where: str) -> Source:
    """A study folder (or URI), or a published table's CSV (analysis/published.py)."""
    if published.is_published(where):
        df = published.load(where)
        return Source(df, None, str(df["study"].iloc[0]))
    loc = storage.absolute(storage.parse(where))
    spec = collect.study_spec(loc)
    return Source(collect.load(loc, spec), spec, str(where))


def parse_model(text: str) -> ModelConfig:
    """'depth=18,width=0.5[,sk=1]' -> ModelConfig (sk=1 means the released ratio)."""
    values: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = item.partition("=")
        if key not in ("depth", "width", "sk") or not eq:
            raise ConfigError("--model", text, "depth=D,width=W[,sk=S] (e.g. depth=18,width=0.5)")
        try:
            values[key] = float(value)
        except ValueError:
            raise ConfigError(f"--model {key}", value, "a number") from None
    if "depth" not in values or "width" not in values:
        raise ConfigError("--model", text, "both depth and width, e.g. depth=18,width=0.5")
    sk = values.get("sk", 0.0)
    return ModelConfig(depth=int(values["depth"]), width=values["width"],
                       sk_ratio=published.SK_RATIO if sk >= 1 else sk)


def encoder_params(model: ModelConfig, df: pd.DataFrame) -> float:
    """The encoder's parameters, counted on the meta device at the data's input."""
    import torch

    from scaling.catalog import CATALOG
    from scaling.model.network import build_encoder
    from scaling.model.resnet import count_parameters

    data = CATALOG[str(df["data.name"].iloc[0])]
    side = df.get("data.image_size", pd.Series(dtype=float)).dropna()
    with torch.device("meta"):
        net = build_encoder(model, data.channels, int(side.iloc[0]) if len(side) else data.side)
    return float(count_parameters(net))


def target(model: ModelConfig, df: pd.DataFrame) -> pd.DataFrame:
    """The rows to predict: the model at each label count the data fine-tuned on."""
    name = collect.model_name(model.depth, model.width, model.sk_ratio)
    have = df[(df["model"] == name) & df["params"].notna()]
    params = float(have["params"].iloc[0]) if len(have) else encoder_params(model, df)
    counts = sorted(df.loc[df["stage"] == "finetune", "labels"].dropna().unique())
    return pd.DataFrame({"model": name, "params_m": params / 1e6, "depth": model.depth,
                         "sk": model.sk_ratio, "labels": counts})


def prediction(src: Source, model: ModelConfig, below_m: float | None = None,
               resamples: int = 200) -> tuple[laws.Prediction, pd.DataFrame]:
    """The prediction and the model's measured points (empty where it has none)."""
    new = target(model, src.df)
    pts = laws.points(src.df)
    measured = pts[pts["model"] == new["model"].iloc[0]]
    pts = pts[pts["model"] != new["model"].iloc[0]]
    if below_m is not None:
        pts = pts[pts["params_m"] < below_m]
    if pts["model"].nunique() < 2:
        raise FitError(f"{pts['model'].nunique()} model(s) to fit on: a law needs >= 2")
    reps = laws.replicate_points(src.df)
    if reps is not None:
        reps = reps[reps["model"].isin(set(pts["model"]))]
    p = laws.predict(pts, new, ceiling_of(src.df), reps, resamples)
    return p, measured


def cost(src: Source, model: ModelConfig, cluster_yaml: str | None = None,
         price: float | None = None) -> str:
    """What training the model would cost: the dry run's estimate for its distinct
    stage runs (one per replicate and label count), here on a CPU study, on H100s
    (and the cluster YAML's nodes) otherwise."""
    from scaling.study.cost import h100_hours
    from scaling.study.plan import distinct_runs, fmt_duration, runs_left, stage_flops

    if src.spec is not None and "config" not in src.spec:
        return "training it: no estimate (the study.json has no configuration)"
    study = _study_for(src, model)
    runs = runs_left(distinct_runs(study), set())
    flops = sum(stage_flops(c, s) for s, c in runs)
    head = f"training it: {len(runs)} stage runs ({', '.join(study.stages)}), {flops:.3g} FLOPs"
    if study.base.runtime.gpus_per_worker == 0:
        from scaling.study.estimate import wall_clock

        est = wall_clock(runs)
        return (f"{head}; ~{fmt_duration(est.seconds)} of training steps here "
                f"({est.device}, {est.provenance()}); evaluation and start-up come on top")
    line = f"{head}; ~{h100_hours(flops):.3g} H100-hours"
    if cluster_yaml:
        from scaling.study import cluster
        from scaling.study.cost import cluster_cost

        priced = cluster_cost(study, cluster.load(cluster_yaml), flops, price)
        if priced is not None:
            line += f"; {priced.line()}"
    return line


def _study_for(src: Source, model: ModelConfig) -> Study:
    """The study that would train ``model`` as the source's models were trained: the
    study's own configuration and replicates, or, for a published ImageNet table, the
    imagenet-gpu preset on its 16-GPU lanes, with the table's arms: pretraining,
    fine-tuning at its label fractions and the supervised network."""
    from scaling.configure import IMAGENET_LANE, load_config, resolve, with_overrides
    from scaling.study.plan import make_study
    from scaling.study.results import unflatten

    axes: dict[str, list[Any]] = {"depth": [model.depth], "width": [model.width],
                                  "sk": [model.sk_ratio]}
    if src.spec is None:
        base = load_config(resolve("imagenet-gpu"), IMAGENET_LANE)
        fractions = sorted(src.df["label_fraction"].dropna().unique().tolist())
        return make_study("predict", base, axes | {"label_fraction": fractions},
                          ("pretrain", "finetune", "supervised"))
    base = unflatten(src.spec["config"])
    devices = set(src.df.get("device", pd.Series(dtype=str)).dropna().astype(str))
    if devices and not any(d.startswith("cuda") for d in devices):
        base = with_overrides(base, {"runtime.gpus_per_worker": 0})
    grid = {k: v for k, v in src.spec.get("axes", {}).items()
            if k in ("label_fraction", "replicate", "seed", "subset_seed")}
    return make_study("predict", base, axes | grid, tuple(src.spec["stages"]))


def lines(p: laws.Prediction, measured: pd.DataFrame, src: Source) -> list[str]:
    t = p.table.merge(measured[["labels", "error"]], on="labels", how="left")
    out = [f"{t['model'].iloc[0]} ({t['params_m'].iloc[0]:.3g}M parameters), predicted "
           f"from {src.name}:"]
    for _, r in t.iterrows():
        fraction = src.df.loc[src.df["labels"] == r["labels"], "label_fraction"].dropna()
        at = f"{100 * fraction.iloc[0]:g}% ({r['labels']:,.0f} labels)" if len(fraction) \
            else f"{r['labels']:,.0f} labels"
        seen = ("" if np.isnan(r["error"]) else
                f"; measured {100 * (1 - r['error']):.1f} (held out of the fit)")
        out.append(f"  {at}: {r['predicted']:.1f} [{r['low']:.1f}, {r['high']:.1f}]{seen}")
    scores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(p.choice.scores.items(),
                                                           key=lambda kv: kv[1]))
    out += [f"law: {p.law.describe()}, chosen by mean |leave-one-model-out miss| "
            f"(top-1 points): {scores}",
            f"95% prediction interval: +- t({p.df} df) x sqrt({p.residual_sd:.2f}^2 "
            "[the law's out-of-sample RMS miss] + the fit's variance over "
            + (f"{p.resampled} resamples of independent replicates)" if p.resampled else
               "replicates: none here, one run per model)")]
    if p.choice.skipped:
        out.append("not checked out of sample: " + "; ".join(
            f"{k} ({v})" for k, v in p.choice.skipped.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a study's storage (runs/model_size-local, s3://...) or a "
                    "published table's CSV (reference/simclrv2_table1.csv)")
    ap.add_argument("--model", required=True, help="depth=D,width=W[,sk=S]")
    ap.add_argument("--fit-below", type=float, default=None, metavar="M",
                    help="fit on models under M million parameters only")
    ap.add_argument("--cluster", default=None, help="a cluster YAML to price GPU training on")
    ap.add_argument("--gpu-price", type=float, default=None, metavar="USD",
                    help="per GPU-hour, to price the cluster estimate")
    ap.add_argument("--resamples", type=int, default=200)
    args = ap.parse_args(argv)
    try:
        if args.fit_below is not None and not args.fit_below > 0:
            raise ConfigError("--fit-below", args.fit_below, "a number of millions > 0")
        model = parse_model(args.model)
        src = load_source(args.source)
        p, measured = prediction(src, model, args.fit_below, args.resamples)
        print("\n".join(lines(p, measured, src)))
        print(cost(src, model, args.cluster, args.gpu_price))
    except (ConfigError, FitError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
