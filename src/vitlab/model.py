"""The Vision Transformer (Dosovitskiy et al. 2020), small enough to read in one sitting.

Structure follows timm's ``vision_transformer.py``: ``PatchEmbed`` -> class token
and learned positional embedding -> ``depth`` pre-norm ``Block``s (``Attention``
+ ``Mlp``) -> final LayerNorm -> linear head on the class token (or the mean of
the patch tokens). ``ViT.forward(x)`` returns logits, always;
``ViT.forward_with_attention(x)`` also returns every layer's attention weights.

What the model computes is its :class:`ViTConfig` (saved beside the weights); how it
computes it is its :class:`Kernels` (chosen per device, never saved).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .options import flag, from_mapping, is_whole, need, option, to_mapping
from .devices import fastest_attention
from .tokenizers import PATCH_EMBEDS, PatchEmbed

POOLS = ("cls", "mean")
# ArchConfig fields that shape only training (regularisation, init): the rest, with the LayerNorm
# epsilon, are the function a set of weights computes, which a run started from them takes.
TRAINING_ONLY = ("dropout", "attn_dropout", "drop_path", "patch_dropout", "pos_embed_std")
MLP_ACTS = ("gelu", "relu2")
ATTENTION_KERNELS = ("auto", "sdpa", "explicit")
MAX_IMAGE_SIZE = 512  # a ViT for small images; also bounds what a checkpoint manifest may ask to allocate
MAX_TOKENS = 4096




@dataclass
class ArchConfig:
    """The architecture a user chooses; each field is also a ``vitlab train`` flag.
    The defaults are the reference design: 4x4 patches, 12 blocks, 8 heads, width 256, MLP 512."""

    patch_size: int | None = option(None, "patch side length (default: 4, or 2 for images under 16 px)")
    depth: int = option(12, "number of transformer encoder blocks")
    heads: int = option(8, "attention heads per block (must divide --dim)")
    dim: int = option(256, "token embedding width")
    mlp_dim: int = option(512, "hidden width of each block's MLP")
    dropout: float = option(0.0, "dropout on embeddings, attention output and MLP")
    attn_dropout: float = option(0.0, "dropout on attention weights")
    drop_path: float = option(0.0, "stochastic depth: drop rate of the last block's residual branches (linearly less for earlier blocks)")
    layer_scale: float = option(0.0, "LayerScale (CaiT) initial value on each residual branch (0: off; 1e-4 is usual)")
    patch_dropout: float = option(0.0, "PatchDropout (Liu et al. 2022): while training, each image keeps a random subset of its patch tokens, this fraction dropped (less work per step; all tokens at evaluation; 0: off)")
    pos_embed_std: float = option(0.02, "standard deviation of the learned positional embedding at init: 0.02 as in ViT and timm; 1 as in vit-pytorch, which a 12-block ViT on MNIST learns from several times faster")
    pool: str = option("cls", "what feeds the head: 'cls' (class token) or 'mean' (mean of patch tokens)", choices=POOLS)
    patch_embed: str = option("conv", "tokenizer: " + ", ".join(c.about for c in PatchEmbed.registry.values() if c.about)
                              .replace(", 'conv-pool'", " or 'conv-pool'"), choices=PATCH_EMBEDS)
    lsa: bool = option(False, "locality self-attention (Lee et al. 2021): learnable temperature, tokens do not attend to themselves")
    qk_norm: bool = option(False, "QK-norm: a LayerNorm on each head's queries and keys before their product (ViT-22B; timm's qk_norm): attention logits that cannot grow without bound")
    mlp_act: str = option("gelu", "MLP activation: 'gelu' (ViT), or 'relu2', the squared ReLU (So et al. 2021, Primer; modded-nanogpt)", choices=MLP_ACTS)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad architecture value."""
        for name, top in (("depth", 64), ("heads", 64), ("dim", 4096), ("mlp_dim", 16384)):
            v = getattr(self, name)
            need(is_whole(v) and 1 <= v <= top,
                 f"{flag(name)} must be an integer from 1 to {top}, got {v!r}")
        p = self.patch_size
        need(p is None or (is_whole(p) and 1 <= p <= 64), f"--patch-size must be an integer from 1 to 64, got {p!r}")
        need(self.dim % self.heads == 0, f"--heads {self.heads} does not divide --dim {self.dim}; dim must be a multiple of heads")
        for name in ("dropout", "attn_dropout", "drop_path", "patch_dropout"):
            need(0.0 <= getattr(self, name) < 1.0, f"{flag(name)} must be in [0, 1), got {getattr(self, name)}")
        need(0.0 <= self.layer_scale <= 10.0, f"--layer-scale must be in [0, 10] (0 disables), got {self.layer_scale}")
        need(0.0 < self.pos_embed_std <= 10.0, f"--pos-embed-std must be in (0, 10], got {self.pos_embed_std}")
        need(self.pool in POOLS, f"--pool must be 'cls' or 'mean', got {self.pool!r}")
        need(self.patch_embed in PATCH_EMBEDS, f"--patch-embed must be one of {', '.join(PATCH_EMBEDS)}, got {self.patch_embed!r}")
        need(isinstance(self.lsa, bool), f"--lsa must be true or false, got {self.lsa!r}")
        need(isinstance(self.qk_norm, bool), f"--qk-norm must be true or false, got {self.qk_norm!r}")
        need(self.mlp_act in MLP_ACTS, f"--mlp-act must be one of {', '.join(MLP_ACTS)}, got {self.mlp_act!r}")
        refused = PatchEmbed.registry[self.patch_embed].refuses(p) if p is not None else None
        need(refused is None, f"--patch-embed {self.patch_embed} {refused}")


