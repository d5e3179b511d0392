"""JPEG decoding and full-image crops on the training device (``runtime.decode: device``).

The default path (``loader``) decodes with PIL in DataLoader worker processes and
cuts each image's random-resized crops there (FolderImages). On this path the
workers only read each file's bytes; the main process decodes the batch with
``torchvision.io.decode_jpeg(..., device=...)`` (nvJPEG on a GPU, libjpeg-turbo on a
CPU) and cuts the same boxes with ``torchvision.ops.roi_align``: one bilinear sample
grid per output pixel, as many samples per pixel as the crop is larger than the
output (``sampling_ratio=-1``), so a downscale averages instead of aliasing.

The boxes come from the same per-image seeds and rule as the loader path
(augment.sample_crops), so both cut the same crops; the pixels differ by the
decoders' and resamplers' rounding (measured in tests/test_jpeg.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from scaling.data import datasets
from scaling.data.datasets import DataError, FolderImages


class EncodedFiles(torch.utils.data.Dataset):
    """A folder dataset's files as encoded bytes: all a loader worker does here."""

    def __init__(self, images: FolderImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        path, label = self.images.folder.samples[i]
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        return data, label, path


def collate(items: list[tuple[torch.Tensor, int, str]]
            ) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    return ([d for d, _, _ in items], torch.tensor([y for _, y, _ in items]),
            [p for _, _, p in items])


def decode(data: list[torch.Tensor], device: torch.device, paths: list[str] | None = None
           ) -> list[torch.Tensor]:
    """RGB uint8 CxHxW images on ``device`` from encoded bytes (1-D uint8, on the CPU),
    decoded as one batch. A file the JPEG decoder refuses (ImageNet's train set has
    a PNG and CMYK JPEGs named .JPEG) is read by PIL instead, that file only; one
    PIL cannot read either is named (``paths``)."""
    if device.type != "cuda":
        return _decode(data, device, paths)
    # torchvision's decoder writes, on a stream of its own, into tensors it allocates on
    # the current stream; there the caching allocator may hand it memory the training
    # stream's queued kernels still read. So the batch is allocated on a side stream
    # (memory those kernels never held) and handed over by events: the training stream
    # waits for the decode on the device, and each image's memory is not reused before
    # the training stream is done with it. The host waits for nothing (a
    # stream.synchronize() here stalled the loop every batch).
    main = torch.cuda.current_stream(device)
    side = _side_stream(device)
    with torch.cuda.stream(side):
        images = _decode(data, device, paths)
    main.wait_stream(side)
    for image in images:
        image.record_stream(main)
    return images


_SIDE: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream(device)
    return _SIDE[device]


def _decode(data: list[torch.Tensor], device: torch.device, paths: list[str] | None
            ) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec's; we pin 0.29.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # the batch fails as a whole: decode file by file
            out = []
            for i, d in enumerate(data):
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as e:
                    name = paths[i] if paths else f"image {i} of the batch"
                    out.append(_with_pil(d, name, e).to(device))
            return out


def _with_pil(data: torch.Tensor, name: str, error: Exception) -> torch.Tensor:
    """One file through PIL (any format it reads, CMYK converted to RGB)."""
    import io

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError):
        raise DataError(f"{name} does not decode as a JPEG ({error}) nor as any image PIL "
                        "reads; replace or remove it") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def crop_boxes(images: list[torch.Tensor], seeds: list[int], views: int,
               scale: tuple[float, float], ratio: tuple[float, float]) -> list[torch.Tensor]:
    """Per image, ``views`` boxes (y0, x0, h, w), exactly as FolderImages draws them."""
    return [datasets.crop_boxes(img.shape[1], img.shape[2], seed, views, scale, ratio)
            for img, seed in zip(images, seeds, strict=True)]


def centre_boxes(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """The evaluation view's box per image (FolderImages' central square)."""
    return [datasets.centre_box(img.shape[1], img.shape[2]).unsqueeze(0) for img in images]


def crop_resize(images: list[torch.Tensor], boxes: list[torch.Tensor], size: int
                ) -> torch.Tensor:
    """NxVxCxSxS uint8: each image's V boxes (y0, x0, h, w) resized to ``size``.

    One ``roi_align`` call per distinct image shape (one for a set of equal sizes; a
    few for ImageNet's), with every box and index sent to the device in one pinned
    copy. Not one call for the whole batch: that needs the images padded to the
    batch's largest, and one 2,500 px outlier makes 256 padded images 19 GB."""
    from torchvision.ops import roi_align

    device, views = images[0].device, len(boxes[0])
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    order = [i for idx in groups.values() for i in idx]
    # roi_align's boxes: (index in its stack, x1, y1, x2, y2); aligned=True reads them
    # with pixel i covering [i, i + 1), as the (y0, x0, h, w) boxes mean.
    rows = []
    for idx in groups.values():
        for j, i in enumerate(idx):
            b = boxes[i].float()
            rows.append(torch.stack([torch.full_like(b[:, 0], j), b[:, 1], b[:, 0],
                                     b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], dim=1))
    host = torch.cat([torch.cat(rows).flatten(),
                      torch.tensor(order, dtype=torch.float32).argsort().float()])
    if device.type == "cuda":
        host = host.pin_memory()
    sent = host.to(device, non_blocking=True)
    rois, back = sent[:5 * views * len(images)].view(-1, 5), sent[5 * views * len(images):]
    out, start = [], 0
    for idx in groups.values():
        stack = torch.stack([images[i] for i in idx]).float()
        n = len(idx) * views
        out.append(roi_align(stack, rois[start:start + n], output_size=size,
                             spatial_scale=1.0, sampling_ratio=-1, aligned=True))
        start += n
    crops = torch.cat(out).view(len(images), views, -1, size, size)
    return crops.index_select(0, back.long()).round_().clamp_(0, 255).to(torch.uint8)
