"""Every table of the report, each a pure function of the tidy table
(analysis/collect.py) or of the fitted curves (analysis/curves.py), returning a
DataFrame the report renders."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from analysis import replicates
from analysis.collect import model_name
from analysis.curves import Analysis, Bootstrap, _interval, curve
from scaling.storage import Location
from scaling.study import training_curves


def pct(x: float) -> str:
    """A label fraction as the paper writes it: 0.01 -> "1%"."""
    return f"{100 * x:g}%"


def params_table(a: Analysis) -> pd.DataFrame:
    rows = []
    for (model, stage), f in a.fits.items():
        c = curve(f)
        for name, value in c.params.items():
            rows.append({"model": model, "stage": stage, "form": c.form, "parameter": name,
                         "value": value, "95% interval": _interval(f, name),
                         "seeds": f.seeds if isinstance(f, Bootstrap) else 1,
                         "rmse log error": round(c.rmse_log, 4)})
    return pd.DataFrame(rows)


def improvement_table(df: pd.DataFrame) -> pd.DataFrame:
    """Relative improvement over the smallest model per model, stage and label
    fraction: mean over seeds and its 95% Student-t interval (the paper's "bigger
    models gain more from pretraining with fewer labels")."""
    rows = []
    keep = df["stage"].isin(["finetune", "supervised"]) & df["relative_improvement"].notna()
    # The smallest model is the reference: its row would read 0 [0.00, 0.00].
    keep &= df["params"] > df.loc[keep, "params"].min() if keep.any() else keep
    for (model, stage, lf), g in df[keep].groupby(["model", "stage", "label_fraction"],
                                                  sort=False):
        mean, lo, hi, n = replicates.effect(g["relative_improvement"].to_numpy(),
                                            list(g["runs"]))
        rows.append({"model": model, "params (M)": round(float(g["params"].iloc[0]) / 1e6, 2),
                     "stage": stage,
                     "label fraction": lf, "relative improvement %": round(100 * mean, 2),
                     "95% interval": "n/a (one replicate)" if np.isnan(lo) else
                     f"[{100 * lo:.2f}, {100 * hi:.2f}]", "replicates": n})
    return pd.DataFrame(rows)


def protocol_table(df: pd.DataFrame) -> pd.DataFrame:
    """What each stage's number means: a stage's protocol fields that are the same in
    every row, and the names of those that vary between cells (paths, fractions)."""
    rows = []
    for stage, g in df.dropna(subset=["protocol"]).groupby("stage", sort=False):
        dicts = [json.loads(p) for p in g["protocol"]]
        keys = sorted({k for d in dicts for k in d})
        same = {k: dicts[0].get(k) for k in keys
                if all(json.dumps(d.get(k)) == json.dumps(dicts[0].get(k)) for d in dicts)}
        rows.append({"stage": stage, "protocol": json.dumps(same),
                     "varies by cell": ", ".join(k for k in keys if k not in same) or "-"})
    return pd.DataFrame(rows)


def histories(df: pd.DataFrame, study_dir: Location) -> pd.DataFrame:
    """Each distinct stage run's loss curve, from the study's curves.csv (written by the
    sweep; every LR of a grid, not only the chosen one): columns stage, model, run,
    replicate, step, loss. Empty where the study has none."""
    c = training_curves.read(study_dir)
    c = c[c["metric"] == "loss"]
    columns = ["stage", "model", "run", "replicate", "step", "loss", "label_fraction",
               "params"]
    if c.empty or df.empty:
        return pd.DataFrame(columns=columns)
    # Where a grid's runs are there, the chosen LR's curve is one of them.
    grids = set(c.loc[c["lr"] != "", "stage_key"])
    c = c[(c["lr"] != "") | ~c["stage_key"].isin(grids)]
    meta = df.drop_duplicates(["stage", "stage_key"]).set_index(["stage", "stage_key"])
    rows = []
    for (stage, key, lr), g in c.groupby(["stage", "stage_key", "lr"], sort=False):
        if (stage, key) not in meta.index:
            continue  # a stage run of another invocation's grid
        r = meta.loc[(stage, key)]
        run = "" if stage == "pretrain" else f"{100 * float(r['label_fraction']):g}%"
        name = f"{run}, lr {lr}" if lr else (run or "pretraining")
        rows += [{"stage": stage, "model": str(r["model"]), "run": name,
                  "replicate": int(r["replicate"]), "step": int(step), "loss": float(loss),
                  "label_fraction": r["label_fraction"], "params": r["params"]}
                 for step, loss in zip(g["step"], g["value"], strict=True)]
    return pd.DataFrame(rows, columns=columns)


MODEL_KEYS = ["depth", "width", "sk", "params"]


PIXELS_ROW = "raw pixels (no network)"


def _cell(values: pd.Series) -> str:
    """'mean' (one seed) or 'mean ± sd' over seeds, in percent."""
    v = 100 * values.dropna()
    if v.empty:
        return "-"
    return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std():.1f}"


