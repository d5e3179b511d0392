"""ImageNet-style folders: training views cut from the full image vs the old centre square.

    .venv/bin/python bench/folder.py [--images 256] [--batch 64] [--repeats 3]

Generates ``--images`` JPEGs of ImageNet's typical size (500x375, quality 90; smooth
random colour fields, so they compress like photos rather than like noise) and
times, in this one process with one torch thread (so the numbers are per core):
  decode   PIL decode to a uint8 tensor only
  old      decode, resize the short side to 224, centre-crop 224 (the previous
           FolderImages), then two batched views (crop, flip, colour, blur)
  new      decode once, two random-resized crops of the full image resized to 224
           with antialiasing (FolderImages' training request), then flip, colour,
           blur batched (scaling.data.augment.augment_views)
  eval     decode, central 87.5% square, resize to 224 (the evaluation view)
  tv       torchvision.io.decode_jpeg on the CPU (libjpeg-turbo), decode only
  draft    PIL with JPEG draft mode (DCT-domain downscale by 2 while decoding), decode
           only; and the share of training crops draft mode could serve (a crop can
           be decoded at 1/2 only if its shorter side is at least 2 x 224)
  device   runtime.decode: device on this CPU: read bytes, decode the batch,
           2 crops per image with roi_align (scaling.data.jpeg), no colour ops
Each variant runs ``--repeats`` times, alternating; medians are printed with the
new/old ratio, the share of the new path spent on the CPU side (decode + crops),
and the CPU cores that side needs to feed a GPU at 3,500 pairs/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from scaling.data.augment import ViewSpec, augment, augment_views
from scaling.data.datasets import FolderImages

SPEC = ViewSpec(color_strength=1.0, blur_p=0.5)  # the ImageNet recipe
SIZE = 224
TARGET_PAIRS_PER_S = 3500  # an H100/H200-class GPU on ResNet-50 (issue 18's figure)


def make_jpegs(root: Path, n: int, width: int = 500, height: int = 375) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "train" / "c").mkdir(parents=True)
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (height, width, 3))
        pixels = np.clip(np.asarray(img).astype(int) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "train" / "c" / f"img_{i}.JPEG", quality=90)


def old_view(ds: FolderImages, i: int) -> torch.Tensor:
    from torchvision.transforms.v2.functional import center_crop, resize

    img = ds.decode(i)
    return center_crop(resize(img, [SIZE], antialias=True), [SIZE])


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run(images: int, batch: int, repeats: int) -> dict[str, float]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(Path(tmp), images)
        ds = FolderImages(Path(tmp) / "train", SIZE, "imagefolder")
        gen = torch.Generator().manual_seed(0)
        batches = [range(s, min(s + batch, images)) for s in range(0, images, batch)]
        crop_s: dict[str, list[float]] = {
            k: [] for k in ("decode", "old", "new", "eval", "tv", "draft", "device")}
        files = [path for path, _ in ds.folder.samples]
        aug_s: dict[str, list[float]] = {"old": [], "new": []}

        def old() -> None:
            for b in batches:
                t0 = time.perf_counter()
                x = torch.stack([old_view(ds, i) for i in b])
                t1 = time.perf_counter()
                augment(x, SPEC, gen), augment(x, SPEC, gen)
                crop_s["old"][-1] += t1 - t0
                aug_s["old"][-1] += time.perf_counter() - t1

        def new() -> None:
            for b in batches:
                t0 = time.perf_counter()
                x = torch.stack([ds[(i, i, 2, SPEC.crop_scale, SPEC.crop_ratio)][0] for i in b])
                t1 = time.perf_counter()
                augment_views(x, SPEC, gen, 2)
                crop_s["new"][-1] += t1 - t0
                aug_s["new"][-1] += time.perf_counter() - t1

        for _ in range(repeats):
            crop_s["tv"].append(timed(lambda: tv_decode(files)))
            crop_s["draft"].append(timed(lambda: draft_decode(files)))
            crop_s["device"].append(timed(lambda: [device_crops(ds, b) for b in batches]))
            crop_s["decode"].append(timed(lambda: [ds.decode(i) for i in range(images)]))
            crop_s["eval"].append(timed(lambda: [ds[i] for i in range(images)]))
            for name, fn in (("old", old), ("new", new)):
                crop_s[name].append(0.0)
                aug_s[name].append(0.0)
                fn()
    med = {k: statistics.median(v) for k, v in crop_s.items()}
    aug = {k: statistics.median(v) for k, v in aug_s.items()}
    return {
        "decode_img_s": images / med["decode"], "eval_img_s": images / med["eval"],
        "old_pairs_s": images / (med["old"] + aug["old"]),
        "new_pairs_s": images / (med["new"] + aug["new"]),
        "new_cpu_pairs_s": images / med["new"], "new_cpu_share": med["new"] / (
            med["new"] + aug["new"]),
        "tv_img_s": images / med["tv"], "draft_img_s": images / med["draft"],
        "device_pairs_s": images / med["device"], "draft_share": draft_share(ds),
    }


def tv_decode(files: list[str]) -> None:
    from scaling.data.jpeg import decode

    decode([torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8)
            for f in files], torch.device("cpu"))


def draft_decode(files: list[str]) -> None:
    from PIL import Image

    for f in files:
        with Image.open(f) as img:
            img.draft("RGB", (img.width // 2, img.height // 2))
            img.convert("RGB").load()


def device_crops(ds: FolderImages, batch: range) -> torch.Tensor:
    from scaling.data import jpeg

    data, _, paths = jpeg.collate([jpeg.EncodedFiles(ds)[i] for i in batch])
    images = jpeg.decode(data, torch.device("cpu"), paths)
    boxes = jpeg.crop_boxes(images, list(batch), 2, SPEC.crop_scale, SPEC.crop_ratio)
    return jpeg.crop_resize(images, boxes, SIZE)


def draft_share(ds: FolderImages, draws: int = 4000) -> float:
    """Training crops (ImageNet's area and aspect ranges) of a 500x375 image whose
    shorter side is at least twice the output: those a 1/2 draft decode could serve."""
    from scaling.data.augment import sample_crops

    g = torch.Generator().manual_seed(0)
    boxes = sample_crops(draws, 375, 500, SPEC.crop_scale, SPEC.crop_ratio, g,
                         torch.device("cpu"))
    return float((boxes[:, 2:].min(1).values >= 2 * SIZE).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256,
                        help="JPEG images written to a temporary folder and decoded")
    parser.add_argument("--batch", type=int, default=64, help="images per timed batch")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes per loader (the median is printed)")
    args = parser.parse_args()
    r = run(args.images, args.batch, args.repeats)
    print(f"{args.images} JPEGs 500x375 q90, 1 torch thread, torch {torch.__version__}")
    print(f"decode only                    {r['decode_img_s']:8.1f} images/s per core")
    print(f"eval view (87.5% centre, 224)  {r['eval_img_s']:8.1f} images/s per core")
    print(f"old: centre square + 2 views   {r['old_pairs_s']:8.1f} pairs/s per core")
    print(f"new: full-image crops + views  {r['new_pairs_s']:8.1f} pairs/s per core "
          f"(new/old {r['new_pairs_s'] / r['old_pairs_s']:.2f})")
    print(f"new, decode + 2 crops only     {r['new_cpu_pairs_s']:8.1f} pairs/s per core "
          f"({100 * r['new_cpu_share']:.0f}% of the new path on a CPU)")
    print(f"torchvision.io decode only     {r['tv_img_s']:8.1f} images/s per core "
          f"(PIL {r['decode_img_s']:.1f})")
    print(f"PIL draft mode 1/2, decode     {r['draft_img_s']:8.1f} images/s per core; usable "
          f"for {100 * r['draft_share']:.1f}% of training crops at {SIZE} px")
    print(f"runtime.decode device, on CPU  {r['device_pairs_s']:8.1f} pairs/s per core "
          "(bytes, batch decode, 2 roi_align crops)")
    for target in (TARGET_PAIRS_PER_S, 1800):
        print(f"cores to decode + crop {target} pairs/s (colour ops on the GPU): "
              f"{target / r['new_cpu_pairs_s']:.1f}")


if __name__ == "__main__":
    main()
