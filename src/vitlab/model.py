"""The Vision Transformer (Dosovitskiy et al. 2020), small enough to read in one sitting.

Structure follows timm's ``vision_transformer.py``: ``PatchEmbed`` -> class token
and learned positional embedding -> ``depth`` pre-norm ``Block``s (``Attention``
+ ``Mlp``) -> final LayerNorm -> linear head on the class token (or the mean of
the patch tokens). With the class token, the last block computes that token's output
only: the head reads nothing else (``ViT.cls_only_last_block``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import PATCH_EMBEDS
from .errors import ConfigError


@dataclass
class ViTConfig:
    """Everything needed to rebuild a ViT; stored as JSON beside its weights."""

    image_size: int = 32
    channels: int = 3
    num_classes: int = 10
    patch_size: int = 4
    depth: int = 12
    heads: int = 8
    dim: int = 256
    mlp_dim: int = 512
    dropout: float = 0.0
    attn_dropout: float = 0.0
    # Stochastic depth: the last block drops its residual branches with this
    # probability, earlier blocks proportionally less (0 at the first).
    drop_path: float = 0.0
    # LayerScale (CaiT): per-channel scales on each residual branch, initialised to
    # this value; 0 disables.
    layer_scale: float = 0.0
    pool: Literal["cls", "mean"] = "cls"
    # Tokenizer: "conv"/"linear" (the plain patch projection, same map), "spt" (shifted
    # patch tokenization, Lee et al. 2021), "conv-stem" (a 3x3 conv before the patch
    # projection, so neighbouring patches overlap in what they see), "conv-pool" (the
    # Compact Convolutional Transformer tokenizer, Hassani et al. 2021: log2(patch)
    # stages of 3x3 conv + ReLU + 3x3/2 max-pool, so each token sees a wider field).
    patch_embed: Literal["conv", "linear", "spt", "conv-stem", "conv-pool"] = "conv"
    # Locality self-attention (Lee et al. 2021): learnable softmax temperature, and no
    # token attends to itself.
    lsa: bool = False
    # "sdpa": torch.nn.functional.scaled_dot_product_attention; "explicit":
    # softmax(q k^T) v as matrix products. Both compute the same function;
    # which is faster depends on device and precision (see benchmarks/).
    attention: Literal["sdpa", "explicit"] = "sdpa"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("image_size", "channels", "num_classes", "patch_size", "depth", "heads", "dim", "mlp_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {self.num_classes}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"patch-size {self.patch_size} does not divide image-size {self.image_size}; "
                f"choose one of {[p for p in range(1, self.image_size + 1) if self.image_size % p == 0]}"
            )
        if self.dim % self.heads:
            raise ConfigError(f"heads {self.heads} does not divide dim {self.dim}; dim must be a multiple of heads")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.layer_scale < 0:
            raise ConfigError(f"layer-scale must be >= 0 (0 disables), got {self.layer_scale}")
        if self.pool not in ("cls", "mean"):
            raise ConfigError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.patch_embed not in PATCH_EMBEDS:
            raise ConfigError(f"patch-embed must be one of {', '.join(PATCH_EMBEDS)}, got {self.patch_embed!r}")
        if self.patch_embed == "conv-pool" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ConfigError(f"patch-embed conv-pool halves the image per stage: patch-size must be 2, 4, 8 ..., got {self.patch_size}")
        if self.patch_embed == "spt" and self.patch_size % 2:
            raise ConfigError(f"patch-embed spt shifts by half a patch: patch-size must be even, got {self.patch_size}")
        if self.attention not in ("sdpa", "explicit"):
            raise ConfigError(f"attention must be 'sdpa' or 'explicit', got {self.attention!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def conv_pool_stages(self) -> int:
        """Conv + max-pool stages of the conv-pool tokenizer: each halves the image, log2(patch)."""
        return self.patch_size.bit_length() - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), patches in row-major order."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def diagonal_shifts(x: torch.Tensor, s: int) -> torch.Tensor:
    """The image and its four copies shifted by s pixels diagonally (zero fill), stacked on channels."""
    padded = F.pad(x, (s, s, s, s))
    h, w = x.shape[-2:]
    shifted = [padded[..., s + dy: s + dy + h, s + dx: s + dx + w] for dy, dx in ((-s, -s), (-s, s), (s, -s), (s, s))]
    return torch.cat([x, *shifted], dim=1)


class ChannelsLast(nn.Module):
    """Switch feature maps to NHWC. Measured on the 2-core CPU (batch 256, 64 channels
    at 28x28): max-pooling takes 40 ms in NCHW and 3.5 ms in NHWC, and the conv-pool
    tokenizer's forward 89 ms against 51 ms."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