def table1(df: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 for this study: a row per model (its name says depth, width
    and SK; parameters in millions, without the head), smallest first; top-1 (%)
    after fine-tuning and of the supervised baseline at every label fraction, after
    distillation (self) at every fraction, and the linear and kNN probes.
    'mean ± sd' over seeds where there are several."""
    models = df[df["stage"] == "pretrain"].drop_duplicates(MODEL_KEYS)[MODEL_KEYS]
    if models.empty:
        models = df[df["stage"] != "pixels"].drop_duplicates(MODEL_KEYS)[MODEL_KEYS]
    models = models.sort_values("params", ignore_index=True)
    out = pd.DataFrame({
        "model": [model_name(d, w, k) for d, w, k in
                  zip(models["depth"], models["width"], models["sk"], strict=True)],
        "params (M)": [f"{p / 1e6:.2f}" for p in models["params"]]})
    fractions = sorted(df["label_fraction"].dropna().unique())

    def column(rows: pd.DataFrame, value: str) -> list[str]:
        return [_cell(rows[np.logical_and.reduce([rows[k] == v for k, v in
                                                  zip(MODEL_KEYS, m, strict=True)])][value])
                for m in models[MODEL_KEYS].itertuples(index=False)]

    for stage, name in (("finetune", "fine-tune"), ("supervised", "supervised"),
                        ("distill", "distilled")):
        rows = df[df["stage"] == stage]
        if stage == "distill":
            rows = rows[rows["student"] == "self"]
        for lf in fractions if not rows.empty else []:
            out[f"{name} {pct(lf)}"] = column(rows[rows["label_fraction"] == lf], "top1")
    pre = df[df["stage"] == "pretrain"].drop_duplicates("stage_key")
    out["linear"] = column(pre, "linear_top1")
    out["kNN"] = column(pre, "knn_top1")
    px = df[df["stage"] == "pixels"].drop_duplicates("stage_key")  # shared by every model
    has_probe = pre.get("pixel_linear_top1", pd.Series(dtype=float)).notna().any()
    if has_probe or not px.empty:
        # Raw pixels: the pixel arm on each fraction's labels (its own columns: a
        # baseline without a network) and the probes on every training label.
        for lf in fractions if not px.empty else []:
            out[f"pixel arm {pct(lf)}"] = "-"
        ref: dict[str, Any] = {c: "-" for c in out.columns} | {"model": PIXELS_ROW}
        ref |= {"params (M)": "0"}
        for lf in fractions if not px.empty else []:
            ref[f"pixel arm {pct(lf)}"] = _cell(px[px["label_fraction"] == lf]["top1"])
        if has_probe:
            ref |= {"linear": _cell(pre["pixel_linear_top1"].iloc[:1]),
                    "kNN": _cell(pre["pixel_knn_top1"].iloc[:1])}
        out = pd.concat([out, pd.DataFrame([ref])], ignore_index=True)
    return out


# What a gain is measured against: the baseline's name, the stages it compares.
BASELINES = {"supervised": ("the tuned supervised baseline", ("finetune", "supervised")),
             "pixels": ("the pixel arm", ("finetune", "pixels")),
             "best": ("the best baseline without pretraining (chosen on validation)",
                      ("finetune", "supervised", "pixels"))}


def _interval_text(lo: float, hi: float) -> str:
    return "n/a (one replicate)" if np.isnan(lo) else f"[{100 * lo:.2f}, {100 * hi:.2f}]"


def gain(df: pd.DataFrame, against: str = "supervised") -> pd.DataFrame:
    """The study's key number: fine-tuned minus a baseline's top-1 (percentage points)
    per model and label fraction, paired within a cell (same labels and seed): mean
    and 95% Student-t interval over independent replicates (values that share a stage
    run count once, analysis.replicates). ``against``: a key of BASELINES. Where the
    head or the fine-tuning layer varies, each is its own line ('R18 1/16x, head 3
    from layer 1')."""
    rows = []
    column = f"gain_over_{against}"
    ft = df[(df["stage"] == "finetune") & df[column].notna()]
    shared = replicates.links(df, ft, BASELINES[against][1])
    heads = ft["head_depth"].nunique() > 1 or ft["ft_layer"].nunique() > 1
    keys = ["model", "params", "head_depth", "ft_layer", "label_fraction"]
    for (model, params, hd, layer, lf), g in ft.groupby(keys, sort=False):
        mean, lo, hi, n = replicates.effect(g[column].to_numpy(), list(shared[g.index]))
        name = f"{model}, head {hd} from layer {layer}" if heads else model
        rows.append({"model": name, "params": int(params), "label fraction": lf,
                     "gain (pp)": round(100 * mean, 2),
                     "95% interval (pp)": _interval_text(lo, hi), "replicates": n,
                     "_lo": 100 * lo, "_hi": 100 * hi})
    if not rows:
        return pd.DataFrame(rows)
    return pd.DataFrame(rows).sort_values(["params", "model", "label fraction"],
                                          ignore_index=True)


def chosen_baseline(df: pd.DataFrame) -> pd.Series:
    """Per (model, label fraction): the baseline validation chose in every fine-tuned
    cell ('pixels' or 'supervised'), or 'mixed' where cells chose differently."""
    ft = df[df["stage"] == "finetune"]
    return ft.groupby(["model", "label_fraction"])["best_baseline"].agg(
        lambda v: v.iloc[0] if v.nunique() == 1 else "mixed")


def gains_table(df: pd.DataFrame) -> pd.DataFrame:
    """gain() against every baseline the study has, one table: an ``against`` column
    names the baseline, parameters in millions. The best-baseline rows only where
    validation chose differently between a row's cells (elsewhere they repeat the
    supervised or pixel rows); ``better on validation`` says which it chose."""
    chose = chosen_baseline(df)
    gains = [gain(df, b).assign(against=BASELINES[b][0])
             for b in BASELINES if df[f"gain_over_{b}"].notna().any()]
    gains = [g.assign(**{"better on validation": [
        chose.get((str(m).split(", head")[0], lf), "-")
        for m, lf in zip(g["model"], g["label fraction"], strict=True)]}) for g in gains]
    best = BASELINES["best"][0]
    gains = [g[g["better on validation"] == "mixed"] if len(g) and g["against"].iloc[0] == best
             else g for g in gains]
    g = pd.concat(gains, ignore_index=True) if gains else pd.DataFrame()
    if g.empty:
        return g
    return g.assign(params=(g["params"] / 1e6).round(2)).rename(
        columns={"params": "params (M)"}).drop(columns=["_lo", "_hi"])


def markdown_table(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (no index; '|' in cells escaped)."""
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |",
             "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def distill_gap(df: pd.DataFrame) -> pd.DataFrame:
    """Distilled student minus its teacher, test top-1 (points), per teacher model,
    label fraction, student and unlabelled set: mean and 95% Student-t interval over
    independent replicates (the paper: a student matches or beats its teacher)."""
    rows = []
    dist = df[(df["stage"] == "distill") & df["top1"].notna() & df["teacher_top1"].notna()]
    keys = ["model", "label_fraction", "student", "unlabelled"]
    for (model, lf, student, unl), g in dist.groupby(keys, sort=False):
        mean, lo, hi, n = replicates.effect((g["top1"] - g["teacher_top1"]).to_numpy(),
                                            list(g["runs"]))
        rows.append({"teacher": model, "label fraction": lf, "student": student,
                     "unlabelled": unl, "student minus teacher (pp)": round(100 * mean, 2),
                     "95% interval (pp)": _interval_text(lo, hi), "replicates": n})
    return pd.DataFrame(rows)
