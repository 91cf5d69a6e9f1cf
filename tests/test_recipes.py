"""Regularisation and augmentation elements of the accuracy recipes."""

import csv

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vitlab import Kernels, TrainConfig, ViT, ViTConfig
from vitlab.errors import ConfigError
from vitlab.augment import mix_batch, random_erasing
from vitlab.checkpoint import read_meta
from vitlab.evaluate import evaluate_checkpoint
from vitlab.config import default_config
from vitlab.inference import predict_logits
from vitlab.train import TrainingInterrupted, WeightEMA, train
from tests.datafiles import metrics_but_the_clock

SMALL = dict(image_size=16, channels=3, num_classes=5, patch_size=4, depth=4, heads=2, dim=32, mlp_dim=64)


def test_drop_path_is_inactive_at_eval_and_random_in_training():
    torch.manual_seed(0)
    plain = ViT(ViTConfig(**SMALL))
    dropping = ViT(ViTConfig(**SMALL, drop_path=0.5))
    dropping.load_state_dict(plain.state_dict())
    for m in (plain, dropping):
        torch.nn.init.normal_(m.head.weight)
    dropping.head.weight.data.copy_(plain.head.weight)
    x = torch.randn(8, 3, 16, 16)
    plain.eval(), dropping.eval()
    assert torch.equal(plain(x), dropping(x))  # eval: stochastic depth is the identity
    dropping.train()
    a, b = dropping(x), dropping(x)
    assert not torch.equal(a, b)
    rates = [blk.drop_path.p for blk in dropping.blocks]
    assert rates[0] == 0 and rates[-1] == 0.5 and rates == sorted(rates)


def test_layer_scale_parameters():
    model = ViT(ViTConfig(**SMALL, layer_scale=1e-4))
    gammas = [m.gamma for m in model.modules() if hasattr(m, "gamma")]
    assert len(gammas) == 2 * SMALL["depth"] and all(torch.allclose(g, torch.full_like(g, 1e-4)) for g in gammas)
    torch.nn.init.normal_(model.head.weight)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gammas)
    decay, no_decay = model.param_groups(0.1)
    assert all(id(g) in {id(p) for p in no_decay["params"]} for g in gammas)


@pytest.mark.parametrize("field, value, message", [
    ("translate", True, "--translate must be a whole number"),
    ("translate", 1.5, "--translate must be a whole number"),
    ("translate", -1, "--translate must be a whole number"),
    ("epochs", True, "--epochs must be a positive integer"),
    ("max_steps", False, "--max-steps must be a whole number"),
    ("threads", 1.5, "--threads must be from 0 to 4096"),  # torch.set_num_threads raised a TypeError at start-up
    ("checkpoint_every", True, "--checkpoint-every must be >= 0"),
    ("repeated_augment", 2.5, "--repeated-augment is a repeat count"),
])
def test_counts_and_sizes_refuse_bools_and_fractions(field, value, message):
    """Python counts True as the int 1; a config written in code must not train one epoch because of it."""
    with pytest.raises(ConfigError, match=message):
        default_config().replace(**{field: value}).validate()


def test_pos_embed_std_sets_the_positional_embeddings_init_and_travels_with_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    default, wide = ViT(ViTConfig(**SMALL)), ViT(ViTConfig(**SMALL, pos_embed_std=1.0))
    assert abs(default.pos_embed.std().item() - 0.02) < 0.003
    assert 0.8 < wide.pos_embed.std().item() < 0.95 and wide.pos_embed.abs().max() <= 2.0  # truncated at 2 std
    assert abs(wide.cls_token.std().item() - 0.02) < 0.01  # the rest of the init is unchanged
    for bad in (0.0, -1.0, 11.0):
        with pytest.raises(ConfigError, match="--pos-embed-std must be in"):
            ViTConfig(**SMALL, pos_embed_std=bad)
    # a checkpoint from before the option loads with the value it was initialised with
    old = {k: v for k, v in ViTConfig(**SMALL).__dict__.items() if k != "pos_embed_std"}
    assert ViTConfig.from_dict(old).pos_embed_std == 0.02
    cfg = default_config().replace(pos_embed_std=1.0, epochs=1, out=str(tmp_path), name="p", tensorboard=False)
    train(cfg, progress=False, log=lambda s: None)
    assert read_meta(tmp_path / "p" / "best").model.pos_embed_std == 1.0


