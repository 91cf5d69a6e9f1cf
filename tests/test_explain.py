"""Explanations: checked against hand computation and straightforward per-image code,
for every tokenizer and pool, and on a task where the right answer is known."""

from __future__ import annotations

import torch
import pytest
from click.testing import CliRunner
from PIL import Image

from vitlab import Kernels, ViT, ViTConfig, explain
from vitlab.cli import cli
from vitlab.config import default_config
from vitlab.data import DatasetSplits, ImageSet, channel_stats

SMALL = dict(image_size=16, channels=3, num_classes=5, patch_size=4, depth=3, heads=2, dim=32, mlp_dim=64)


def _model(**options) -> ViT:
    torch.manual_seed(0)
    model = ViT(ViTConfig(**{**SMALL, **options})).eval()
    for p in model.parameters():  # every weight non-trivial, so attention is not uniform
        torch.nn.init.normal_(p, std=0.3)
    return model


# --------------------------------------------------------------- rollout

def test_rollout_of_a_hand_computed_three_token_two_layer_example():
    a1 = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.6, 0.2], [0.0, 0.0, 1.0]])
    a2 = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.3, 0.3, 0.4]])
    # (A + I) with rows renormalised: each row sums to 2, so it is (A + I) / 2
    r1 = (a1 + torch.eye(3)) / 2
    r2 = (a2 + torch.eye(3)) / 2
    expected = r2 @ r1  # row 0: 0.5 * [0.75, 0.25, 0] + 0.5 * [0.1, 0.8, 0.1]
    assert torch.allclose(expected[0], torch.tensor([0.425, 0.525, 0.05]))
    attns = [a.view(1, 1, 3, 3).expand(1, 2, 3, 3) for a in (a1, a2)]  # two identical heads
    got = explain.rollout_layers(attns)
    torch.testing.assert_close(got[0][0], r1)
    torch.testing.assert_close(got[1][0], expected)


def _rollout_one_image(attns: list[torch.Tensor], fusion: str, discard: float) -> torch.Tensor:
    """Attention rollout the straightforward way: one image, loops, no batching tricks."""
    t = attns[0].shape[-1]
    result = torch.eye(t)
    for attn in attns:
        fused = {"mean": attn.mean(0), "max": attn.max(0).values, "min": attn.min(0).values}[fusion].clone()
        k = int(t * t * discard)
        if k:
            values = fused.flatten().tolist()
            candidates = sorted(range(1, t * t), key=lambda i: values[i])[:k]  # never entry (0, 0)
            flat = fused.flatten()
            for i in candidates:
                flat[i] = 0.0
            fused = flat.view(t, t)
        a = fused + torch.eye(t)
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return result


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.3, 0.9])
def test_rollout_matches_a_per_image_reference(fusion, discard):
    g = torch.Generator().manual_seed(1)
    attns = [torch.rand(4, 3, 6, 6, generator=g).softmax(-1) for _ in range(3)]  # 4 images, 3 heads, 6 tokens
    batched = explain.rollout_layers(attns, fusion, discard)[-1]
    for i in range(4):
        torch.testing.assert_close(batched[i], _rollout_one_image([a[i] for a in attns], fusion, discard))


def test_identity_or_uniform_attention_gives_a_uniform_map():
    eye = [torch.eye(5).expand(2, 2, 5, 5) for _ in range(3)]
    uniform = [torch.full((2, 2, 5, 5), 0.2) for _ in range(3)]
    for attns in (eye, uniform):
        row = explain.rollout_layers(attns)[-1][:, 0, 1:]
        assert torch.allclose(row, row[:, :1].expand_as(row))


# -------------------------------------------------------------- gradient

