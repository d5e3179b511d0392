"""The probes of scaling/stages/evaluate.py against naive references: kNN by brute force,
the linear probe on separable data."""

import numpy as np
import pytest
import torch

from scaling.stages.evaluate import fit_linear_probe, knn_accuracy, linear_probe, top1


def _features(n: int, dim: int = 16, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + 0.8 * torch.randn(n, dim, generator=g), labels


def _naive_knn(train, train_labels, test, classes, k, temperature):
    """Per test point: cosine similarities to every training point, the k largest,
    one vote exp(s / T) each for their class; the class with most weight."""
    tr = train.numpy() / np.linalg.norm(train.numpy(), axis=1, keepdims=True)
    te = test.numpy() / np.linalg.norm(test.numpy(), axis=1, keepdims=True)
    out = []
    for row in te @ tr.T:
        near = np.argsort(-row)[:k]
        votes = np.zeros(classes)
        for i in near:
            votes[train_labels[i]] += np.exp(row[i] / temperature)
        out.append(votes.argmax())
    return np.array(out)


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.1), (7, 0.1), (50, 0.5)])
def test_knn_matches_a_brute_force_vote(k, temperature):
    train, train_labels = _features(600)
    # 1,500 test points: more than one of knn_accuracy's 1,024-row blocks.
    test, test_labels = _features(1500, seed=1)
    expected = _naive_knn(train, train_labels.numpy(), test, 5, k, temperature)
    got = knn_accuracy(train, train_labels, test, test_labels, 5, k=k, temperature=temperature)
    assert got == pytest.approx(float((expected == test_labels.numpy()).mean()), abs=1e-9)


def test_knn_with_k_1_finds_each_training_point_itself():
    train, labels = _features(300)
    assert knn_accuracy(train, labels, train, labels, 5, k=1) == 1.0
    # k above the training set's size is capped, not an error.
    assert 0 < knn_accuracy(train, labels, train, labels, 5, k=10_000) <= 1


def test_the_linear_probe_separates_linearly_separable_classes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 4, generator=g)
    x = torch.randn(2000, 32, generator=g)
    y = (x @ w).argmax(1)
    margin = (x @ w).topk(2, dim=1).values
    keep = (margin[:, 0] - margin[:, 1]) > 0.5  # a margin, so L-BFGS can reach it
    x, y = x[keep], y[keep]
    half = len(x) // 2
    # Separable: every training point right. Held out, the fitted boundary is an
    # estimate from ~500 points in 32 dimensions: nearly every point right.
    assert linear_probe(x[:half], y[:half], x[:half], y[:half], 4, steps=200,
                        weight_decay=0.0) == 1.0
    assert linear_probe(x[:half], y[:half], x[half:], y[half:], 4, steps=200,
                        weight_decay=0.0) > 0.95


def test_the_linear_probe_standardises_its_inputs():
    """An affine change of every feature's units changes nothing the probe predicts."""
    x, y = _features(400, dim=8)
    scale = torch.logspace(-3, 3, 8)
    a = fit_linear_probe(x, y, 5, steps=50)
    b = fit_linear_probe(x * scale + 7.0, y, 5, steps=50)
    test, _ = _features(200, dim=8, seed=2)
    # Standardised, the two inputs agree to float32 rounding; L-BFGS may carry that
    # difference to a point or two on the boundary, not further.
    same = (a(test).argmax(1) == b(test * scale + 7.0).argmax(1)).float().mean()
    assert same >= 0.99


def test_top1_counts_argmax_matches():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert top1(logits, torch.tensor([1, 0, 0, 1])) == 0.5


def test_the_probe_fits_on_a_bounded_class_balanced_sample():
    """ImageNet's 1.27M training images would keep rank 0 encoding past the group's
    collective timeout: the probes take at most PROBE_MAX_TRAIN, balanced, never
    from validation; a set under the bound is used whole."""
    from scaling.data.datasets import ImageData
    from scaling.data.splits import Splits
    from scaling.stages.pretrain import PROBE_MAX_TRAIN, probe_images

    n, classes = 250_000, 1000
    labels = torch.arange(n) % classes
    big = ImageData(torch.empty(n, 1, 1, 1, dtype=torch.uint8), labels, classes, "big")
    val = np.arange(0, n, 7)  # every class keeps images outside validation
    splits = Splits(big, val, np.setdiff1d(np.arange(n), val), big)
    chosen = probe_images(splits)
    assert len(chosen) == PROBE_MAX_TRAIN and not np.intersect1d(chosen, val).size
    assert set(np.bincount(labels.numpy()[chosen], minlength=classes)) == {100}
    small = Splits(big, val[:10], np.arange(5000), big)
    assert np.array_equal(probe_images(small), np.arange(5000))


def _probe_worker(rank, world, init_file, out):
    import datetime

    import torch.distributed as dist

    from scaling.configure import PRESETS, load_config
    from scaling.data.batches import Fetcher
    from scaling.data.splits import load_splits
    from scaling.stages.evaluate import apply
    from scaling.stages.pretrain import probe
    from scaling.train.env import Env

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    cfg = load_config(PRESETS / "tiny.yaml", {"runtime.device": "cpu"})
    env = Env(torch.device("cpu"), rank=rank, world=world)
    splits = load_splits(cfg.data)
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 8))
    fetch = Fetcher.of(splits.train, env.device, cfg.runtime)
    features = apply(encoder, [encoder], fetch, splits.rest[:101], env, shard=True)
    out[rank] = (features, probe(cfg, encoder, [encoder], splits, None, env))
    dist.destroy_process_group()


def test_the_probe_is_encoded_in_shares_and_fitted_once():
    """Two gloo workers each encode half of the probe's images and all get every
    feature, in order (101 rows: the shares differ); rank 0's probe equals one
    worker's, and the other rank returns nothing to report."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    from scaling.configure import PRESETS, load_config
    from scaling.data.batches import Fetcher
    from scaling.data.splits import load_splits
    from scaling.stages.evaluate import apply
    from scaling.stages.pretrain import probe
    from scaling.train.env import Env

    with tempfile.TemporaryDirectory() as d:
        out = mp.Manager().dict()
        mp.spawn(_probe_worker, args=(2, os.path.join(d, "init"), out), nprocs=2)
    cfg = load_config(PRESETS / "tiny.yaml", {"runtime.device": "cpu"})
    splits, env = load_splits(cfg.data), Env(torch.device("cpu"))
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 8))
    fetch = Fetcher.of(splits.train, env.device, cfg.runtime)
    alone, labels = apply(encoder, [encoder], fetch, splits.rest[:101], env)
    for rank in (0, 1):
        shared, shared_labels = out[rank][0]
        assert torch.equal(shared_labels, labels)
        assert torch.allclose(shared, alone)  # the same rows, in the same order
    assert out[1][1] == {}
    assert out[0][1] == pytest.approx(probe(cfg, encoder, [encoder], splits, None, env))


def test_the_collective_timeout_reaches_the_process_group():
    """Rank 0 evaluates while the others wait in a collective: the timeout is set,
    not left to the backend's default (runtime.collective_timeout_s)."""
    pytest.importorskip("ray")
    from scaling.config import RuntimeConfig
    from scaling.runtime.ray_train import trainer

    t = trainer(lambda c: None, {}, RuntimeConfig(workers=2, collective_timeout_s=77), "n",
                "/tmp/unused")
    assert t.backend_config.timeout_s == 77
