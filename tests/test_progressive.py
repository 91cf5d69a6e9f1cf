"""Progressive resizing (--progressive-size, --progressive-epochs): the first epochs train on
smaller images, the model's learned positions resampled to their smaller grid; validation,
the later epochs and everything after see the full size."""

import csv

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitlab import Kernels, ViT, ViTConfig
from vitlab.augment import BatchAugment, Normalize
from vitlab.config import default_config
from vitlab.errors import ConfigError
from vitlab.model import flops_per_image, resample_positions
from vitlab.train import train

SMALL = dict(image_size=16, channels=3, num_classes=5, patch_size=4, depth=2, heads=2, dim=32, mlp_dim=64)
QUIET = dict(progress=False, log=lambda s: None)


@pytest.mark.parametrize("tokenizer", ["conv", "conv-stem", "conv-pool", "spt"])
def test_a_smaller_image_reads_the_learned_positions_resampled_to_its_grid(tokenizer):
    torch.manual_seed(0)
    model = ViT(ViTConfig(**SMALL, patch_embed=tokenizer), Kernels(attention="explicit")).train()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    small = torch.randn(3, 3, 8, 8)
    tokens = model.embed(small)
    assert tokens.shape == (3, 1 + 4, 32)  # a 2x2 grid and the class token
    expected = resample_positions(model.pos_embed, 1, 4, 2)
    patches = model.patch_embed(small)
    torch.testing.assert_close(tokens[:, 1:], patches + expected[:, 1:])
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1]).expand(3, 1, 32)[:, 0])
    model(small).sum().backward()  # every learned position takes part in the smaller grid's
    assert model.pos_embed.grad is not None and (model.pos_embed.grad[0, 1:].abs().sum(-1) > 0).all()
    full = torch.randn(3, 3, 16, 16)
    plain = ViT(ViTConfig(**SMALL, patch_embed=tokenizer), Kernels(attention="explicit"))
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain.eval()(full), model.eval()(full))  # at full size: what it computed before


def test_a_smaller_image_under_patch_dropout_keeps_its_share_of_its_own_tokens():
    cfg = ViTConfig(**SMALL, patch_dropout=0.5)
    model = ViT(cfg, Kernels(attention="explicit")).train()
    assert model.embed(torch.randn(2, 3, 8, 8)).shape == (2, 1 + 2, 32)  # 2 of 4 patches
    assert model.embed(torch.randn(2, 3, 16, 16)).shape == (2, 1 + 8, 32)  # 8 of 16
    # the training FLOPs of a smaller image are those of its model at that size
    with FlopCounterMode(display=False) as counter:
        ViT(cfg, Kernels(attention="explicit", cls_only_last_block=False)).train()(torch.randn(2, 3, 8, 8))
    small = ViTConfig(**{**SMALL, "image_size": 8}, patch_dropout=0.5)
    assert counter.get_total_flops() / 2 == pytest.approx(flops_per_image(small, training=True) / 3, rel=0.01)


def test_the_augmentation_resizes_to_the_size_asked_as_a_crop_of_the_whole_image_would():
    norm = Normalize((0.5,) * 3, (0.25,) * 3)
    plain = BatchAugment(norm, 16)  # nothing on: a resize alone
    whole = BatchAugment(norm, 16, crop=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))  # the crop path
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(plain(images), norm(images))  # at its own size: untouched
    small = plain(images, size=8)
    assert small.shape == (5, 3, 8, 8)
    torch.testing.assert_close(small, whole(images, torch.Generator().manual_seed(0), size=8))
    # halving: each output pixel the mean of its 2x2 block, as torchvision's bilinear resize of a crop gives
    means = images.float().unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2))
    torch.testing.assert_close(small, norm(means), rtol=1e-5, atol=1e-5)


