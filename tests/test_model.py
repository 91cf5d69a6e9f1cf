import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitlab import Kernels, ViT, ViTConfig
from vitlab.errors import ConfigError
from vitlab.model import flops_per_image

SMALL = dict(image_size=16, channels=3, num_classes=7, patch_size=4, depth=2, heads=2, dim=32, mlp_dim=64)


def test_logits_shape_and_zero_head():
    model = ViT(ViTConfig(**SMALL))
    out = model(torch.randn(5, 3, 16, 16))
    assert out.shape == (5, 7)
    # The head starts at zero, so every class starts equally likely.
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("patch_embed", ["conv", "linear"])
def test_every_parameter_gets_a_gradient(pool, patch_embed):
    torch.manual_seed(0)
    model = ViT(ViTConfig(**SMALL, pool=pool, patch_embed=patch_embed))
    torch.nn.init.normal_(model.head.weight, std=0.02)  # the zero head would block gradients to the body
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if pool == "mean":
        assert model.pos_embed.shape[1] == 16  # no class token position


def test_attention_weights_returned_for_every_layer():
    torch.manual_seed(0)
    model = ViT(ViTConfig(**SMALL)).eval()
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(3, 3, 16, 16)
    logits, attentions = model.forward_with_attention(x)
    assert len(attentions) == SMALL["depth"]
    for a in attentions:
        assert a.shape == (3, SMALL["heads"], 17, 17)  # 16 patches + class token
        torch.testing.assert_close(a.sum(-1), torch.ones(3, SMALL["heads"], 17))
        assert (a >= 0).all()
    # Maps need every token's attention in the last block; the logits are those of the shortcut path.
    assert model.kernels.cls_only_last_block
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 7)  # forward: logits, always
    torch.testing.assert_close(logits, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [dict(attention="sdpa"), dict(attention="explicit"), dict(lsa=True),
                                     dict(lsa=True, attention="explicit"),
                                     dict(drop_path=0.3, layer_scale=0.1), dict(qk_norm=True),
                                     dict(qk_norm=True, attention="explicit"), dict(mlp_act="relu2")],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_class_token_shortcut_gives_the_same_logits_and_gradients(options):
    """The last block computing only the class token's output is the same function with the
    same gradients, in training mode too (stochastic depth draws the same per-sample masks;
    dropout, off by default, draws masks for the computed tokens only, so its draws differ)."""
    torch.manual_seed(0)
    attention = options.pop("attention", "auto")
    model = ViT(ViTConfig(**{**SMALL, "depth": 3}, **options), Kernels(attention=attention))
    for p in model.parameters():  # every weight non-trivial, the head included
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(5, 3, 16, 16)
    results = {}
    for shortcut in (True, False):
        variant = model.with_kernels(Kernels(attention=attention, cls_only_last_block=shortcut))
        torch.manual_seed(1)
        out = variant(x)
        out.square().sum().backward()
        results[shortcut] = out, [p.grad.clone() for p in variant.parameters()]
    (fast, fast_grads), (full, full_grads) = results[True], results[False]
    assert fast.abs().max() > 1  # the logits carry the network, not just a bias
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    for (name, _), g_fast, g_full in zip(model.named_parameters(), fast_grads, full_grads, strict=True):
        torch.testing.assert_close(g_fast, g_full, rtol=1e-4, atol=1e-5, msg=name)


def test_class_token_shortcut_saves_most_of_the_last_block():
    cfg = ViTConfig(**{**SMALL, "depth": 3})
    model = ViT(cfg, Kernels(attention="explicit"))
    x = torch.randn(2, 3, 16, 16)
    counts = {}
    for shortcut in (True, False):
        variant = model.with_kernels(Kernels(attention="explicit", cls_only_last_block=shortcut))
        with FlopCounterMode(display=False) as counter:
            variant(x)
        counts[shortcut] = counter.get_total_flops() / 2 / 2  # per image, multiply-adds
    n, d, m = cfg.num_patches + 1, cfg.dim, cfg.mlp_dim
    # Skipped: the query projection, attention, output projection and MLP of the 16 patch tokens.
    skipped = (n - 1) * (d * d + 2 * n * d + d * d + 2 * d * m)
    assert counts[False] - counts[True] == skipped
    # The FLOP count the progress bar and MFU use is the work actually done.
    assert flops_per_image(cfg, training=False, cls_only_last_block=True) == pytest.approx(2 * counts[True], rel=0.01)
    assert flops_per_image(cfg, training=False) == pytest.approx(2 * counts[False], rel=0.01)
    mean_pool = ViT(ViTConfig(**{**SMALL, "depth": 3}, pool="mean"), Kernels(attention="explicit"))  # every token feeds the head: nothing to skip
    with FlopCounterMode(display=False) as counter:
        mean_pool(x)
    assert counter.get_total_flops() / 2 == pytest.approx(flops_per_image(mean_pool.cfg, training=False), rel=0.01)


def test_sdpa_and_explicit_attention_compute_the_same_function():
    torch.manual_seed(1)
    a = ViT(ViTConfig(**SMALL), Kernels(attention="sdpa")).eval()
    b = ViT(ViTConfig(**SMALL), Kernels(attention="explicit")).eval()
    b.load_state_dict(a.state_dict())
    torch.nn.init.normal_(a.head.weight)
    b.head.weight.data.copy_(a.head.weight)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_conv_and_linear_patch_embedding_are_the_same_map():
    cfg = ViTConfig(**SMALL)
    conv = ViT(cfg).patch_embed
    lin = ViT(ViTConfig(**SMALL, patch_embed="linear")).patch_embed
    # Conv weight (dim, C, p, p) flattened as (C, p, p) matches the linear layer's patch layout.
    lin.proj.weight.data.copy_(conv.proj.weight.reshape(cfg.dim, -1))
    lin.proj.bias.data.copy_(conv.proj.bias)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(conv(x), lin(x), rtol=1e-5, atol=1e-5)


def test_flop_estimate_matches_torch_flop_counter():
    cfg = ViTConfig(image_size=32, channels=3, num_classes=10, patch_size=4, depth=2, heads=4, dim=64, mlp_dim=128)
    model = ViT(cfg, Kernels(attention="explicit", cls_only_last_block=False))  # the architecture's FLOPs, as peers compute them
    x = torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        model(x)
    measured = counter.get_total_flops() / 2
    assert measured == pytest.approx(flops_per_image(cfg, training=False), rel=0.01)


def test_weight_decay_groups_exclude_biases_norms_and_embeddings():
    model = ViT(ViTConfig(**SMALL))
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.pos_embed) in ids and id(model.cls_token) in ids and id(model.norm.weight) in ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("bad, message", [
    (dict(patch_size=5), "--patch-size 5 does not divide image size 16"),
    (dict(heads=3), "--heads 3 does not divide --dim 32"),
    (dict(num_classes=1), "at least 2 classes"),
    (dict(dropout=1.5), "--dropout must be in"),
    (dict(pool="max"), "--pool must be"),
    (dict(depth=10_000), "--depth must be an integer from 1 to 64"),
    (dict(depth=True), "--depth must be an integer from 1 to 64"),  # True is an int to Python
    (dict(patch_size=True), "--patch-size must be an integer"),
    (dict(image_size=4096, patch_size=8), "image size must be an integer from 1 to 512"),
    (dict(image_size=512, patch_size=2), "over the limit of 4,096"),
])
def test_invalid_model_config_is_a_config_error(bad, message):
    with pytest.raises(ConfigError, match=message):
        ViTConfig(**{**SMALL, **bad})


