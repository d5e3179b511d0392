import math

import numpy as np
import pytest
import torch
from tolerance import assert_close_at_scale

from scaling.data.augment import (
    CROP_FLIP,
    ViewSpec,
    augment,
    color_jitter,
    gaussian_blur,
    grayscale,
    hsv_to_rgb,
    resized_crop,
    rgb_to_hsv,
    sample_crops,
    sample_jitter,
)

CPU = torch.device("cpu")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def naive_crop_areas(n, h, w, scale, ratio, rng):
    """torchvision's RandomResizedCrop.get_params, continuous, one image at a time."""
    out = []
    for _ in range(n):
        for _ in range(10):
            area = h * w * rng.uniform(*scale)
            ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            cw, ch = math.sqrt(area * ar), math.sqrt(area / ar)
            if cw <= w and ch <= h:
                out.append(cw * ch / (h * w))
                break
        else:
            out.append(1.0)
    return np.array(out)


def test_crop_boxes_follow_the_spec():
    boxes = sample_crops(20000, 28, 28, (0.08, 1.0), (3 / 4, 4 / 3), gen(), CPU)
    y0, x0, h, w = boxes.T
    area = (h * w / (28 * 28)).numpy()
    aspect = (w / h).numpy()
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1 + 1e-6
    assert aspect.min() >= 3 / 4 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5
    assert (y0 >= 0).all() and (x0 >= 0).all()
    assert (y0 + h <= 28 + 1e-4).all() and (x0 + w <= 28 + 1e-4).all()
    # Same distribution as the per-image reference rule (means of 20k draws).
    ref = naive_crop_areas(20000, 28, 28, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    assert abs(area.mean() - ref.mean()) < 0.01
    assert abs(np.median(area) - np.median(ref)) < 0.015
    # Log aspect is symmetric around 0 (log-uniform on [3/4, 4/3]).
    assert abs(np.log(aspect).mean()) < 0.01


def test_full_box_is_identity_and_flip_mirrors():
    x = torch.rand(3, 2, 9, 9)
    full = torch.tensor([[0.0, 0.0, 9.0, 9.0]] * 3)
    no = torch.zeros(3, dtype=torch.bool)
    assert torch.allclose(resized_crop(x, full, no, (9, 9)), x, atol=1e-5)
    yes = torch.ones(3, dtype=torch.bool)
    assert torch.allclose(resized_crop(x, full, yes, (9, 9)), x.flip(3), atol=1e-5)
    # A box of the top-left quadrant at its own size is an exact crop.
    quad = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 3)
    x8 = torch.rand(3, 1, 8, 8)
    assert torch.allclose(resized_crop(x8, quad, no, (4, 4)), x8[:, :, :4, :4], atol=1e-5)


def test_jitter_factors_ranges_and_order():
    s = 0.5
    f, order = sample_jitter(10000, s, gen(), CPU)
    for k, (lo, hi) in enumerate([(1 - 0.8 * s, 1 + 0.8 * s)] * 3 + [(-0.2 * s, 0.2 * s)]):
        assert f[:, k].min() >= lo and f[:, k].max() <= hi
        assert abs(f[:, k].mean().item() - (lo + hi) / 2) < 0.02
    assert (order.sort(1).values == torch.arange(4)).all()
    # Each op is first about a quarter of the time: the order is random per image.
    counts = torch.bincount(order[:, 0], minlength=4).float() / 10000
    assert torch.all((counts - 0.25).abs() < 0.03)


def test_brightness_only_scales_pixels():
    x = torch.full((2, 1, 4, 4), 0.5)
    factors = torch.tensor([[1.2, 1.0, 1.0, 0.0], [0.5, 1.0, 1.0, 0.0]])
    order = torch.arange(4).repeat(2, 1)
    y = color_jitter(x, factors, order)
    assert torch.allclose(y[0], torch.full((1, 4, 4), 0.6))
    assert torch.allclose(y[1], torch.full((1, 4, 4), 0.25))


def test_jitter_clips_after_each_op():
    # Brightness 2 then contrast: clipping happens before the contrast step,
    # so the order changes the result.
    x = torch.tensor([0.2, 0.8]).view(1, 1, 1, 2).repeat(2, 1, 1, 1)
    factors = torch.tensor([[2.0, 0.5, 1.0, 0.0]] * 2)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]])
    y = color_jitter(x, factors, order)
    assert torch.allclose(y[0].flatten(), torch.tensor([0.55, 0.85]))  # [0.4, 1.0] -> contrast
    assert torch.allclose(y[1].flatten(), torch.tensor([0.7, 1.0]))  # [0.35, 0.65] -> x2


