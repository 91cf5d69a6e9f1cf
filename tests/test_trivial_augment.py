"""Batched TrivialAugment-Wide against torchvision's per-image operations, and
repeated augmentation."""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from vitlab.augment import BatchAugment, Normalize
from vitlab.train import epoch_order
from vitlab.trivial_augment import (OPS, _affine_sources, _color_op, affine_nearest, apply_ops, autocontrast,
                                    equalize, magnitude_of, sample_ops, trivial_augment)


@pytest.fixture(scope="module")
def images():
    """Natural-looking uint8 RGB images: smooth gradients plus noise, not flat."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(8, 3, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False)
    noisy = smooth * 180 + 40 * torch.rand(8, 3, 32, 32, generator=g)
    return noisy.round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("op, reference", [
    ("brightness", lambda im, m: TF.adjust_brightness(im, 1 + m)),
    ("color", lambda im, m: TF.adjust_saturation(im, 1 + m)),
    ("contrast", lambda im, m: TF.adjust_contrast(im, 1 + m)),
    ("sharpness", lambda im, m: TF.adjust_sharpness(im, 1 + m)),
    ("posterize", lambda im, m: TF.posterize(im, int(m))),
    ("solarize", lambda im, m: TF.solarize(im, m)),
])
def test_colour_ops_match_torchvision(images, op, reference):
    mags = {"posterize": [2.0, 4.0, 6.0, 8.0], "solarize": [0.0, 100.0, 200.0, 255.0]}.get(op, [-0.9, -0.3, 0.4, 0.99])
    for m in mags:
        ours = _color_op(op, images.float(), torch.full((len(images),), m))
        theirs = torch.stack([reference(im, m) for im in images]).float()
        assert ours.shape == images.shape
        # torchvision truncates to uint8 at the end; we keep the float result
        assert (ours - theirs).abs().max() <= 1.001, (op, m)


def test_autocontrast_and_equalize_match_torchvision(images):
    assert (autocontrast(images.float()) - TF.autocontrast(images).float()).abs().max() <= 1.0
    eq = equalize(images.float())
    ref = torch.stack([TF.equalize(im) for im in images]).float()
    assert torch.equal(eq, ref)
    flat = torch.full((1, 3, 8, 8), 77.0)  # a flat image: equalize and autocontrast leave it alone
    assert torch.equal(equalize(flat), flat) and torch.equal(autocontrast(flat), flat)


def _warp(x, op, mag):
    n = len(x)
    return affine_nearest(x, _affine_sources(torch.full((n,), OPS.index(op)), torch.full((n,), float(mag)), 32, 32))


def test_geometric_ops_move_pixels_where_torchvision_does(images):
    x = images.float()
    for t in (-5, 3, 17):  # whole-pixel translations are exact
        assert torch.equal(_warp(x, "translate_x", t), TF.affine(images, angle=0.0, translate=[t, 0], scale=1.0, shear=[0.0, 0.0]).float())
        assert torch.equal(_warp(x, "translate_y", t), TF.affine(images, angle=0.0, translate=[0, t], scale=1.0, shear=[0.0, 0.0]).float())
    assert torch.equal(_warp(x, "rotate", 90), TF.rotate(images, 90.0).float())  # exact for a quarter turn
    assert torch.equal(_warp(x, "rotate", 90), torch.rot90(x, 1, dims=(2, 3)))
    for op, shear in (("shear_x", [math.degrees(math.atan(0.3)), 0.0]), ("shear_y", [0.0, math.degrees(math.atan(0.3))])):
        ref = TF.affine(images, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0]).float()
        agree = (_warp(x, op, 0.3) == ref).float().mean()
        assert agree > 0.97, (op, agree)  # nearest-neighbour ties may round the other way at a few pixels


def test_sampling_covers_every_op_and_bin_uniformly():
    g = torch.Generator().manual_seed(1)
    op_index, mag = sample_ops(140_000, 32, g, "cpu")
    counts = torch.bincount(op_index, minlength=len(OPS)).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.04
    rot = mag[op_index == OPS.index("rotate")]
    assert rot.min() == -135 and rot.max() == 135 and abs(float(rot.mean())) < 3  # signed, symmetric
    bits = mag[op_index == OPS.index("posterize")]
    assert set(bits.unique().tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}
    assert float(magnitude_of("solarize", torch.tensor(0), 32)) == 255.0
    # prob: the fraction of images left alone is (1 - prob) plus prob/len(OPS) identity draws
    op_index, _ = sample_ops(100_000, 32, g, "cpu", prob=0.5)
    identity = float((op_index == 0).float().mean())
    assert abs(identity - (0.5 + 0.5 / len(OPS))) < 0.01


def test_trivial_augment_shapes_range_and_determinism(images):
    x = images.float()
    out = trivial_augment(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255
    changed = (out != x).flatten(1).any(1).float().mean()
    assert changed > 0.5  # identity is 1 of 14 ops; a few ops can leave an image unchanged
    again = trivial_augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    assert torch.equal(trivial_augment(x, torch.Generator().manual_seed(3), prob=0.0), x)
    # each image receives exactly its own op: apply_ops with a single op equals that op alone
    one = torch.full((len(x),), OPS.index("solarize"))
    assert torch.equal(apply_ops(x, one, torch.full((len(x),), 128.0)), _color_op("solarize", x, torch.full((len(x),), 128.0)))


def test_batch_augment_with_trivial_augment_gives_normalised_finite_batches(images):
    aug = BatchAugment(Normalize((0.5,) * 3, (0.25,) * 3), 32, crop=True, crop_scale=(0.5, 1.0), hflip=0.5,
                       trivial_augment=1.0)
    out = aug(images, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 32, 32) and torch.isfinite(out).all()
    assert out.min() >= (0 - 0.5) / 0.25 - 1e-5 and out.max() <= (1 - 0.5) / 0.25 + 1e-5


def test_repeated_augmentation_order():
    n = 1000
    order = epoch_order(n, seed=0, epoch=0, device=torch.device("cpu"), repeats=3)
    assert len(order) == n
    counts = torch.bincount(order, minlength=n)
    assert set(counts.unique().tolist()) <= {0, 1, 2, 3} and int((counts == 3).sum()) == n // 3
    assert torch.equal(order[0:3], order[0].repeat(3))  # copies are adjacent: they share a batch
    assert torch.equal(order, epoch_order(n, 0, 0, torch.device("cpu"), 3))  # a pure function of (seed, epoch)
    assert torch.equal(torch.sort(epoch_order(n, 0, 0, torch.device("cpu")))[0], torch.arange(n))
