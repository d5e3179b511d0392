"""The pixel arm: ridge and kNN against their definitions, and the stage on tiny data."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scaling.configure import with_overrides
from scaling.stages.pixels import knn_votes, pixel_features, ridge_fits
from scaling.stages.registry import run as run_stage
from scaling.stages.registry import stage_key
from tests.tolerance import assert_close_at_scale


def _data(n: int, d: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.randn(classes, d, generator=g)
    return centres[y] + 0.8 * torch.randn(n, d, generator=g), y


@pytest.mark.parametrize("n", [12, 80])  # fewer rows than features, and more
def test_ridge_solves_the_regularised_normal_equations(n):
    x, y = _data(n, 30, 4)
    x = x + 5  # an offset the intercept has to absorb
    fits = ridge_fits(x, y, 4, (0.01, 1.0))
    xc = (x - x.mean(0)).double()
    yc = F.one_hot(y, 4).double() - F.one_hot(y, 4).double().mean(0)
    scale = float(xc.square().sum()) / n  # the mean squared norm of a centred row
    for lam, (w, b) in fits.items():
        want = torch.linalg.solve(xc.T @ xc + lam * scale * torch.eye(30), xc.T @ yc)
        assert_close_at_scale(w, want, rel=1e-4, name=f"weight at {lam}")
        # The bias makes the fit pass through the means: mean prediction = class prior.
        assert_close_at_scale((x @ w + b).mean(0), torch.full((4,), 0.25), rel=1e-4)


def test_ridge_shrinks_to_the_prior_and_fits_separable_data_when_weak():
    x, y = _data(200, 10, 3)
    fits = ridge_fits(x, y, 3, (1e-6, 1e6))
    w, b = fits[1e-6]
    assert float(((x @ w + b).argmax(1) == y).double().mean()) > 0.95
    w, _ = fits[1e6]
    assert float(w.abs().max()) < 1e-4 * float(fits[1e-6][0].abs().max())


def test_knn_is_a_majority_of_the_nearest_with_nearer_breaking_ties():
    x, y = _data(60, 5, 3, seed=1)
    q, _ = _data(25, 5, 3, seed=2)
    got = knn_votes(x, y, q, 3, (1, 5))
    d = torch.cdist(q.double(), x.double())
    order = d.argsort(1)
    assert torch.equal(got[1], y[order[:, 0]])
    for i in range(len(q)):
        near = y[order[i, :5]].tolist()
        counts = np.bincount(near, minlength=3)
        best = np.flatnonzero(counts == counts.max())
        nearness = {c: sum(5 - r for r, v in enumerate(near) if v == c) for c in best}
        assert int(got[5][i]) == max(best, key=lambda c: nearness[c])
    # Two neighbours of different classes: the nearer decides.
    two = knn_votes(torch.tensor([[0.0], [3.0]]), torch.tensor([0, 1]),
                    torch.tensor([[1.0], [2.5]]), 2, (2, 50))
    assert two[2].tolist() == [0, 1] and two[50].tolist() == [0, 1]  # k capped at 2 rows


def test_pixel_features_area_average_large_images():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert pixel_features(x, 8).shape == (2, 192)
    small = pixel_features(x, 4)
    assert small.shape == (2, 48)
    assert float(small[0, 0]) == pytest.approx(float(x[0, 0, :2, :2].mean()))


def test_the_stage_chooses_on_validation_and_its_key_ignores_model_and_seed(tiny, tmp_path):
    cfg = with_overrides(tiny, {"finetune.label_fraction": 0.5, "label_fractions": []})
    r = run_stage("pixels", cfg, tmp_path / "px")
    m, p = r["metrics"], r["protocol"]
    assert p["chosen_on"] == "validation top-1"
    chosen_val = {"ridge": p["ridge_val_top1"][f"{p['ridge_strength']:g}"],
                  "knn": p["knn_val_top1"][str(p["knn_k"])]}
    assert chosen_val["ridge"] == max(p["ridge_val_top1"].values())
    assert chosen_val["knn"] == max(p["knn_val_top1"].values())
    assert m["val_top1"] == max(chosen_val.values()) == chosen_val[p["arm"]]
    assert m["test_top1"] == m[f"pixel_{p['arm']}_top1"]
    assert m["val_top1"] > 1.5 / 4  # synthetic data's 4 classes are separable from pixels
    labels = (tmp_path / "px" / "labels.txt").read_text().split()
    assert len(labels) == m["labelled_examples"]
    assert json.loads((tmp_path / "px" / "result.json").read_text())["stage"] == "pixels"
    # One run per (data, labels): models and seeds share it, another subset does not.
    same = with_overrides(cfg, {"model.width": 0.125, "seed": 3})
    assert stage_key(same, "pixels") == stage_key(cfg, "pixels")
    assert stage_key(same, "supervised") != stage_key(cfg, "supervised")
    other = with_overrides(cfg, {"finetune.subset_seed": 1})
    assert stage_key(other, "pixels") != stage_key(cfg, "pixels")
    assert run_stage("pixels", cfg, tmp_path / "px") == r  # finished: read back, not recomputed


def test_without_validation_nothing_is_chosen(tiny, tmp_path):
    cfg = with_overrides(tiny, {"finetune.label_fraction": 0.5, "label_fractions": [],
                                "data.val_size": 0, "supervised.lr_grid": []})
    r = run_stage("pixels", cfg, tmp_path / "px")
    m, p = r["metrics"], r["protocol"]
    assert p["chosen_on"].startswith("nothing") and m["val_top1"] is None
    assert (p["arm"], p["knn_k"]) == ("ridge", cfg.pixels.knn_k[0])
    assert p["ridge_strength"] == cfg.pixels.ridge_grid[len(cfg.pixels.ridge_grid) // 2]


def test_raw_pixels_are_native_whatever_size_the_networks_see(tiny, tmp_path):
    cfg = with_overrides(tiny, {"finetune.label_fraction": 0.5, "label_fractions": [],
                                "data.image_size": 24})
    r = run_stage("pixels", cfg, tmp_path / "px")
    assert r["protocol"]["native_size"] and r["protocol"]["features"] == 16 * 16  # not 24 x 24
