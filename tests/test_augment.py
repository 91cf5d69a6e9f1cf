import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vitlab.augment import BatchAugment, Normalize, crop_resize, sample_crop_boxes

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def sample_crop_params(n, height, width, scale, ratio, generator=None, device="cpu", tries=10):
    """``sample_crop_boxes`` as torchvision's (top, left, h, w), int64 tensors."""
    corner, hw = sample_crop_boxes(n, height, width, scale, ratio, generator, device, tries)
    corner, hw = corner.long(), hw.long()
    return corner[:, 0], corner[:, 1], hw[:, 0], hw[:, 1]


def resized_crop(images, top, left, h, w, out_size, flip=None):
    """``crop_resize`` with torchvision's (top, left, h, w) per image."""
    return crop_resize(images, torch.stack([top, left], 1).float(), torch.stack([h, w], 1).float(), out_size, flip)


def test_crop_resize_flip_matches_torchvision_pixel_for_pixel():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, 3, 32, 32, generator=g) * 255
    top, left, h, w = sample_crop_params(48, 32, 32, SCALE, RATIO, g)
    flip = torch.rand(48, generator=g) < 0.5
    ours = resized_crop(x, top, left, h, w, 32, flip)
    for i in range(48):
        ref = TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32], antialias=True)
        if flip[i]:
            ref = TF.horizontal_flip(ref)
        torch.testing.assert_close(ours[i], ref, atol=1e-3, rtol=0)


def test_non_square_input_and_output_size():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 20, 28, generator=g)
    top, left, h, w = sample_crop_params(8, 20, 28, SCALE, RATIO, g)
    ours = resized_crop(x, top, left, h, w, 24)
    assert ours.shape == (8, 1, 24, 24)
    for i in range(8):
        ref = TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [24, 24], antialias=True)
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)


def _stats(top, left, h, w, height, width):
    h, w = np.asarray(h, float), np.asarray(w, float)
    return {
        "area": h * w / (height * width),
        "log_aspect": np.log(w / h),
        "top_frac": np.asarray(top, float) / np.maximum(1, height - h + 1),
    }


@pytest.mark.parametrize("size, scale, ratio", [((32, 32), SCALE, RATIO), ((28, 28), (0.5, 1.0), (0.8, 1.25)),
                                                ((24, 40), (0.3, 1.0), (0.5, 2.0))])
def test_crop_parameters_follow_torchvision_distribution(size, scale, ratio):
    """Area fraction, aspect ratio and position: same quantiles as RandomResizedCrop.get_params."""
    height, width = size
    n = 20000
    torch.manual_seed(0)
    img = torch.zeros(1, height, width)
    ref = [v2.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)] \
        if hasattr(v2.RandomResizedCrop, "get_params") else None
    if ref is None:  # pragma: no cover - torchvision API fallback
        from torchvision.transforms import RandomResizedCrop
        ref = [RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)]
    r_top, r_left, r_h, r_w = map(np.array, zip(*ref))
    top, left, h, w = sample_crop_params(n, height, width, scale, ratio, torch.Generator().manual_seed(1))
    ours = _stats(top.numpy(), left.numpy(), h.numpy(), w.numpy(), height, width)
    theirs = _stats(r_top, r_left, r_h, r_w, height, width)
    for key in ours:
        for q in (0.05, 0.25, 0.5, 0.75, 0.95):
            a, b = np.quantile(ours[key], q), np.quantile(theirs[key], q)
            assert abs(a - b) < 0.03 + 0.03 * abs(b), (key, q, a, b)
    # Every crop lies inside the image and respects the bounds the sampler promises.
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert ours["area"].min() >= scale[0] * 0.8 and ours["area"].max() <= 1.0


def test_fallback_is_a_centre_crop_when_no_try_fits():
    # An impossible scale range (>1 of the area) forces the fallback on every sample.
    top, left, h, w = sample_crop_params(100, 32, 16, (1.5, 2.0), (1.0, 1.0), torch.Generator().manual_seed(0))
    assert (w == 16).all() and (h == 16).all() and (top == 8).all() and (left == 0).all()


def test_flip_rate_and_that_flips_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(32.0).repeat(2000, 1, 32, 1)  # each row 0..31: a flip reverses it
    aug = BatchAugment(Normalize((0.0,), (1 / 255,)), 32, crop=False, hflip=0.5)
    out = aug(x.to(torch.uint8), g)
    flipped = out[:, 0, 0, 0] == 31
    assert torch.equal(out[flipped][:, 0, 0], torch.arange(31.0, -1, -1).expand(int(flipped.sum()), -1))
    assert abs(flipped.float().mean().item() - 0.5) < 0.035  # 2000 draws: sd 0.011
    assert torch.equal(out[~flipped], x[~flipped])


