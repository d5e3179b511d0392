"""Decoding and cropping on the device (runtime.decode: device), run here on the CPU:
the same images, boxes and crops as the loader path, within resampling rounding."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from scaling.configure import with_overrides
from scaling.data import jpeg
from scaling.data.batches import Crops, Fetcher
from scaling.data.datasets import DataError, FolderImages

CPU = torch.device("cpu")


def _photos(root, n=6, width=80, height=60):
    """Smooth random colour fields saved as JPEG (they compress like photos)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(n):
            coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
            img.save(root / "train" / c / f"{c}_{i}.jpg", quality=90)
    return FolderImages(root / "train", 32, "imagefolder")


def _encoded(ds):
    items = [jpeg.EncodedFiles(ds)[i] for i in range(len(ds))]
    return jpeg.collate(items)


def test_a_batch_decodes_to_the_images_pil_decodes(tmp_path):
    ds = _photos(tmp_path)
    data, labels, _ = _encoded(ds)
    images = jpeg.decode(data, CPU)
    assert labels.tolist() == ds.labels.tolist()
    for i, img in enumerate(images):
        ref = ds.decode(i)
        assert img.shape == ref.shape == (3, 60, 80)
        # Two builds of libjpeg(-turbo) may round the inverse DCT differently.
        assert (img.int() - ref.int()).abs().float().mean() < 0.5


def test_crops_are_the_loader_paths_boxes_within_rounding(tmp_path):
    ds = _photos(tmp_path)
    data, _, _ = _encoded(ds)
    images = jpeg.decode(data, CPU)
    seeds = list(range(100, 100 + len(ds)))
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    crops = jpeg.crop_resize(images, jpeg.crop_boxes(images, seeds, 3, scale, ratio), 32)
    assert crops.shape == (len(ds), 3, 3, 32, 32) and crops.dtype == torch.uint8
    for i, seed in enumerate(seeds):
        ref, _ = ds[(i, seed, 3, scale, ratio)]
        diff = (crops[i].float() - ref.float()).abs()
        # Same box: a wrong box or a shifted grid differs by tens of grey levels.
        assert diff.mean() < 1.5 and diff.max() <= 12, (i, diff.mean(), diff.max())
    views = jpeg.crop_resize(images, jpeg.centre_boxes(images), 32)[:, 0]
    for i in range(len(ds)):
        assert (views[i].float() - ds[i][0].float()).abs().mean() < 1.5


def test_the_fetcher_decodes_on_the_device_like_the_loader(tmp_path):
    ds = _photos(tmp_path)
    batches = [np.array([0, 7, 3]), np.array([11, 2, 5])]
    crops = Crops(2, (0.08, 1.0), (0.75, 4 / 3), 5)
    loader, device = Fetcher(ds, CPU, workers=0), Fetcher(ds, CPU, 0, decode_on_device=True)
    for view in (crops, None):
        for (xa, ya), (xb, yb) in zip(loader.stream(batches, view),
                                      device.stream(batches, view), strict=True):
            assert xa.shape == xb.shape and torch.equal(ya, yb)
            assert (xa.float() - xb.float()).abs().mean() < 1.5
    assert device.like(ds).decode_on_device


def test_files_the_jpeg_decoder_refuses_are_read_by_pil_and_only_junk_is_named(tmp_path):
    """ImageNet's train set holds a PNG and CMYK JPEGs under .JPEG names: the batch
    decodes, those files through PIL; a file no decoder reads is named."""
    from PIL import Image

    ds_root = tmp_path
    _photos(ds_root, n=2)
    png = Image.new("RGB", (20, 24), (200, 30, 60))
    png.save(ds_root / "train" / "a" / "png.JPEG", format="PNG")
    Image.new("CMYK", (22, 18), (10, 200, 30, 0)).save(ds_root / "train" / "a" / "cmyk.JPEG",
                                                        format="JPEG")
    ds = FolderImages(ds_root / "train", 32, "imagefolder")
    fetch = Fetcher(ds, CPU, 0, decode_on_device=True)
    files = [str(p) for p, _ in ds.folder.samples]
    data = [jpeg.EncodedFiles(ds)[i][0] for i in range(len(ds))]
    images = jpeg.decode(data, CPU, files)
    by_name = dict(zip((Path(f).name for f in files), images, strict=True))
    assert torch.equal(by_name["png.JPEG"], torch.tensor([200, 30, 60]).view(3, 1, 1).expand(
        3, 24, 20).to(torch.uint8))
    assert by_name["cmyk.JPEG"].shape == (3, 18, 22)
    (x, _), = fetch.stream([np.arange(len(ds))])
    assert x.shape[0] == len(ds)
    (ds_root / "train" / "a" / "junk.JPEG").write_bytes(b"not an image at all")
    ds = FolderImages(ds_root / "train", 32, "imagefolder")
    with pytest.raises(DataError, match=r"junk\.JPEG does not decode as a JPEG"):
        list(Fetcher(ds, CPU, 0, decode_on_device=True).stream([np.arange(len(ds))]))


