"""SimCLR view augmentation as batched tensor ops on whatever device the batch is on.

Every random draw comes from an explicit ``torch.Generator`` (on the batch's
device), so a seed reproduces the views exactly. Pixels stay in [0, 1] with no
mean/std normalisation, as in the reference. Per view (reference data_util.py):
random resized crop (area [0.08, 1], aspect [3/4, 4/3], continuous boxes,
bilinear resampling) + horizontal flip; colour jitter with p = 0.8 (brightness,
contrast, saturation 0.8s and hue 0.2s in a random order per image, clipped after
each); grayscale with p = 0.2; Gaussian blur with p = 0.5, sigma U[0.1, 2], kernel
10% of the image side (reflect padding; the reference zero-pads).
Differences we chose: the reference's 10% object-cover constraint needs boxes we
do not have, so only the area range applies; saturation blends with the
grayscale image (torchvision's rule) instead of scaling S in HSV. One-channel
images skip saturation, hue and grayscale, which are identities for them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scaling.config import AugmentConfig

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale


@dataclass(frozen=True)
class ViewSpec:
    """What one augmented view does; ``view_spec`` maps a config's ``AugmentConfig`` onto it."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    color_strength: float = 1.0  # 0.5 for CIFAR in the paper; 0 turns jitter off
    color_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0  # 0.5 on ImageNet only
    blur_sigma: tuple[float, float] = (0.1, 2.0)


def view_spec(cfg: AugmentConfig) -> ViewSpec:
    return ViewSpec(
        crop_scale=(cfg.crop_min_scale, 1.0), color_strength=cfg.color_strength,
        color_p=cfg.color_p, grayscale_p=cfg.grayscale_p, blur_p=cfg.blur_p,
    )


CROP_FLIP = ViewSpec(color_strength=0.0, grayscale_p=0.0, blur_p=0.0)


def _uniform(
    n: int, lo: float, hi: float, g: torch.Generator, device: torch.device
) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def sample_crops(
    n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
    g: torch.Generator, device: torch.device, attempts: int = 10,
) -> torch.Tensor:
    """Crop boxes Nx4 (y0, x0, h, w) in pixels, torchvision's RandomResizedCrop rule.

    Up to ``attempts`` draws per image (area fraction U(scale), log-uniform aspect);
    the first one that fits is kept; images with none fall back to the central
    crop with the aspect clamped to ``ratio``.
    """
    area = height * width * _uniform(n * attempts, *scale, g, device).view(n, attempts)
    log_r = _uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), g, device)
    aspect = log_r.exp().view(n, attempts)
    w = (area * aspect).sqrt()
    h = (area / aspect).sqrt()
    fits = (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), 0)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    # Central fallback for images where no attempt fitted.
    in_ratio = width / height
    fw, fh = float(width), float(height)
    if in_ratio < ratio[0]:
        fh = width / ratio[0]
    elif in_ratio > ratio[1]:
        fw = height * ratio[1]
    none = ~fits.any(1)
    w = torch.where(none, torch.full_like(w, fw), w)
    h = torch.where(none, torch.full_like(h, fh), h)
    y0 = torch.rand(n, generator=g, device=device) * (height - h)
    x0 = torch.rand(n, generator=g, device=device) * (width - w)
    y0 = torch.where(none, (height - h) / 2, y0)
    x0 = torch.where(none, (width - w) / 2, x0)
    return torch.stack([y0, x0, h, w], dim=1)


def _pixel_centres(n: int, like: torch.Tensor) -> torch.Tensor:
    """Centres of n pixels in [-1, 1] coordinates (align_corners=False)."""
    return (torch.arange(n, device=like.device, dtype=like.dtype) * 2 + 1) / n - 1


