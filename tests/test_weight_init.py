"""--init: how a new run's blocks start (mimetic attention, zero-initialised residual
projections), and that only a new run's weights are touched."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vitlab import ViT, ViTConfig
from vitlab.config import default_config
from vitlab.errors import ConfigError
from vitlab.weight_init import apply_init, mimetic_factors

SMALL = dict(image_size=16, channels=3, num_classes=5, patch_size=4, depth=3, heads=4, dim=64, mlp_dim=96)


def _products(model: ViT) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each head's W_q^T W_k (dim x dim) and each block's W_v^T W_proj^T."""
    qk, vo = [], []
    for block in model.blocks:
        a = block.attn
        d, h = a.proj.weight.shape[0], a.head_dim
        w_q, w_k, w_v = a.qkv.weight.detach().view(3, d, d)
        qk += [w_q[i * h:(i + 1) * h].T @ w_k[i * h:(i + 1) * h] for i in range(a.heads)]
        vo.append(w_v.T @ a.proj.weight.detach().T)
    return qk, vo


def _diagonal_against_rest(m: torch.Tensor) -> tuple[float, float]:
    off = m - torch.diag(m.diag())
    return m.diag().mean().item(), off.abs().mean().item()


def test_mimetic_factors_are_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    a, b = mimetic_factors(32, 32, 0.7, 0.7, g)
    z = (torch.randn(32, 32, generator=torch.Generator().manual_seed(0)) / 32 ** 0.5)
    torch.testing.assert_close(a.T @ b, 0.7 * z + 0.7 * torch.eye(32), atol=1e-4, rtol=1e-4)  # full rank: exact
    a8, b8 = mimetic_factors(32, 8, 0.7, -0.7, torch.Generator().manual_seed(0))
    assert a8.shape == b8.shape == (8, 32) and torch.linalg.matrix_rank(a8.T @ b8) == 8
    assert (a8.T @ b8).diag().mean() < 0  # a negative beta aims at minus the identity


def test_mimetic_init_makes_heads_attend_to_similar_tokens_and_values_oppose_the_residual():
    torch.manual_seed(0)
    plain = ViT(ViTConfig(**SMALL))
    qk, vo = _products(plain)
    assert all(abs(_diagonal_against_rest(m)[0]) < 0.01 for m in qk + vo)  # timm's init: no structure
    torch.manual_seed(1)
    mimetic = ViT(ViTConfig(**SMALL))
    apply_init(mimetic, "mimetic")
    qk, vo = _products(mimetic)
    assert len(qk) == 3 * 4 and len(vo) == 3
    for m in qk:
        diag, rest = _diagonal_against_rest(m)
        assert diag > 3 * rest and diag > 0.1, (diag, rest)
    for m in vo:
        diag, rest = _diagonal_against_rest(m)
        assert diag < -3 * rest and diag < -0.2, (diag, rest)
    torch.manual_seed(1)
    again = ViT(ViTConfig(**SMALL))
    apply_init(again, "mimetic")
    assert all(torch.equal(x, y) for x, y in zip(mimetic.state_dict().values(), again.state_dict().values()))
    x = torch.randn(2, 3, 16, 16)
    assert torch.isfinite(mimetic(x)).all()


def test_zero_residual_init_makes_every_block_the_identity_and_trunc_normal_changes_nothing():
    torch.manual_seed(0)
    model = ViT(ViTConfig(**SMALL)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_init(model, "trunc-normal")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    tokens = torch.randn(2, model.cfg.num_tokens, 64)
    assert not torch.allclose(model.blocks[0](tokens), tokens)
    apply_init(model, "zero-residual")
    for block in model.blocks:
        assert torch.equal(block(tokens), tokens)
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {f"blocks.{i}.{p}.weight" for i in range(3) for p in ("attn.proj", "mlp.fc2")}  # biases: 0 already
    with pytest.raises(ValueError, match="unknown init"):
        apply_init(model, "xavier")


@pytest.mark.parametrize("init", ["mimetic", "zero-residual"])
def test_a_run_starts_from_its_init_and_records_it(tmp_path, init):
    from vitlab.train import train

    cfg = default_config().replace(out=str(tmp_path), name=init, epochs=1, max_steps=1, lr=1e-9, min_lr=1e-9,
                                   warmup_epochs=0, depth=2, dim=32, heads=2, mlp_dim=32, tensorboard=False,
                                   threads=1, device="cpu", precision="fp32", init=init, ema_decay=0)
    run = train(cfg, progress=False, log=lambda s: None).run_dir
    weights = load_file(str(run / "last" / "model.safetensors"))
    proj = weights["blocks.0.attn.proj.weight"]
    if init == "zero-residual":  # one step at lr 1e-9 from zero stays within 1e-8 of it
        assert proj.abs().max() < 1e-6
    else:
        v = weights["blocks.0.attn.qkv.weight"][64:]
        assert (v.T @ proj.T).diag().mean() < -0.2
    assert f"init: {init}" in (run / "config.yaml").read_text()


def test_init_is_refused_with_init_from_and_outside_its_choices(tmp_path):
    with pytest.raises(ConfigError, match="--init mimetic initialises new weights and --init-from loads them"):
        default_config().replace(init="mimetic", init_from=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match="--init must be one of"):
        default_config().replace(init="xavier").validate()
    done = subprocess.run([sys.executable, "-m", "vitlab.cli", "train", "--init", "xavier", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr and "xavier" in done.stderr