def test_the_setting_is_checked_and_reaches_the_fetcher(tiny):
    from scaling.config import ConfigError
    from scaling.data.datasets import synthetic

    cfg = with_overrides(tiny, {"runtime.decode": "device"})
    assert Fetcher.of(synthetic("train", n=8), CPU, cfg.runtime).decode_on_device
    with pytest.raises(ConfigError, match="decode"):
        with_overrides(tiny, {"runtime.decode": "gpu"})


@pytest.mark.parametrize("on_device", [False, True])
def test_training_batches_keep_their_loader_workers_across_epochs(tmp_path, on_device):
    """One DataLoader for training with persistent workers: epoch 2 is decoded by the
    processes that decoded epoch 1 (a new pool per epoch cost seconds per rank)."""
    ds = _photos(tmp_path)
    fetch = Fetcher(ds, CPU, 1, decode_on_device=on_device)
    pids = []
    for epoch in range(2):
        crops = Crops(2, (0.08, 1.0), (0.75, 4 / 3), epoch)
        batches = [np.array([0, 7, 3]), np.array([11, 2, 5])]
        assert len(list(fetch.stream(batches, crops))) == 2
        pids.append(_workers(fetch, "train"))
    assert pids[0] == pids[1] and all(pids[0])
    # A stage that stops mid-epoch (a resumed run's first epoch) does not wedge the next.
    first = next(fetch.stream(batches, Crops(2, (0.08, 1.0), (0.75, 4 / 3), 5)))
    assert first[0].shape[:2] == (3, 2)
    assert len(list(fetch.stream(batches, Crops(2, (0.08, 1.0), (0.75, 4 / 3), 6)))) == 2


def _workers(fetch: Fetcher, use: str) -> list[int]:
    loader = next(loader for (u, _), (loader, _) in fetch._persistent.items() if u == use)
    return [w.pid for w in loader._iterator._workers]  # type: ignore[union-attr]


@pytest.mark.parametrize("on_device", [False, True])
def test_single_batches_keep_one_loader_between_training_batches(tmp_path, on_device):
    """Distillation with alpha > 0 asks the fetcher for a labelled batch every step,
    while the same fetcher streams the unlabelled epoch: one loader serves every call
    (a new one a step started its worker processes each step), and the stream goes on."""
    ds = _photos(tmp_path)
    fetch = Fetcher(ds, CPU, 1, decode_on_device=on_device)
    crops = Crops(2, (0.08, 1.0), (0.75, 4 / 3), 0)
    stream = fetch.stream([np.array([0, 7, 3]), np.array([11, 2, 5])], crops)
    pids = []
    for step, idx in enumerate([np.array([1, 4]), np.array([6, 8])]):
        assert next(stream)[0].shape[:2] == (3, 2), step  # the training batch
        x, y = fetch(idx)  # then the labelled one
        assert x.shape[0] == 2 and torch.equal(y, ds.labels[torch.from_numpy(idx)])
        pids.append(_workers(fetch, "call"))
    assert pids[0] == pids[1] and all(pids[0])


def test_crops_of_a_mixed_size_batch_match_cropping_each_image_alone():
    """Grouped by shape (one roi_align per size): every image keeps its own crops,
    in its place in the batch."""
    g = torch.Generator().manual_seed(0)
    sizes = [(30, 40), (25, 25), (30, 40), (44, 31), (25, 25)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
              for h, w in sizes]
    boxes = jpeg.crop_boxes(images, [3, 1, 4, 1, 5], 2, (0.08, 1.0), (0.75, 4 / 3))
    batch = jpeg.crop_resize(images, boxes, 16)
    for i, (img, b) in enumerate(zip(images, boxes, strict=True)):
        assert torch.equal(batch[i], jpeg.crop_resize([img], [b], 16)[0]), i
    assert not torch.equal(batch[0], batch[2])  # same size, other boxes and pixels


def test_device_decode_hands_over_by_events_without_a_host_wait(monkeypatch):
    """The CUDA branch, rehearsed with stand-in streams: the batch is decoded on a side
    stream, the training stream waits for it on the device, each image's memory is
    kept until the training stream is done, and nothing makes the host wait (the
    old branch's stream.synchronize() fails this)."""
    from unittest import mock

    calls: list[str] = []
    main, side = mock.MagicMock(name="main"), mock.MagicMock(name="side")
    main.synchronize.side_effect = side.synchronize.side_effect = \
        lambda: calls.append("host wait")
    main.wait_stream.side_effect = lambda s: calls.append(f"main waits for {s._mock_name}")
    images = [mock.MagicMock(), mock.MagicMock()]
    for i, image in enumerate(images):
        image.record_stream.side_effect = lambda s, i=i: calls.append(f"{i} kept for "
                                                                      f"{s._mock_name}")

    @contextlib.contextmanager
    def on(stream):
        calls.append(f"on {stream._mock_name}")
        yield
        calls.append(f"off {stream._mock_name}")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: side)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(jpeg, "_decode", lambda *a: calls.append("decode") or images)
    monkeypatch.setattr(jpeg, "_SIDE", {})
    assert jpeg.decode([torch.zeros(4, dtype=torch.uint8)], torch.device("cuda", 0)) == images
    assert calls == ["on side", "decode", "off side", "main waits for side",
                     "0 kept for main", "1 kept for main"]
