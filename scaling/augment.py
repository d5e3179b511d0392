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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale


@dataclass(frozen=True)
class ViewSpec:
    """What one augmented view does; ``AugmentConfig`` in config.py maps onto it."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    color_strength: float = 1.0  # 0.5 for CIFAR in the paper; 0 turns jitter off
    color_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0  # 0.5 on ImageNet only
    blur_sigma: tuple[float, float] = (0.1, 2.0)


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


def resized_crop(
    x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out_size: tuple[int, int]
) -> torch.Tensor:
    """Crop each image to its box, flip where asked, resize to ``out_size`` (bilinear)."""
    n, _, height, width = x.shape
    y0, x0, h, w = boxes.unbind(1)
    # Affine map from output coords in [-1, 1] to input coords (align_corners=False:
    # -1 and 1 are the outer pixel edges, so a box maps by its edges).
    sx = w / width * torch.where(flips, -1.0, 1.0)
    sy = h / height
    cx = (x0 + w / 2) / width * 2 - 1
    cy = (y0 + h / 2) / height * 2 - 1
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), [n, x.shape[1], *out_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = x.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).expand_as(x)


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
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    sector = F.one_hot(i, 6).movedim(-1, 1).to(x.dtype)  # Nx6xHxW
    r = torch.stack([v, q, p, p, t, v], 1)
    g = torch.stack([t, v, v, q, p, p], 1)
    b = torch.stack([p, p, t, v, v, q], 1)
    return torch.stack([(c * sector).sum(1) for c in (r, g, b)], 1)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x * f  # multiplicative, the reference's "simclrv2" brightness


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = x.mean((2, 3), keepdim=True)  # per channel, as tf.image.adjust_contrast
    return (x - mean) * f + mean


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return x * f + grayscale(x) * (1 - f)


def _hue(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, :1] + delta, 1.0)
    return hsv_to_rgb(torch.cat([h, hsv[:, 1:]], 1))


JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


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


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Apply the four jitter ops in each image's own order, clipping after each."""
    ops = range(4) if x.shape[1] == 3 else range(2)  # 1 channel: no saturation/hue
    x = x.clone()
    for position in range(4):
        for k in ops:
            idx = (order[:, position] == k).nonzero().squeeze(1)
            if idx.numel():
                f = factors[idx, k].view(-1, 1, 1, 1)
                x[idx] = JITTER_OPS[k](x[idx], f).clamp(0, 1)
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


def _where(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().squeeze(1)


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
        idx = _where(p.jitter)
        x[idx] = color_jitter(x[idx], p.factors[idx], p.order[idx])
    if x.shape[1] == 3:
        idx = _where(p.gray)
        x[idx] = grayscale(x[idx]).contiguous()
    idx = _where(p.blur)
    if idx.numel():
        x[idx] = gaussian_blur(x[idx], p.sigma[idx])
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