def test_a_crop_plan_draws_the_same_boxes_at_any_size():
    aug = BatchAugment(Normalize((0.5,) * 3, (0.25,) * 3), 16, crop=True, crop_scale=(0.3, 1.0), hflip=0.5)
    small = aug.plan(64, 16, 16, torch.Generator().manual_seed(3), size=8)
    full = aug.plan(64, 16, 16, torch.Generator().manual_seed(3))
    other = aug.plan(64, 16, 16, torch.Generator().manual_seed(4), size=8)
    assert small.shape == (64, 2, 8) and full.shape == (64, 2, 16)
    # each box's first and last sample positions, in [-1, 1] units: within half a source pixel (1/16)
    # of each other at both resolutions, and far apart for another draw
    ends = lambda plan: torch.stack([plan[..., 0], plan[..., -1]], -1)  # noqa: E731
    assert (ends(small) - ends(full)).abs().max() < 1 / 16 + 1e-6
    assert (ends(other) - ends(full)).abs().max() > 0.2


def _recording_embed(monkeypatch, depth):
    seen = []
    embed = ViT.embed

    def spy(self, x):
        if self.cfg.depth == depth:  # the run's model and its EMA copy, not the kernel timings' one-block models
            seen.append((self.training, x.shape[-1]))
        return embed(self, x)

    monkeypatch.setattr(ViT, "embed", spy)
    return seen


def test_a_run_trains_its_first_epochs_small_and_everything_else_at_full_size(tmp_path, monkeypatch):
    seen = _recording_embed(monkeypatch, depth=3)
    cfg = default_config().replace(out=str(tmp_path), name="p", epochs=3, depth=3, dim=32, heads=2, mlp_dim=64,
                                   patch_size=2, batch_size=128, progressive_size=4, progressive_epochs=2,
                                   ema_decay=0.9, tensorboard=False, device="cpu")
    run = train(cfg, **QUIET)
    with open(run.run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = int(rows[0]["step"])
    assert [int(r["step"]) for r in rows] == [steps, 2 * steps, 3 * steps]
    assert [side for training, side in seen if training] == [4] * 2 * steps + [8] * steps
    assert all(side == 8 for training, side in seen if not training)  # validation, test, predictions
    assert sum(not training for training, _ in seen) > 0
    assert 0 <= run.results["Test"][1] <= 1 and torch.isfinite(torch.tensor(run.results["Test"][0]))


@pytest.mark.parametrize("changes, message", [
    (dict(progressive_size=-1, progressive_epochs=1), "--progressive-size must be a whole number of pixels"),
    (dict(progressive_size=4.5, progressive_epochs=1), "--progressive-size must be a whole number of pixels"),
    (dict(progressive_size=True, progressive_epochs=1), "--progressive-size must be a whole number of pixels"),
    (dict(progressive_size=4, progressive_epochs=1.5), "--progressive-epochs must be a whole number"),
    (dict(progressive_size=4), "go together: set both, or neither"),
    (dict(progressive_epochs=2), "go together: set both, or neither"),
    (dict(progressive_size=4, progressive_epochs=80, epochs=80), "leaves no epoch at the full size"),
    (dict(progressive_size=4, progressive_epochs=1, time_budget="5m"), "do not go together"),
])
def test_progressive_settings_are_refused_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=message):
        default_config().replace(**changes).validate()


@pytest.mark.parametrize("size, message", [(5, "does not divide --progressive-size 5"),
                                           (8, "must be below the image size 8"),
                                           (16, "must be below the image size 8")])
def test_a_progressive_size_that_does_not_fit_the_images_is_refused_before_training(tmp_path, size, message):
    cfg = default_config().replace(out=str(tmp_path), name="p", epochs=2, progressive_size=size, progressive_epochs=1,
                                   patch_size=2, tensorboard=False)
    with pytest.raises(ConfigError, match=message):
        train(cfg, **QUIET)
    assert not (tmp_path / "p" / "last").exists()


def test_a_max_steps_run_that_ends_within_the_small_epochs_is_refused(tmp_path):
    cfg = default_config().replace(out=str(tmp_path), name="p", epochs=5, max_steps=3, progressive_size=4,
                                   progressive_epochs=1, patch_size=2, tensorboard=False)
    with pytest.raises(ConfigError, match="no step at the full size"):
        train(cfg, **QUIET)