def test_kernels_are_not_architecture_and_every_copy_shares_them():
    """The attention kernel and the class-token shortcut are how a model computes, not what:
    not in its config (so not in model.json), fixed at build time, and copied with it."""
    import copy

    from vitlab.model import ViTConfig as Cfg

    assert "attention" not in Cfg().to_dict() and "cls_only_last_block" not in Cfg().to_dict()
    model = ViT(ViTConfig(**SMALL), Kernels(attention="explicit", cls_only_last_block=False))
    twin = copy.deepcopy(model)
    assert twin.kernels == model.kernels and all(b.attn.kernels is twin.kernels for b in twin.blocks)
    with pytest.raises(ConfigError, match="--attention must be one of"):
        Kernels(attention="flash")
    with pytest.raises(AttributeError):  # nothing rewrites them under a built model
        model.kernels.attention = "sdpa"
    other = model.with_kernels(Kernels(attention="sdpa"))
    assert other.kernels.attention == "sdpa" and all(b.attn.kernels is other.kernels for b in other.blocks)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(other(x), model(x), rtol=1e-5, atol=1e-5)  # the same weights, the same function


def test_auto_kernel_picks_by_the_device_and_autocast_of_each_call(monkeypatch):
    """A model built from Python (kernels 'auto') runs explicit attention under CPU bf16
    autocast (SDPA's slow path there) and SDPA otherwise, with the same logits."""
    import vitlab.model as vmodel

    seen = []
    real = vmodel.F.scaled_dot_product_attention
    monkeypatch.setattr(vmodel.F, "scaled_dot_product_attention", lambda *a, **k: seen.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = ViT(ViTConfig(**SMALL)).eval()
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 16, 16)
    fp32 = model(x)
    assert len(seen) == SMALL["depth"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(x)
    assert len(seen) == SMALL["depth"]  # no SDPA call under bf16 on CPU
    torch.testing.assert_close(bf16.float(), fp32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_patch_dropout_trains_on_a_subset_of_tokens_and_evaluates_on_all(pool):
    cfg = ViTConfig(**{**SMALL, "pool": pool, "patch_dropout": 0.5})
    model = ViT(cfg, Kernels(attention="explicit"))
    x = torch.randn(3, 3, 16, 16)
    prefix = 1 if pool == "cls" else 0
    assert model.train().embed(x).shape == (3, prefix + 8, 32)  # 8 of the 16 patches, the class token kept
    tokens = model.eval().embed(x)
    assert tokens.shape == (3, prefix + 16, 32)
    kept = model.train().drop_patches(tokens)
    full = {tuple(t.tolist()) for t in tokens[0, prefix:]}
    assert all(tuple(t.tolist()) in full for t in kept[0, prefix:])  # whole tokens, each from the image
    assert len({tuple(t.tolist()) for t in kept[0, prefix:]}) == 8  # none twice
    plain = ViT(ViTConfig(**{**SMALL, "pool": pool}), Kernels(attention="explicit"))
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain.eval()(x), model.eval()(x))  # evaluation sees every token
    model.train()(x).sum().backward()
    assert model.patch_embed.proj.weight.grad is not None
    # its training FLOPs are those of the kept tokens
    with FlopCounterMode(display=False) as counter:
        ViT(cfg, Kernels(attention="explicit", cls_only_last_block=False)).train()(torch.randn(2, 3, 16, 16))
    assert counter.get_total_flops() / 2 == pytest.approx(flops_per_image(cfg, training=True) / 3, rel=0.01)


def test_qk_norm_normalises_each_heads_queries_and_keys_and_relu2_squares():
    """With QK-norm, scaling the query and key projections changes nothing (each head's q and
    k pass a LayerNorm); without it, it changes the attention. The relu2 MLP is fc2(relu(fc1 x)^2)."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    for qk_norm in (True, False):
        model = ViT(ViTConfig(**SMALL, qk_norm=qk_norm), Kernels(attention="explicit")).eval()
        torch.nn.init.normal_(model.head.weight)
        before = model(x)
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight[:2 * SMALL["dim"]] *= 7.0
                block.attn.qkv.bias[:2 * SMALL["dim"]] *= 7.0
        change = (model(x) - before).abs().max().item()
        assert change < 1e-3 if qk_norm else change > 0.1, change
        assert (hasattr(model.blocks[0].attn.q_norm, "weight")) == qk_norm
    mlp = ViT(ViTConfig(**SMALL, mlp_act="relu2")).blocks[0].mlp
    t = torch.randn(2, 5, SMALL["dim"])
    torch.testing.assert_close(mlp(t), mlp.fc2(torch.relu(mlp.fc1(t)) ** 2))
    with pytest.raises(ConfigError, match="--mlp-act must be one of gelu, relu2, got 'swish'"):
        ViTConfig(**SMALL, mlp_act="swish").validate()