def test_normalisation_uses_dataset_statistics():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(512, 3, 8, 8, generator=g) * 120 + 60).round().to(torch.uint8)
    x = images.double() / 255
    mean, std = x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()
    out = Normalize(tuple(mean), tuple(std))(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std((0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def test_augment_is_reproducible_from_its_generator_and_keeps_range():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    aug = BatchAugment(Normalize((0.5,) * 3, (0.25,) * 3), 32, crop=True, hflip=0.5)
    a = aug(images, torch.Generator().manual_seed(3))
    b = aug(images, torch.Generator().manual_seed(3))
    c = aug(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25  # bilinear output stays within the input's range
    assert a.min() >= lo - 1e-5 and a.max() <= hi + 1e-5 and a.shape == (64, 3, 32, 32)
    assert not math.isnan(a.sum().item())


def test_normalisation_never_writes_into_the_callers_batch():
    norm = Normalize((0.5,) * 3, (0.25,) * 3)
    images = torch.rand(4, 3, 8, 8) * 255
    before = images.clone()
    for aug in (BatchAugment(norm, 8), BatchAugment(norm, 8, crop=True, hflip=0.5)):
        out = aug(images, torch.Generator().manual_seed(0))
        assert torch.equal(images, before) and out.shape == images.shape
    torch.testing.assert_close(BatchAugment(norm, 8)(images), (before / 255 - 0.5) / 0.25)
    assert torch.equal(norm(images), BatchAugment(norm, 8)(images)) and torch.equal(images, before)


def test_a_plan_drawn_in_advance_augments_exactly_as_drawing_per_batch():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    aug = BatchAugment(Normalize((0.5,) * 3, (0.25,) * 3), 24, crop=True, hflip=0.5)
    plan = aug.plan(64, 32, 32, torch.Generator().manual_seed(3))
    assert plan.shape == (64, 2, 24)
    drawn_here = aug(images, torch.Generator().manual_seed(3))
    assert torch.equal(aug(images, None, plan), drawn_here)
    # Rows of a plan for more images are the same operation: a batch uses its own slice.
    big = aug.plan(256, 32, 32, torch.Generator().manual_seed(5))
    assert torch.equal(aug(images[:8], None, big[100:108]), aug(images[:8], None, big[100:108].clone()))
    assert not torch.equal(aug(images[:8], None, big[:8]), aug(images[:8], None, big[8:16]))
    assert BatchAugment(Normalize((0.5,) * 3, (0.25,) * 3), 32).plan(4, 32, 32) is None  # nothing to plan


def test_crop_plans_resume_exactly_and_differ_between_epochs():
    from vitlab.train import PLAN_IMAGES, crop_plans
    aug = BatchAugment(Normalize((0.5,), (0.25,)), 16, crop=True, hflip=0.5)
    batch, steps = 1024, 3 * PLAN_IMAGES // 1024 + 5  # several blocks, the last one partial
    whole = list(crop_plans(aug, 0, 2, 0, steps, batch, (16, 16), torch.device("cpu")))
    assert len(whole) == steps and all(p.shape == (batch, 2, 16) for p in whole)
    for first in (1, PLAN_IMAGES // batch, PLAN_IMAGES // batch + 3, steps - 1):  # resume mid-block and at a block start
        resumed = list(crop_plans(aug, 0, 2, first, steps, batch, (16, 16), torch.device("cpu")))
        assert all(torch.equal(a, b) for a, b in zip(whole[first:], resumed, strict=True))
    assert not torch.equal(whole[0], whole[PLAN_IMAGES // batch])  # blocks are independent draws
    other_epoch = next(crop_plans(aug, 0, 3, 0, steps, batch, (16, 16), torch.device("cpu")))
    other_seed = next(crop_plans(aug, 1, 2, 0, steps, batch, (16, 16), torch.device("cpu")))
    assert not torch.equal(whole[0], other_epoch) and not torch.equal(whole[0], other_seed)


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` moved so that output pixel (i, j) shows input (i + dy, j + dx), the
    nearest edge pixel where that lies outside: the definition, one image at a time."""
    h, w = image.shape[-2:]
    rows = (torch.arange(h) + dy).clamp(0, h - 1)
    cols = (torch.arange(w) + dx).clamp(0, w - 1)
    return image[..., rows[:, None], cols[None, :]]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to grid_sample's float rounding (1e-4 of a 0-255 pixel); no blur passes."""
    return torch.allclose(a, b, rtol=0, atol=1e-3)


def test_translation_shifts_each_image_by_whole_pixels_with_edges_repeated():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3000, 1, 12, 12), dtype=torch.uint8, generator=g)
    aug = BatchAugment(Normalize((0.0,), (1 / 255,)), 12, translate=2)
    assert aug.active
    out = aug(images, torch.Generator().manual_seed(7))
    shifts = []
    for img, got in zip(images[:300].float(), out[:300]):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if _same(got, _shifted(img, dy, dx))]
        assert len(matches) == 1, matches  # exactly one whole-pixel shift, no blur
        shifts.append(matches[0])
    assert {dy for dy, _ in shifts} == {dx for _, dx in shifts} == {-2, -1, 0, 1, 2}
    counts = torch.bincount(torch.tensor([dy + 2 for dy, _ in shifts]), minlength=5)
    assert counts.min() >= 35  # 300 draws of 5 values: 60 each, sd 7
    # A larger plan reads the same shifts: the corner is drawn with the rest of the plan.
    plan = aug.plan(3000, 12, 12, torch.Generator().manual_seed(7))
    assert torch.equal(aug(images, None, plan), out)


def test_translation_off_draws_what_it_drew_before_and_composes_with_flip():
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    norm = Normalize((0.5,) * 3, (0.25,) * 3)
    plain = BatchAugment(norm, 16, crop=True, hflip=0.5)
    assert torch.equal(plain(images, torch.Generator().manual_seed(3)),
                       BatchAugment(norm, 16, crop=True, hflip=0.5, translate=0)(images, torch.Generator().manual_seed(3)))
    moved = BatchAugment(Normalize((0.0,), (1 / 255,)), 16, hflip=1.0, translate=1)(images, torch.Generator().manual_seed(1))
    mirrored = images.float().flip(-1)
    for img, got in zip(mirrored, moved):
        assert any(_same(got, _shifted(img, dy, dx)) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