def test_hsv_round_trip_and_zero_hue_is_identity():
    x = torch.rand(4, 3, 5, 5)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    f = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 4)
    assert torch.allclose(color_jitter(x, f, torch.arange(4).repeat(4, 1)), x, atol=1e-5)


def test_grayscale_weights():
    x = torch.rand(2, 3, 3, 3)
    g = grayscale(x)
    expected = 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(g[:, 1], expected)
    one = torch.rand(2, 1, 3, 3)
    assert torch.equal(grayscale(one), one)


def test_blur_preserves_constants_and_mass():
    x = torch.full((2, 3, 20, 20), 0.3)
    assert_close_at_scale(gaussian_blur(x, torch.tensor([0.5, 2.0])), x, 1e-5)
    spike = torch.zeros(1, 1, 20, 20)
    spike[0, 0, 10, 10] = 1.0
    out = gaussian_blur(spike, torch.tensor([1.0]))
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert out[0, 0, 10, 10] < 1.0


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_is_reproducible_and_in_range(channels):
    x = (torch.rand(16, channels, 28, 28) * 255).to(torch.uint8)
    spec = ViewSpec(color_strength=0.5, blur_p=0.5)
    a = augment(x, spec, gen(7))
    b = augment(x, spec, gen(7))
    c = augment(x, spec, gen(8))
    assert a.shape == (16, channels, 28, 28) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_grayscale_probability():
    x = torch.rand(4000, 3, 8, 8)
    spec = ViewSpec(color_strength=0.0, grayscale_p=0.2, crop_scale=(1.0, 1.0), flip=False)
    y = augment(x, spec, gen(1))
    gray = (y[:, 0] == y[:, 1]).flatten(1).all(1) & (y[:, 1] == y[:, 2]).flatten(1).all(1)
    assert abs(gray.float().mean().item() - 0.2) < 0.03


def test_crop_flip_only_keeps_pixel_values():
    # With the crop+flip view on a full-size box, values are only resampled:
    # a constant image stays exactly constant (no colour change).
    x = torch.full((8, 1, 12, 12), 0.4)
    y = augment(x, CROP_FLIP, gen())
    assert torch.allclose(y, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_runs_on_cuda():
    x = torch.rand(8, 3, 32, 32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    y = augment(x, ViewSpec(blur_p=0.5), g)
    assert y.device.type == "cuda" and y.shape == x.shape


def test_hsv_to_rgb_matches_colorsys():
    import colorsys

    hsv = torch.rand(1, 3, 7, 9, generator=gen(3))
    got = hsv_to_rgb(hsv)[0].permute(1, 2, 0).reshape(-1, 3)
    want = torch.tensor([colorsys.hsv_to_rgb(*px.tolist())
                         for px in hsv[0].permute(1, 2, 0).reshape(-1, 3)])
    assert_close_at_scale(got, want, 1e-5)


def test_resized_crop_matches_an_affine_grid():
    """The outer-sum grid is F.affine_grid's for the crop's axis-aligned map."""
    import torch.nn.functional as F

    x = torch.rand(6, 3, 20, 24, generator=gen(4))
    boxes = sample_crops(6, 20, 24, (0.08, 1.0), (3 / 4, 4 / 3), gen(5), CPU)
    flips = torch.tensor([True, False] * 3)
    y0, x0, h, w = boxes.unbind(1)
    sx = w / 24 * torch.where(flips, -1.0, 1.0)
    zero = torch.zeros(6)
    theta = torch.stack([torch.stack([sx, zero, (x0 + w / 2) / 24 * 2 - 1], 1),
                         torch.stack([zero, h / 20, (y0 + h / 2) / 20 * 2 - 1], 1)], 1)
    grid = F.affine_grid(theta, [6, 3, 16, 12], align_corners=False)
    want = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(resized_crop(x, boxes, flips, (16, 12)), want, atol=1e-5)


def test_jitter_mask_leaves_other_images_untouched():
    x = torch.rand(8, 3, 6, 6, generator=gen(6))
    factors, order = sample_jitter(8, 1.0, gen(7), CPU)
    mask = torch.tensor([True, False] * 4)
    y = color_jitter(x, factors, order, mask)
    assert torch.equal(y[~mask], x[~mask])
    assert torch.allclose(y[mask], color_jitter(x[mask], factors[mask], order[mask]))
    assert not torch.allclose(y[mask], x[mask])