def default_patch_size(image_size: int) -> int:
    return 4 if image_size >= 16 else 2


def check_patch_fits(image_size: int, patch_size: int, what: str | None = None) -> None:
    """The patch grid must tile the image exactly, into at most MAX_TOKENS patches.
    ``what``: how the message names the image size (default "--image-size N")."""
    what = what or f"--image-size {image_size}"
    if image_size % patch_size:
        raise ConfigError(f"--patch-size {patch_size} does not divide {what}; choose one of "
                          f"{[p for p in range(1, min(image_size, 64) + 1) if image_size % p == 0]}")
    if (image_size // patch_size) ** 2 > MAX_TOKENS:
        raise ConfigError(f"--patch-size {patch_size} cuts {what} into {(image_size // patch_size) ** 2:,} "
                          f"patches, over the limit of {MAX_TOKENS:,}; use larger patches")


@dataclass
class ViTConfig(ArchConfig):
    """Everything needed to rebuild a ViT: the architecture plus what the data decides.
    Stored as JSON beside its weights. ``patch_size`` None becomes the default for the image size."""

    image_size: int = 32
    channels: int = 3
    num_classes: int = 10
    # LayerNorm epsilon: 1e-6 as in the original JAX ViT and timm (vitlab 0.1 used torch's 1e-5;
    # its checkpoints load with that value, so they compute what they computed).
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.patch_size is None and isinstance(self.image_size, int):
            self.patch_size = default_patch_size(self.image_size)
        self.validate()

    def validate(self) -> None:
        super().validate()
        for name, lo, hi in (("image_size", 1, MAX_IMAGE_SIZE), ("channels", 1, 4), ("num_classes", 2, 100_000)):
            v = getattr(self, name)
            if not (is_whole(v) and lo <= v <= hi):
                raise ConfigError(f"{name.replace('_', ' ')} must be an integer from {lo} to {hi:,}, got {v!r}"
                                  + (" (a classifier needs at least 2 classes)" if name == "num_classes" else ""))
        check_patch_fits(self.image_size, self.patch_size, f"image size {self.image_size}")
        if not (isinstance(self.norm_eps, float) and 0 < self.norm_eps <= 1e-2):
            raise ConfigError(f"norm eps must be a number in (0, 0.01], got {self.norm_eps!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (1 if self.pool == "cls" else 0)

    @property
    def grid(self) -> int:
        """Patches per side: the token grid that maps back onto the image."""
        return self.image_size // self.patch_size

    @property
    def conv_pool_stages(self) -> int:
        """Conv + max-pool stages of the conv-pool tokenizer: each halves the image, log2(patch)."""
        return self.patch_size.bit_length() - 1

    def to_dict(self) -> dict:
        return to_mapping(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> "ViTConfig":
        # vitlab 0.1 checkpoints saved the attention kernel (no longer part of the architecture)
        # and no LayerNorm epsilon (theirs was torch's default, 1e-5).
        if isinstance(d, dict) and "norm_eps" not in d:
            d = {**d, "norm_eps": 1e-5}
        return from_mapping(cls, d, source, ignore=("attention",))


@dataclass(frozen=True)
class Kernels:
    """How the model computes, not what: the same function either way, so never saved with
    the weights. Fixed when a model is built (``ViT.with_kernels`` gives a copy that computes
    another way); every copy of a model (the EMA copy included) computes as it does.

    ``attention``: "sdpa" (``F.scaled_dot_product_attention``), "explicit" (softmax(q k^T) v
    as matrix products), or "auto": a rule of thumb applied to the device and autocast dtype
    of each call (``devices.fastest_attention``: explicit on CPU under bf16, where SDPA falls
    back to a path 2.5x slower, else SDPA) for models built from Python; vitlab's own commands
    time the candidates instead (``vitlab.autotune``) and build with the winner.
    ``cls_only_last_block``: with a class token, the head reads only
    that token, so the last block computes only its output: the same logits for an eighth
    fewer FLOPs at depth 6 (a 19% faster training step on the 2-core CPU).
    ``channels_last``: the conv-pool tokenizer keeps its feature maps in NHWC.
    ``vitlab.autotune`` picks these by timing them on the machine at hand."""

    attention: str = "auto"
    cls_only_last_block: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"--attention must be one of {', '.join(ATTENTION_KERNELS)}, got {self.attention!r}")


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, cfg: ViTConfig, kernels: Kernels):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.dim // cfg.heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.attn_dropout = cfg.attn_dropout
        self.proj_drop = nn.Dropout(cfg.dropout)
        self.kernels = kernels
        # LSA: a learnable temperature (stored as its log) replaces the fixed scale.
        self.log_temperature = nn.Parameter(torch.tensor(math.log(self.scale))) if cfg.lsa else None
        self.q_norm = nn.LayerNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None  # timm's names
        self.k_norm = nn.LayerNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def _split_heads(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, N, parts * dim) projections -> ``parts`` tensors of (B, heads, N, head_dim)."""
        b, n, width = t.shape
        parts = width // (self.heads * self.head_dim)
        return t.reshape(b, n, parts, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _qkv(self, x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries of the first ``m`` tokens; keys and values of all of them (QK-norm applied)."""
        d = x.shape[-1]
        if m == x.shape[1]:
            q, k, v = self._split_heads(self.qkv(x))
        else:  # the same projection, with the query rows applied to the query tokens only
            w_q, w_kv = self.qkv.weight.split([d, 2 * d])
            b_q, b_kv = self.qkv.bias.split([d, 2 * d])
            (q,) = self._split_heads(F.linear(x[:, :m], w_q, b_q))
            k, v = self._split_heads(F.linear(x, w_kv, b_kv))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _scale(self) -> torch.Tensor | float:
        return self.log_temperature.exp() if self.log_temperature is not None else self.scale

    def _allowed(self, m: int, n: int, device: torch.device) -> torch.Tensor | None:
        """LSA masks the diagonal: a token may not attend to itself (True = may attend)."""
        return ~torch.eye(m, n, dtype=torch.bool, device=device) if self.log_temperature is not None else None

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        b, _, m, _ = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, m, self.heads * self.head_dim)))

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale) over the keys (LSA: with the diagonal masked): (B, heads, M, N)."""
        attn = (q * self._scale()) @ k.transpose(-2, -1)
        allowed = self._allowed(q.shape[2], k.shape[2], q.device)
        if allowed is not None:
            attn = attn.masked_fill(~allowed, float("-inf"))
        return attn.softmax(dim=-1)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """``queries``: only the first ``queries`` tokens attend (all tokens still serve as
        keys and values); the output then has that many tokens."""
        n = x.shape[1]
        q, k, v = self._qkv(x, n if queries is None else queries)
        p_drop = self.attn_dropout if self.training else 0.0
        kernel = self.kernels.attention
        if kernel == "auto":
            device = x.device.type
            kernel = fastest_attention(x.device, torch.get_autocast_dtype(device)
                                       if torch.is_autocast_enabled(device) else None)
        if kernel == "sdpa":
            allowed = self._allowed(q.shape[2], n, x.device)
            if allowed is None:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop)
            else:  # the learnable temperature goes into q, so SDPA's own scale is 1
                out = F.scaled_dot_product_attention(q * self._scale(), k, v, attn_mask=allowed, dropout_p=p_drop,
                                                     scale=1.0)
        else:
            out = F.dropout(self.attention_weights(q, k), p_drop, self.training) @ v
        return self._merge(out)

    def forward_with_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output for every token and the attention weights (B, heads, N, N), explicitly
        computed (never a fused kernel), so that they can be read and differentiated."""
        q, k, v = self._qkv(x, x.shape[1])
        attn = self.attention_weights(q, k)
        p_drop = self.attn_dropout if self.training else 0.0
        return self._merge(F.dropout(attn, p_drop, self.training) @ v), attn


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.act = F.gelu if cfg.mlp_act == "gelu" else relu_squared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


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

    def __init__(self, cfg: ViTConfig, kernels: Kernels, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, kernels)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)
        self.ls1 = LayerScale(cfg.dim, cfg.layer_scale) if cfg.layer_scale > 0 else nn.Identity()
        self.ls2 = LayerScale(cfg.dim, cfg.layer_scale) if cfg.layer_scale > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def _residuals(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(a))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """``queries``: compute the outputs of the first ``queries`` tokens only."""
        a = self.attn(self.norm1(x), queries)
        return self._residuals(x if queries is None else x[:, :queries], a)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, attn = self.attn.forward_with_weights(self.norm1(x))
        return self._residuals(x, a), attn


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig, kernels: Kernels | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.kernels = kernels or Kernels()
        self.patch_embed = PatchEmbed.build(cfg, self.kernels)
        # The class token exists only when it feeds the head.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([Block(cfg, self.kernels, rate) for rate in rates])
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.reset_parameters()

    def with_kernels(self, kernels: Kernels) -> "ViT":
        """A copy of this model (same weights, device and mode) that computes as ``kernels`` say;
        built on the meta device, so no random number is drawn."""
        with torch.device("meta"):
            other = ViT(self.cfg, kernels)
        device = next(self.parameters()).device
        other = other.to_empty(device=device).train(self.training)
        other.load_state_dict(self.state_dict())
        return other

    def reset_parameters(self) -> None:
        """ViT/timm init: truncated normal (std 0.02) for linear layers and
        embeddings, zero biases, and a zero head so every class starts equal. The
        positional embedding's std is a choice (--pos-embed-std): at 0.02 every
        background patch of an MNIST digit starts as the same token, and a deep ViT
        spends its first epoch learning where its patches are."""
        nn.init.trunc_normal_(self.pos_embed, std=self.cfg.pos_embed_std)
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
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, T, dim): patches, the class token first, positions added.
        Images smaller than the model's (training with --progressive-size) give a smaller grid,
        whose positions are the learned ones resampled to it (FlexiViT; the gradient flows back)."""
        x = self.patch_embed(x)
        pos = self.pos_embed
        if x.shape[1] != self.cfg.num_patches:
            pos = resample_positions(pos, self.num_prefix_tokens, self.cfg.grid, math.isqrt(x.shape[1]))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pos_drop(x + pos.to(x.dtype))
        return self.drop_patches(x) if self.training and self.cfg.patch_dropout > 0 else x

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (timm's name): the class token, if any."""
        return 0 if self.cls_token is None else 1

    def drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's tokens with a random ``kept_patches`` of its patch tokens, in random order
        (order carries nothing: the positions are added already); the class token kept. Drawn
        on the device from its global stream, like dropout, so a resumed run draws the same."""
        prefix = self.num_prefix_tokens
        keep = kept_patches(x.shape[1] - prefix, self.cfg.patch_dropout)
        order = torch.rand(x.shape[0], x.shape[1] - prefix, device=x.device).argsort(dim=1)[:, :keep]
        patches = x[:, prefix:].gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :prefix], patches], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised output tokens. With the class-token shortcut (``kernels.cls_only_last_block``,
        pool cls) the last block computes the class token only, so this is (B, 1, dim)."""
        x = self.embed(x)
        last = len(self.blocks) - 1
        shortcut = self.kernels.cls_only_last_block and self.cls_token is not None
        for i, block in enumerate(self.blocks):
            x = block(x, 1 if shortcut and i == last else None)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the output tokens (class token or mean of the patches) and classify."""
        x = x[:, 0] if self.cfg.pool == "cls" else x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and a list with one (B, heads, T, T) attention map per layer, every token
        computed in every block with the explicit kernel: the same logits as ``forward``."""
        x = self.embed(x)
        attentions = []
        for block in self.blocks:
            x, attn = block.forward_with_attention(x)
            attentions.append(attn)
        return self.forward_head(self.norm(x)), attentions

    def param_groups(self, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
        """Optimizer groups: decay matrices, not biases, norms or embeddings (nanoGPT's rule); with
        ``layer_decay`` < 1, one pair of groups per depth, each with its ``lr_scale`` (BEiT's
        layer-wise decay: the head and final norm at 1, block i at decay^(depth - i), the
        tokenizer and embeddings at decay^(depth + 1)). Frozen parameters are left out."""
        groups: dict[tuple[int, bool], list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            decays = p.ndim >= 2 and "pos_embed" not in name and "cls_token" not in name
            layer = self.layer_of(name) if layer_decay < 1 else 0
            groups.setdefault((layer, decays), []).append(p)
        top = self.cfg.depth + 1
        return [{"params": params, "weight_decay": weight_decay if decays else 0.0,
                 **({"lr_scale": layer_decay ** (top - layer)} if layer_decay < 1 else {})}
                for (layer, decays), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]

    def layer_of(self, name: str) -> int:
        """A parameter's depth: 0 the tokenizer and embeddings, i + 1 block i, depth + 1 the rest."""
        if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.cfg.depth + 1

    def freeze(self, blocks: int) -> None:
        """Keep the tokenizer, class token, positions and the first ``blocks`` blocks fixed."""
        for name, p in self.named_parameters():
            if blocks and self.layer_of(name) <= blocks:
                p.requires_grad_(False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def kept_patches(patches: int, patch_dropout: float) -> int:
    """Patch tokens a training image of ``patches`` keeps under --patch-dropout (at least one)."""
    return max(1, round(patches * (1.0 - patch_dropout)))


def resample_positions(pos: torch.Tensor, prefix: int, old: int, new: int) -> torch.Tensor:
    """The position embedding (1, prefix + old^2, D) of a new grid: the grid's embeddings
    interpolated bicubically (antialiased when shrinking), the class token's kept."""
    head, grid = pos[:, :prefix], pos[:, prefix:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=new < old, align_corners=False)
    return torch.cat([head, grid.permute(0, 2, 3, 1).reshape(1, new * new, d).to(pos.dtype)], dim=1)


def flops_per_image(cfg: ViTConfig, training: bool = True, cls_only_last_block: bool = False) -> float:
    """Matmul FLOPs for one image (2 per multiply-add), x3 for a training step
    (forward + backward), as in nanoGPT's MFU estimate. Elementwise work is ignored.
    ``cls_only_last_block``: the work done with the class-token shortcut (pool cls), which
    skips the patch tokens' query projection, attention, output projection and MLP in the
    last block; without it, the architecture's FLOPs, as peers compute them. A training step
    with --patch-dropout computes the kept tokens only."""
    n = cfg.num_tokens - (cfg.num_patches - kept_patches(cfg.num_patches, cfg.patch_dropout) if training else 0)
    d, m = cfg.dim, cfg.mlp_dim
    patch = PatchEmbed.registry[cfg.patch_embed].macs(cfg)
    per_block = n * (3 * d * d + d * d + 2 * d * m) + 2 * n * n * d  # projections, MLP, QK^T and AV
    macs = patch + cfg.depth * per_block + d * cfg.num_classes
    if cls_only_last_block and cfg.pool == "cls":
        macs -= (n - 1) * (d * d + 2 * n * d + d * d + 2 * d * m)
    return 2.0 * macs * (3.0 if training else 1.0)