def test_random_erasing_shapes_areas_and_rate():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4000, 3, 32, 32)
    assert torch.equal(random_erasing(x, 0.0, g), x)
    out = random_erasing(x, 0.5, g)
    assert out.shape == x.shape and torch.isfinite(out).all()
    changed = (out != 0).any(1)  # (N, H, W) erased pixels
    erased = changed.flatten(1).any(1)
    assert abs(erased.float().mean().item() - 0.5) < 0.03
    frac = changed[erased].flatten(1).float().mean(1)
    assert frac.min() > 0.005 and frac.max() <= 1 / 3 + 0.05  # area in [2%, 1/3] of the image, clipped
    # each erased region is one rectangle: its pixel count equals its bounding box
    ys, xs = changed[erased][0].nonzero(as_tuple=True)
    assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)


def test_mixup_mixes_images_and_labels_alike():
    x = torch.randn(16, 3, 8, 8)
    y = torch.arange(16)  # distinct labels: each row's weights say exactly which images were mixed
    mixed, target = mix_batch(x, y, 16, mixup_alpha=0.8, rng=np.random.default_rng(1))
    assert target.shape == (16, 16) and torch.allclose(target.sum(1), torch.ones(16))
    lam = float(target[0, 0])
    assert 0 < lam < 1 and float(target[0, 15]) == pytest.approx(1 - lam)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))


def test_cutmix_label_weight_is_the_pasted_area():
    rng = np.random.default_rng(2)
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()  # image i is constant i
    y = torch.arange(4)
    for _ in range(20):
        mixed, target = mix_batch(x, y, 4, cutmix_alpha=1.0, rng=rng)
        kept = (mixed[0] == 0).float().mean().item()  # fraction of image 0 still its own
        assert target[0, 0].item() == pytest.approx(kept, abs=1e-6)
        assert target[0, 3].item() == pytest.approx(1 - kept, abs=1e-6)  # pasted from the reversed batch