class PatchEmbed(nn.Module):
    """Cut the image into patches and project each to ``dim``.

    ``conv`` and ``linear`` are the same linear map (a strided convolution is a
    matmul over flattened patches); both are offered because their speed differs.
    ``spt`` adds four half-patch diagonal shifts of the image as channels, then
    LayerNorm and a linear projection; ``conv-stem`` runs a 3x3 convolution first.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.kind = cfg.patch_embed
        patch_dim = cfg.channels * cfg.patch_size**2
        if self.kind == "conv":
            self.proj = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        elif self.kind == "linear":
            self.proj = nn.Linear(patch_dim, cfg.dim)
        elif self.kind == "spt":
            self.norm = nn.LayerNorm(5 * patch_dim)
            self.proj = nn.Linear(5 * patch_dim, cfg.dim)
        elif self.kind == "conv-stem":
            self.stem = nn.Sequential(nn.Conv2d(cfg.channels, cfg.dim // 2, 3, padding=1), nn.GELU())
            self.proj = nn.Conv2d(cfg.dim // 2, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        else:  # conv-pool: the last stage's conv is `proj`, the earlier stages are the stem
            stages, c = [], cfg.channels
            for _ in range(cfg.conv_pool_stages - 1):
                stages += [nn.Conv2d(c, cfg.dim // 2, 3, padding=1), ChannelsLast(), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
                c = cfg.dim // 2
            self.stem = nn.Sequential(*stages)
            self.proj = nn.Conv2d(c, cfg.dim, 3, padding=1)
            self.pool = nn.Sequential(ChannelsLast(), nn.ReLU(), nn.MaxPool2d(3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, dim)
        p = self.patch_size
        if self.kind == "conv":
            return self.proj(x).flatten(2).transpose(1, 2)
        if self.kind == "linear":
            return self.proj(patchify(x, p))
        if self.kind == "spt":
            return self.proj(self.norm(patchify(diagonal_shifts(x, p // 2), p)))
        if self.kind == "conv-stem":
            return self.proj(self.stem(x)).flatten(2).transpose(1, 2)
        return self.pool(self.proj(self.stem(x))).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.dim // cfg.heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_dropout = cfg.attn_dropout
        self.proj_drop = nn.Dropout(cfg.dropout)
        self.use_sdpa = cfg.attention == "sdpa"
        # LSA: a learnable temperature (stored as its log) replaces the fixed scale.
        self.log_temperature = nn.Parameter(torch.tensor(math.log(self.scale))) if cfg.lsa else None

    def _split_heads(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, N, parts * dim) projections -> ``parts`` tensors of (B, heads, N, head_dim)."""
        b, n, width = t.shape
        parts = width // (self.heads * self.head_dim)
        return t.reshape(b, n, parts, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, return_attention: bool = False, queries: int | None = None):
        """``queries``: only the first ``queries`` tokens attend (all tokens still serve as
        keys and values); the output then has that many tokens."""
        b, n, d = x.shape
        m = n if queries is None else queries
        if m == n:
            q, k, v = self._split_heads(self.qkv(x))
        else:  # the same projection, with the query rows applied to the query tokens only
            w_q, w_kv = self.qkv.weight.split([d, 2 * d])
            b_q, b_kv = self.qkv.bias.split([d, 2 * d])
            (q,) = self._split_heads(F.linear(x[:, :m], w_q, b_q))
            k, v = self._split_heads(F.linear(x, w_kv, b_kv))
        p_drop = self.attn_dropout if self.training else 0.0
        attn = None
        scale = self.log_temperature.exp() if self.log_temperature is not None else self.scale
        # LSA masks the diagonal: a token may not attend to itself (True = may attend).
        allowed = ~torch.eye(m, n, dtype=torch.bool, device=x.device) if self.log_temperature is not None else None
        if self.use_sdpa and not return_attention:
            if allowed is None:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop)
            else:  # the learnable temperature goes into q, so SDPA's own scale is 1
                out = F.scaled_dot_product_attention(q * scale, k, v, attn_mask=allowed, dropout_p=p_drop, scale=1.0)
        else:
            attn = (q * scale) @ k.transpose(-2, -1)
            if allowed is not None:
                attn = attn.masked_fill(~allowed, float("-inf"))
            attn = attn.softmax(dim=-1)
            out = F.dropout(attn, p_drop, self.training) @ v
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, m, d)))
        return out, attn


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of samples while
    training (rescaling the rest), identity at eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.empty(x.shape[0], *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer encoder block: x + Attn(LN(x)), then x + MLP(LN(x)),
    each branch optionally scaled (LayerScale) and dropped (stochastic depth)."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = Mlp(cfg)
        self.ls1 = LayerScale(cfg.dim, cfg.layer_scale) if cfg.layer_scale > 0 else nn.Identity()
        self.ls2 = LayerScale(cfg.dim, cfg.layer_scale) if cfg.layer_scale > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, return_attention: bool = False, queries: int | None = None):
        """``queries``: compute the outputs of the first ``queries`` tokens only."""
        a, attn = self.attn(self.norm1(x), return_attention, queries)
        if queries is not None:
            x = x[:, :queries]
        x = x + self.drop_path(self.ls1(a))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, attn


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        # The class token exists only when it feeds the head.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        num_tokens = cfg.num_patches + (1 if cfg.pool == "cls" else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([Block(cfg, rate) for rate in rates])
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        # The head reads only the class token, so the last block need not compute the other
        # tokens' outputs: the same logits for an eighth fewer FLOPs at depth 6 (a 19% faster
        # step on the 2-core CPU). Switchable to compare; attention maps are always full.
        self.cls_only_last_block = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ViT/timm init: truncated normal (std 0.02) for linear layers and
        embeddings, zero biases, and a zero head so every class starts equal."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, LayerScale):
                nn.init.constant_(m.gamma, self.cfg.layer_scale)
        # Patch projection: LeCun-normal over its fan-in, as in the JAX original.
        w = self.patch_embed.proj.weight
        fan_in = w[0].numel()
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor, return_attention: bool = False):
        x = self.patch_embed(x)
        if self.cfg.pool == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pos_drop(x + self.pos_embed.to(x.dtype))
        attentions = []
        shortcut = self.cls_only_last_block and self.cfg.pool == "cls" and not return_attention
        for i, block in enumerate(self.blocks):
            x, attn = block(x, return_attention, 1 if shortcut and i == len(self.blocks) - 1 else None)
            if return_attention:
                attentions.append(attn)
        x = self.norm(x)
        x = x[:, 0] if self.cfg.pool == "cls" else x.mean(dim=1)
        return x, attentions

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """Logits of shape (B, num_classes); with ``return_attention`` also a list
        with one (B, heads, tokens, tokens) attention map per layer."""
        feats, attentions = self.forward_features(x, return_attention)
        logits = self.head(feats)
        return (logits, attentions) if return_attention else logits

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matrices, not biases, norms or embeddings (nanoGPT's rule)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "pos_embed" not in name and "cls_token" not in name else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def flops_per_image(cfg: ViTConfig, training: bool = True) -> float:
    """Matmul FLOPs for one image (2 per multiply-add), x3 for a training step
    (forward + backward), as in nanoGPT's MFU estimate. Elementwise work is ignored."""
    n = cfg.num_patches + (1 if cfg.pool == "cls" else 0)
    d, m = cfg.dim, cfg.mlp_dim
    patch = cfg.num_patches * cfg.channels * cfg.patch_size**2 * d * (5 if cfg.patch_embed == "spt" else 1)
    if cfg.patch_embed == "conv-stem":  # 3x3 conv to dim/2 channels at full resolution, then the patch conv
        patch = cfg.image_size**2 * cfg.channels * 9 * (d // 2) + cfg.num_patches * (d // 2) * cfg.patch_size**2 * d
    if cfg.patch_embed == "conv-pool":  # 3x3 convs at full, half, ... resolution; the last one to dim channels
        patch, c, side = 0, cfg.channels, cfg.image_size
        for stage in range(cfg.conv_pool_stages):
            out = d if stage == cfg.conv_pool_stages - 1 else d // 2
            patch += side * side * c * 9 * out
            c, side = out, side // 2
    per_block = n * (3 * d * d + d * d + 2 * d * m) + 2 * n * n * d  # projections, MLP, QK^T and AV
    macs = patch + cfg.depth * per_block + d * cfg.num_classes
    return 2.0 * macs * (3.0 if training else 1.0)