def test_gradient_attention_matches_autograd_the_slow_way():
    """Per image: one backward pass of that image's target logit to every layer's attention
    (hooks on the explicit kernel), then Chefer's rule with plain loops."""
    model = _model()
    x = torch.randn(3, 3, 16, 16)
    targets = torch.tensor([1, 4, 0])
    fast, logits = explain.gradient_tokens(model, x, targets)
    for i in range(3):
        xi = x[i: i + 1].clone().requires_grad_(True)
        out, attns = model.forward_with_attention(xi)
        grads = torch.autograd.grad(out[0, targets[i]], attns)
        t = attns[0].shape[-1]
        r = torch.eye(t)
        for a, g in zip(attns, grads):
            cam = torch.zeros(t, t)
            for h in range(a.shape[1]):
                cam += (a[0, h] * g[0, h]).clamp(min=0)
            r = r + (cam / a.shape[1]) @ r
        torch.testing.assert_close(fast[i], r[0, 1:], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(logits, model(x))
    default, _ = explain.gradient_tokens(model, x)  # the predicted class by default
    torch.testing.assert_close(default, explain.gradient_tokens(model, x, logits.argmax(1))[0])


# ------------------------------------------------- every tokenizer, pool, kernel

@pytest.mark.parametrize("options", [dict(patch_embed="conv"), dict(patch_embed="linear"), dict(patch_embed="spt"),
                                     dict(patch_embed="conv-stem"), dict(patch_embed="conv-pool"), dict(lsa=True),
                                     dict(pool="mean"), dict(pool="mean", patch_embed="conv-pool", lsa=True)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_method_for_every_tokenizer_and_pool(options):
    model = _model(**options).with_kernels(Kernels(attention="sdpa"))  # explanations use the explicit kernel anyway
    x = torch.randn(4, 3, 16, 16)
    before = model(x)
    maps = {"gradient": explain.gradient_attention(model, x), "rollout": explain.rollout(model, x, "max", 0.5),
            "attention": explain.raw_attention(model, x)}
    for name, m in maps.items():
        assert m.shape == (4, 16, 16) and torch.isfinite(m).all(), name
        assert m.flatten(1).std(1).min() > 0, name  # not a constant map
    assert explain.raw_attention(model, x, per_head=True).shape == (4, 2, 16, 16)
    assert explain.rollout_tokens(model, x, per_layer=True).shape == (4, 3, 16)
    torch.testing.assert_close(model(x), before)  # explaining changed nothing
    assert not model.training
    if options.get("lsa"):
        _, attns = model.forward_with_attention(x)
        assert all(torch.diagonal(a, dim1=-2, dim2=-1).abs().max() == 0 for a in attns)


def test_token_grid_maps_back_onto_the_image():
    """A relevance of one on patch (row 1, column 2) of the 4x4 grid lights up pixels 4..7 x 8..11."""
    model = _model()
    rel = torch.zeros(1, 16)
    rel[0, 1 * 4 + 2] = 1.0
    image = explain.to_image(model, rel)
    peak = (image[0] == image[0].max()).nonzero()
    assert peak[:, 0].min() >= 4 and peak[:, 0].max() <= 7 and peak[:, 1].min() >= 8 and peak[:, 1].max() <= 11


def test_perturbation_curves_run_from_the_intact_image_to_the_blank_one():
    model = _model(num_classes=2)
    x = torch.randn(8, 3, 16, 16)
    labels = model(x).argmax(1)  # the model's own predictions: accuracy 1 on the intact images
    relevance = torch.rand(8, 16, generator=torch.Generator().manual_seed(0))
    curves = explain.perturbation_curves(model, x, labels, relevance)
    assert curves.fractions == [i / 10 for i in range(11)]
    assert curves.positive[0] == curves.negative[0] == 1.0
    assert curves.positive[-1] == curves.negative[-1]  # every patch removed either way
    with torch.no_grad():
        blank = model(torch.zeros_like(x)).softmax(1).gather(1, labels.view(-1, 1)).mean()
        intact = model(x).softmax(1).max(1).values.mean()
    assert curves.insertion[0] == pytest.approx(float(blank)) and curves.deletion[-1] == pytest.approx(float(blank))
    assert curves.deletion[0] == pytest.approx(float(intact)) and curves.insertion[-1] == pytest.approx(float(intact))
    per_image = explain.deletion_scores(model, x, relevance)
    assert per_image.shape == (8,) and per_image.mean() == pytest.approx(curves.aucs()["deletion"], abs=1e-5)


# ------------------------------------------------------------ localisation

def _squares(n: int, seed: int, size: int = 16, side: int = 4):
    """Noisy canvases (values 0..159); in class 1 a bright 4x4 square sits at a random,
    unaligned place. Only the square decides the class."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 160, (n, 1, size, size), generator=g).to(torch.uint8)
    labels = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(0, size - side + 1, (n, 2), generator=g)
    for i in range(n):
        if labels[i] == 1:
            y, x = pos[i].tolist()
            images[i, 0, y:y + side, x:x + side] = 255
    return ImageSet(images, labels), pos


def _hits(peak: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Whether the peak patch (of the 4x4 grid of 4 px patches) overlaps the square."""
    py, px, y0, x0 = peak // 4, peak % 4, pos[:, 0], pos[:, 1]
    return (py * 4 <= y0 + 3) & (py * 4 + 3 >= y0) & (px * 4 <= x0 + 3) & (px * 4 + 3 >= x0)


def test_explanations_find_the_square_that_decides_the_class(tmp_path):
    """A ViT trained for seconds to tell canvases with the square from canvases without.
    Measured (9 trainings: 3 and 5 epochs, seeds 0-2, 1 and 2 threads; test accuracy
    0.996-1.0): the peak of the gradient-weighted map falls on the square in 0.992-1.0 of
    the test images that have one, rollout's in 0.996-1.0, a random patch's in ~0.18.
    The bars are the issue's (0.9 and 0.7), well under every measured run.

    Where the class is the square's texture (a solid square against a ring, every canvas
    holding one) the methods part ways: rollout 0.61-1.0, gradient-weighted 0.53-0.79
    (benchmarks/RESULTS.md, "Explanations"). The gradient of a logit with respect to one
    attention weight ignores that the softmax keeps each row's sum at one, and there it is
    often negative on the square, so (dA * A)^+ drops it."""
    from vitlab.inference import load_predictor
    from vitlab.train import train

    train_set, _ = _squares(4000, seed=0)
    val_set, _ = _squares(500, seed=1)
    test_set, pos = _squares(500, seed=2)
    mean, std = channel_stats(train_set.images)
    data = DatasetSplits("squares", ["absent", "present"], train_set, val_set, test_set, False, mean, std)
    cfg = default_config().replace(dataset="folder", out=str(tmp_path), epochs=3, depth=2, dim=32, heads=2, mlp_dim=64,
                                   patch_size=4, crop=False, batch_size=64, warmup_epochs=1, tensorboard=False)
    result = train(cfg, data=data, progress=False, log=lambda s: None)
    assert result.results["Test"][1] > 0.97
    predictor = load_predictor(result.run_dir / "best", "cpu")
    has = test_set.labels == 1
    x = predictor.normalize(test_set.images[has])
    rates = {m: float(_hits(explain.tokens(predictor.model, x, m).argmax(1), pos[has]).float().mean())
             for m in ("rollout", "gradient")}
    chance = float(torch.stack([_hits(torch.full((int(has.sum()),), k), pos[has]) for k in range(16)]).float().mean())
    assert chance < 0.25
    assert rates["gradient"] >= 0.90 and rates["rollout"] >= 0.70, rates


# ------------------------------------------------------------------ CLI

def test_explain_command_for_files_and_for_a_split(digits_run, tmp_path):
    from vitlab.data import load_digits

    digits, _ = load_digits()
    Image.fromarray(digits.images[0, 0].numpy()).save(tmp_path / "zero.png")
    (tmp_path / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["explain", str(digits_run / "best"), str(tmp_path / "zero.png"),
                                      str(tmp_path / "notes.png"), "--out", str(out), "--per-head", "--per-layer",
                                      "--method", "rollout", "--head-fusion", "max", "--discard-ratio", "0.5"])
    assert result.exit_code == 1 and "notes.png: error: cannot read as an image" in result.output
    with Image.open(out / "zero-rollout.png") as im:
        assert im.width > 300 and im.height > 300
    result = CliRunner().invoke(cli, ["explain", str(digits_run / "best"), "--split", "test", "--count", "40",
                                      "--out", str(out), "--target", "3"])
    assert result.exit_code == 0, result.output
    assert (out / "test-correct-gradient.png").is_file() and (out / "test-mistaken-gradient.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--target", "cat"], "--target 'cat' is neither a class name nor an index 0..9"),
    (["--split", "test", "--count", "100000"], "--count 100000 is beyond the test split's 359 images"),
    ([], "give image files or --split"),
])
def test_explain_command_errors_are_one_line(digits_run, tmp_path, args, message):
    extra = ["--split", "test"] if args and args[0] == "--target" else []
    result = CliRunner().invoke(cli, ["explain", str(digits_run / "best"), *extra, *args, "--out", str(tmp_path)])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_explain_refuses_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    result = CliRunner().invoke(cli, ["explain", str(tmp_path), str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "not a vitlab checkpoint" in result.output


def test_every_run_writes_an_attention_figure(digits_run):
    with Image.open(digits_run / "attention.png") as im:
        assert im.format == "PNG" and im.width > 600
    assert "[attention.png](attention.png)" in (digits_run / "results.md").read_text()


def test_a_tile_grid_shows_each_pixel_as_a_square_the_heat_over_it_and_mistakes_framed(tmp_path):
    """The grids (predictions.png, attention.png, the explain command's) are one picture: each
    source pixel a sharp square, a heatmap blended over it, a red frame round a mistake."""
    import numpy as np

    from vitlab import report

    image = torch.tensor([[[0, 255], [255, 0]]], dtype=torch.uint8)  # a grey 2x2 checkerboard
    pixels = report.tile_pixels(report.Tile(image, "", ""), 6)
    assert pixels.shape == (6, 6, 3) and (pixels[:3, :3] == 0).all() and (pixels[:3, 3:] == 1).all()
    heat = report.tile_pixels(report.Tile(image, "", "", heat=torch.tensor([[0.0, 0.0], [0.0, 1.0]])), 6)
    assert heat[5, 5, 0] > heat[0, 0, 0] and heat[0, 0, 2] > heat[5, 5, 2]  # jet: red where hot, blue where cold
    assert np.allclose(heat[0, 0], 0.45 * np.array([0.0, 0.0, 0.5]), atol=0.01)  # cold: jet's dark blue at 45%
    tiles = [report.Tile(torch.full((3, 4, 4), 255, dtype=torch.uint8), "right", "true: a"),
             report.Tile(torch.full((3, 4, 4), 255, dtype=torch.uint8), "wrong", "true: b", mistake=True)]
    report.plot_tiles(tiles, tmp_path / "grid.png", "two tiles", cols=2)
    with Image.open(tmp_path / "grid.png") as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)  # tab:red: the frame (black text)
    columns = red.nonzero()[1]
    assert red.sum() > 100 and columns.min() > rgb.shape[1] // 2  # a frame, round the second tile only