def resized_crop(
    x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out_size: tuple[int, int]
) -> torch.Tensor:
    """Crop each image to its box, flip where asked, resize to ``out_size`` (bilinear)."""
    _, _, height, width = x.shape
    y0, x0, h, w = boxes.to(x.dtype).unbind(1)
    # Map output pixel centres in [-1, 1] to input coordinates (align_corners=False:
    # -1 and 1 are the outer pixel edges, so a box maps by its edges). The map is
    # axis-aligned, so the sampling grid is an outer sum of two vectors per image;
    # F.affine_grid builds the same grid with a batched matmul that took 45% of the
    # augmentation's time on a CPU (bench/augment.py).
    sx = w / width * torch.where(flips, -1.0, 1.0).to(x.dtype)
    sy = h / height
    cx = (x0 + w / 2) / width * 2 - 1
    cy = (y0 + h / 2) / height * 2 - 1
    gx = sx[:, None] * _pixel_centres(out_size[1], x)[None] + cx[:, None]  # N x W_out
    gy = sy[:, None] * _pixel_centres(out_size[0], x)[None] + cy[:, None]  # N x H_out
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return _gray(x).expand_as(x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Nx1xHxW luma of RGB images."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    equal = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    s = chroma / torch.where(equal, ones, maxc)
    div = torch.where(equal, ones, chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Branch-free: channel n is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6,
    n = 5, 3, 1 for r, g, b (the piecewise-linear sector formula in closed form)."""
    h, s, v = x.unbind(1)
    # Made on the device: a tensor from a Python list is a blocking host copy.
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h[:, None], 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0, 1)
    return (v[:, None] * (1 - s[:, None] * ramp)).clamp(0, 1)


def _hue(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, :1] + delta, 1.0)
    return hsv_to_rgb(torch.cat([h, hsv[:, 1:]], 1))



def sample_jitter(
    n: int, strength: float, g: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image factors Nx4 (brightness, contrast, saturation, hue) and order Nx4."""
    b, c, s, h = 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength
    factors = torch.stack([
        _uniform(n, max(0.0, 1 - b), 1 + b, g, device),
        _uniform(n, max(0.0, 1 - c), 1 + c, g, device),
        _uniform(n, max(0.0, 1 - s), 1 + s, g, device),
        _uniform(n, -h, h, g, device),
    ], 1)
    order = torch.rand(n, 4, generator=g, device=device).argsort(1)
    return factors, order


def color_jitter(
    x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, where: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply the four jitter ops in each image's own order, clipping after each,
    to the images ``where`` is true (all by default); the others pass unchanged.

    Brightness (multiplicative, the reference's "simclrv2" rule), contrast (around
    each channel's mean, as tf.image.adjust_contrast) and saturation (around the
    grey image, torchvision's rule) all blend: x f + t (1 - f) with t = 0, the
    channel mean, the grey image. So each position is one pass over the whole
    batch, images whose op there is another (or none) taking f = 1, which leaves
    them exactly as they are: no gathers, and no device sync on a GPU. Hue, an HSV
    round trip, is computed for the whole batch at each position and kept where it
    is the image's op: 4x the hue arithmetic of gathering those images, but
    gathering needs their count on the host (``nonzero``), a sync per position.
    """
    n, channels = x.shape[:2]
    chosen = torch.ones(n, dtype=torch.bool, device=x.device) if where is None else where
    blended = 3 if channels == 3 else 2  # 1 channel: saturation and hue are identities
    for position in range(4):
        op = order[:, position]
        f = factors.gather(1, op[:, None]).squeeze(1)
        f = torch.where(chosen & (op < blended), f, 1.0).to(x.dtype).view(-1, 1, 1, 1)
        target = (op == 1).view(-1, 1, 1, 1) * x.mean((2, 3), keepdim=True)  # NxCx1x1
        if channels == 3:
            target = target + (op == 2).view(-1, 1, 1, 1) * _gray(x)  # NxCxHxW
        # lerp is exact at f = 1 (it computes x - (x - t)(1 - f) for f >= 0.5).
        x = torch.lerp(target, x, f).clamp_(0, 1)
        if channels == 3:
            hue = (chosen & (op == 3)).view(-1, 1, 1, 1)
            x = torch.where(hue, _hue(x, factors[:, 3].view(-1, 1, 1, 1)).clamp_(0, 1), x)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per image, kernel side ~10% of the image."""
    n, c, height, width = x.shape
    radius = max(1, height // 10 // 2)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C)xK
    flat = x.reshape(1, n * c, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)  # vertical
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)  # horizontal
    return flat.view(n, c, height, width)


@dataclass(frozen=True)
class ViewParams:
    """Every random choice of one view for N images (row i belongs to image i)."""

    boxes: torch.Tensor  # Nx4 crop boxes (y0, x0, h, w)
    flips: torch.Tensor  # N bool
    factors: torch.Tensor  # Nx4 brightness, contrast, saturation, hue
    order: torch.Tensor  # Nx4 jitter order
    jitter: torch.Tensor  # N bool: colour jitter applied
    gray: torch.Tensor  # N bool
    sigma: torch.Tensor  # N blur sigma
    blur: torch.Tensor  # N bool

    def rows(self, start: int, stop: int) -> ViewParams:
        return ViewParams(*(getattr(self, f)[start:stop] for f in self.__dataclass_fields__))


def sample_view(
    n: int, height: int, width: int, spec: ViewSpec, g: torch.Generator, device: torch.device
) -> ViewParams:
    """Draw all of a view's random choices; the same draws whatever the spec switches off."""
    boxes = sample_crops(n, height, width, spec.crop_scale, spec.crop_ratio, g, device)
    flips = torch.rand(n, generator=g, device=device) < (0.5 if spec.flip else 0.0)
    factors, order = sample_jitter(n, spec.color_strength, g, device)
    jitter = torch.rand(n, generator=g, device=device) < spec.color_p
    gray = torch.rand(n, generator=g, device=device) < spec.grayscale_p
    sigma = _uniform(n, *spec.blur_sigma, g, device)
    blur = torch.rand(n, generator=g, device=device) < spec.blur_p
    return ViewParams(boxes, flips, factors, order, jitter, gray, sigma, blur)


def apply_view(
    x: torch.Tensor, p: ViewParams, spec: ViewSpec, out_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Apply sampled choices to a batch. x: NxCxHxW, uint8 or float in [0, 1]."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    x = resized_crop(x, p.boxes, p.flips, out_size or (x.shape[2], x.shape[3]))
    if spec.color_strength > 0:
        x = color_jitter(x, p.factors, p.order, p.jitter)
    if x.shape[1] == 3:
        x = torch.where(p.gray.view(-1, 1, 1, 1), _gray(x), x)
    if spec.blur_p > 0:
        # Blur the whole batch and keep it where drawn: selecting the drawn images
        # first would need their count on the host (a device sync every view).
        x = torch.where(p.blur.view(-1, 1, 1, 1), gaussian_blur(x, p.sigma), x)
    return x


def augment(
    x: torch.Tensor, spec: ViewSpec, g: torch.Generator, out_size: tuple[int, int] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """One augmented view of this worker's slice of a global batch.

    With ``shard=(rank, world)`` the choices are drawn for the whole global batch
    (world x N rows) from a generator every worker holds in the same state, and
    this worker applies rows rank*N..(rank+1)*N: so W workers produce exactly the
    views one worker would for the global batch, and data parallelism changes
    nothing but speed.
    """
    n, _, height, width = x.shape
    rank, world = shard
    params = sample_view(n * world, height, width, spec, g, x.device)
    return apply_view(x, params.rows(rank * n, (rank + 1) * n), spec, out_size)


def augment_views(
    x: torch.Tensor, spec: ViewSpec, g: torch.Generator, views: int,
    out_size: tuple[int, int] | None = None, shard: tuple[int, int] = (0, 1),
) -> list[torch.Tensor]:
    """``views`` augmented views of every image of this worker's batch.

    x: NxCxHxW images, cropped here (batched), or NxVxCxSxS crops a folder dataset
    already cut from the full decoded images (scaling.data.datasets.FolderImages): then the
    crop is that one, and flip, colour and blur run here as for the others.
    """
    if x.dim() == 5:
        whole = dataclasses.replace(spec, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
        return [augment(x[:, v], whole, g, out_size, shard) for v in range(views)]
    return [augment(x, spec, g, out_size, shard) for _ in range(views)]