def test_mixing_is_reproducible_from_the_generator():
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 3
    a = mix_batch(x, y, 3, 0.8, 1.0, np.random.default_rng(5))
    b = mix_batch(x, y, 3, 0.8, 1.0, np.random.default_rng(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_weight_ema_follows_the_weights():
    model = ViT(ViTConfig(**SMALL), Kernels(attention="explicit", cls_only_last_block=False))
    ema = WeightEMA(model, decay=0.9)
    assert ema.model.kernels == model.kernels  # the average computes the way the model does
    start = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(step=1000)  # decay 0.9 once the ramp is over
    for s, e, p in zip(start, ema.model.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.9 * s + 0.1 * p.detach())
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_tta_flip_averages_an_image_and_its_mirror():
    from vitlab.augment import Normalize

    model = ViT(ViTConfig(**SMALL)).eval()
    torch.nn.init.normal_(model.head.weight)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    norm = Normalize((0.5,) * 3, (0.25,) * 3)
    got = predict_logits(model, images, norm, 4, torch.device("cpu"), None, tta_flip=True)
    with torch.no_grad():
        x = norm(images)
        expected = (model(x) + model(x.flip(-1))) / 2
    torch.testing.assert_close(got, expected)


def _recipe(tmp_path, name):
    return TrainConfig(out=str(tmp_path), name=name, epochs=3, depth=2, dim=32, heads=2, mlp_dim=64, batch_size=128, patch_size=2,
                       drop_path=0.1, layer_scale=1e-4, random_erasing=0.25, mixup_alpha=0.8, cutmix_alpha=1.0,
                       ema_decay=0.99, tta_flip=True, hflip=0.5, translate=1, trivial_augment=0.5, repeated_augment=2,
                       progressive_size=4, progressive_epochs=2, log_every=3, device="cpu")  # bit-exact resume is promised on the CPU (README)


def test_recipe_elements_train_report_ema_and_resume_exactly(tmp_path):
    quiet = dict(progress=False, log=lambda s: None)
    straight = train(_recipe(tmp_path, "straight"), **quiet)
    with open(straight.run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and "val_ema_acc" in rows[0]
    assert all(0 <= float(r["val_ema_acc"]) <= 1 for r in rows)
    with pytest.raises(TrainingInterrupted):
        train(_recipe(tmp_path, "resumed"), stop_when=lambda state: state.step >= 7, **quiet)
    resumed = train(resume=tmp_path / "resumed", **quiet)
    for ckpt in ("last", "best"):
        a = load_file(str(straight.run_dir / ckpt / "model.safetensors"))
        b = load_file(str(resumed.run_dir / ckpt / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), ckpt
    assert metrics_but_the_clock(straight.run_dir) == metrics_but_the_clock(resumed.run_dir)


def test_flip_averaging_is_for_the_final_table_and_per_epoch_validation_is_single_view(tmp_path):
    # fp32: the same numbers on every machine (bf16 CPUs learned less in 6 epochs: val loss 2.12)
    run = train(default_config().replace(out=str(tmp_path), epochs=6, tta_flip=True, ema_decay=0.9, precision="fp32"),
                progress=False, log=lambda s: None)
    with open(run.run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    best = run.run_dir / "best"
    chosen = read_meta(best, verify=False).extra
    logged_loss = float(rows[chosen["epoch"] - 1]["val_ema_loss" if chosen["weights"] == "ema" else "val_loss"])
    single = evaluate_checkpoint(best, batch_size=256, tta_flip=False, precision="fp32")["Val"]
    flipped = evaluate_checkpoint(best, batch_size=256, precision="fp32")["Val"]
    assert logged_loss < 2.0  # it learned something, so a mirror image reads differently
    # evaluation computes with the attention kernel measured fastest for its batches: equal to 1e-5, not bit for bit
    assert logged_loss == pytest.approx(single[0], rel=1e-5)
    assert run.results["Val"][0] == pytest.approx(flipped[0], rel=1e-5)
    assert abs(flipped[0] - single[0]) > 1e-2


@pytest.mark.parametrize("tokenizer", ["spt", "conv-stem", "conv-pool"])
def test_tokenizers_keep_a_vit(tokenizer):
    torch.manual_seed(0)
    model = ViT(ViTConfig(**SMALL, patch_embed=tokenizer))
    torch.nn.init.normal_(model.head.weight, std=0.02)
    x = torch.randn(3, 3, 16, 16)
    logits, attn = model.forward_with_attention(x)
    assert logits.shape == (3, 5) and attn[0].shape == (3, 2, 17, 17)  # still 16 patch tokens + class token
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_conv_pool_tokenizer_stages_and_receptive_field():
    cfg = ViTConfig(**{**SMALL, "patch_size": 4}, patch_embed="conv-pool")
    embed = ViT(cfg).patch_embed.eval()
    convs = [m for m in embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 and convs[-1] is embed.proj  # log2(4) stages
    x = torch.zeros(1, 3, 16, 16, requires_grad=True)
    tokens = embed(x)
    assert tokens.shape == (1, 16, cfg.dim)
    # one token's gradient reaches pixels outside its own 4x4 patch: the fields overlap
    tokens[0, 5].sum().backward()
    reached = x.grad[0].abs().sum(0) > 0
    assert reached[4:8, 4:8].any() and (reached.sum() > 16)
    with pytest.raises(ConfigError, match="--patch-size must be 2, 4, 8"):
        ViTConfig(**{**SMALL, "image_size": 12, "patch_size": 6}, patch_embed="conv-pool")


def test_shifted_patch_tokenization_sees_the_neighbours():
    from vitlab.tokenizers import diagonal_shifts

    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    shifted = diagonal_shifts(x, 2)
    assert shifted.shape == (1, 5, 8, 8)
    # each shifted copy moves the pixel by 2 in both axes (up-left, up-right, down-left, down-right)
    where = [tuple(c.nonzero()[0].tolist()) for c in shifted[0]]
    assert where == [(4, 4), (6, 6), (6, 2), (2, 6), (2, 2)]


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_locality_self_attention(attention):
    torch.manual_seed(0)
    model = ViT(ViTConfig(**SMALL, lsa=True), Kernels(attention=attention))
    torch.nn.init.normal_(model.head.weight, std=0.02)
    x = torch.randn(2, 3, 16, 16)
    _, attn = model.eval().forward_with_attention(x)
    for a in attn:  # no token attends to itself; rows still sum to one
        assert torch.diagonal(a, dim1=-2, dim2=-1).abs().max() == 0
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
    model.train()(x).sum().backward()
    temps = [b.attn.log_temperature for b in model.blocks]
    assert all(t.grad is not None and t.grad.abs() > 0 for t in temps)
    explicit = ViT(ViTConfig(**SMALL, lsa=True), Kernels(attention="explicit"))
    explicit.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.eval()(x), explicit.eval()(x), rtol=1e-5, atol=1e-5)
