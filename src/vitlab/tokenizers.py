"""Tokenizers: how a ViT cuts an image into tokens (``--patch-embed``). Each is a
``PatchEmbed`` subclass, registered by its name, that says once what it is, which patch
sizes it takes, what it costs and whether timm's and transformers' ViTs can express it."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class TokenizerConfig(Protocol):
    """What a tokenizer reads of the model's config (model.ViTConfig, which lists the tokenizers)."""

    image_size: int
    channels: int
    patch_size: int
    dim: int
    norm_eps: float

    @property
    def num_patches(self) -> int: ...

    @property
    def conv_pool_stages(self) -> int: ...


class TokenizerKernels(Protocol):
    """What a tokenizer reads of how the model computes (model.Kernels)."""

    channels_last: bool


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
    """Switch feature maps to NHWC when ``kernels.channels_last`` says so. Measured on the
    2-core CPU (batch 256, 64 channels at 28x28): max-pooling takes 40 ms in NCHW and 3.5 ms
    in NHWC, and the conv-pool tokenizer's forward 89 ms against 51 ms."""

    def __init__(self, kernels: TokenizerKernels):
        super().__init__()
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.kernels.channels_last else x


class PatchEmbed(nn.Module):
    """Cut the image into tokens and project each to ``dim``: (B, C, H, W) -> (B, N, dim),
    tokens in row-major order of the ``grid`` x ``grid`` patch grid. Each tokenizer is a
    subclass, registered by its ``name`` (the --patch-embed value): what it is, which patch
    sizes it takes, what it costs and whether other libraries can express it are said once,
    on the class."""

    name = ""
    about = ""  # for --patch-embed's help
    plain = False  # the plain patch projection timm's and transformers' ViTs have
    layouts = False  # its feature maps may be NHWC or NCHW (autotune times both)
    registry: dict[str, type["PatchEmbed"]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        PatchEmbed.registry[cls.name] = cls

    @staticmethod
    def build(cfg: TokenizerConfig, kernels: TokenizerKernels) -> "PatchEmbed":
        return PatchEmbed.registry[cfg.patch_embed](cfg, kernels)

    @classmethod
    def refuses(cls, patch: int) -> str | None:
        """Why this tokenizer cannot cut patches of side ``patch`` (None: it can)."""
        return None

    @classmethod
    def macs(cls, cfg: TokenizerConfig) -> int:
        """Multiply-adds of one image's tokenization."""
        return cfg.num_patches * cfg.channels * cfg.patch_size**2 * cfg.dim


class ConvPatches(PatchEmbed):
    name, plain = "conv", True
    about = "'conv' or 'linear' (the plain patch projection)"

    def __init__(self, cfg: TokenizerConfig, kernels: TokenizerKernels):
        super().__init__()
        self.proj = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LinearPatches(PatchEmbed):
    """The same linear map as ``conv`` (a strided convolution is a matmul over flattened
    patches); both are offered because their speed differs."""

    name, plain = "linear", True

    def __init__(self, cfg: TokenizerConfig, kernels: TokenizerKernels):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Linear(cfg.channels * cfg.patch_size**2, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x, self.patch_size))


class ShiftedPatches(PatchEmbed):
    """Shifted patch tokenization: four half-patch diagonal shifts of the image as channels,
    then LayerNorm and a linear projection."""

    name = "spt"
    about = "'spt' (shifted patch tokenization, Lee et al. 2021)"

    def __init__(self, cfg: TokenizerConfig, kernels: TokenizerKernels):
        super().__init__()
        self.patch_size = cfg.patch_size
        patch_dim = 5 * cfg.channels * cfg.patch_size**2
        self.norm = nn.LayerNorm(patch_dim, eps=cfg.norm_eps)
        self.proj = nn.Linear(patch_dim, cfg.dim)

    @classmethod
    def refuses(cls, patch: int) -> str | None:
        return None if patch % 2 == 0 else f"shifts by half a patch: --patch-size must be even, got {patch}"

    @classmethod
    def macs(cls, cfg: TokenizerConfig) -> int:
        return 5 * super().macs(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        return self.proj(self.norm(patchify(diagonal_shifts(x, p // 2), p)))


class ConvStem(PatchEmbed):
    name = "conv-stem"
    about = "'conv-stem' (a 3x3 conv first: overlapping patches)"

    def __init__(self, cfg: TokenizerConfig, kernels: TokenizerKernels):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(cfg.channels, cfg.dim // 2, 3, padding=1), nn.GELU())
        self.proj = nn.Conv2d(cfg.dim // 2, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    @classmethod
    def macs(cls, cfg: TokenizerConfig) -> int:  # 3x3 conv to dim/2 channels at full resolution, then the patch conv
        d = cfg.dim
        return cfg.image_size**2 * cfg.channels * 9 * (d // 2) + cfg.num_patches * (d // 2) * cfg.patch_size**2 * d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)


class ConvPool(PatchEmbed):
    """The CCT tokenizer: log2(patch) stages of 3x3 conv + ReLU + 3x3/2 max-pool; the last
    stage's conv is ``proj``, the earlier stages are the stem."""

    name, layouts = "conv-pool", True
    about = ("'conv-pool' (the CCT tokenizer, Hassani et al. 2021: log2(patch) stages of 3x3 conv + ReLU + "
             "3x3/2 max-pool)")

    def __init__(self, cfg: TokenizerConfig, kernels: TokenizerKernels):
        super().__init__()
        stages, c = [], cfg.channels
        for _ in range(cfg.conv_pool_stages - 1):
            stages += [nn.Conv2d(c, cfg.dim // 2, 3, padding=1), ChannelsLast(kernels), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
            c = cfg.dim // 2
        self.stem = nn.Sequential(*stages)
        self.proj = nn.Conv2d(c, cfg.dim, 3, padding=1)
        self.pool = nn.Sequential(ChannelsLast(kernels), nn.ReLU(), nn.MaxPool2d(3, 2, 1))

    @classmethod
    def refuses(cls, patch: int) -> str | None:
        return None if patch >= 2 and patch & (patch - 1) == 0 else \
            f"halves the image per stage: --patch-size must be 2, 4, 8 ..., got {patch}"

    @classmethod
    def macs(cls, cfg: TokenizerConfig) -> int:  # 3x3 convs at full, half, ... resolution; the last one to dim channels
        macs, c, side = 0, cfg.channels, cfg.image_size
        for stage in range(cfg.conv_pool_stages):
            out = cfg.dim if stage == cfg.conv_pool_stages - 1 else cfg.dim // 2
            macs += side * side * c * 9 * out
            c, side = out, side // 2
        return macs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.proj(self.stem(x))).flatten(2).transpose(1, 2)


PATCH_EMBEDS = tuple(PatchEmbed.registry)
