"""How a new run's blocks start (``--init``), beyond the model's own ViT/timm initialisation.

- ``mimetic`` (Trockman & Kolter 2023, "Mimetic Initialization of Self-Attention Layers"):
  each head's W_q W_k^T starts near alpha1 Z + beta1 I (tokens attend to similar tokens, as
  in trained ViTs) and each block's W_v W_proj near alpha2 Z - beta2 I, with Z random; reported
  to help small ViTs trained from scratch on small datasets the most.
- ``zero-residual``: each block's attention output projection and second MLP layer start at
  zero, so every block starts as the identity and the first steps train a shallow network
  (Fixup; modded-nanogpt's zero-initialised projections).

Only the weights of a new run: a resumed run and one started from other weights keep theirs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

INITS = ("trunc-normal", "mimetic", "zero-residual")
MIMETIC_QK = (0.7, 0.7)  # (alpha1, beta1): the paper's values for ViT-Tiny on CIFAR-10
MIMETIC_VO = (0.4, 0.4)  # (alpha2, beta2)


def mimetic_factors(dim: int, rank: int, alpha: float, beta: float, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), each (rank, dim), with A^T B the best rank-``rank`` approximation of
    alpha Z + beta I, Z ~ N(0, 1/dim) (a negative ``beta`` aims at -I)."""
    z = torch.randn(dim, dim, generator=generator) / math.sqrt(dim)
    u, s, vh = torch.linalg.svd(alpha * z + beta * torch.eye(dim))
    root = s[:rank].sqrt()
    return root[:, None] * u[:, :rank].T, root[:, None] * vh[:rank]


@torch.no_grad()
def apply_init(model: nn.Module, name: str, generator: torch.Generator | None = None) -> None:
    """Re-initialise ``model``'s blocks as ``name`` says ('trunc-normal': leave them)."""
    if name not in INITS:
        raise ValueError(f"unknown init {name!r}: one of {', '.join(INITS)}")
    for block in model.blocks:
        attn = block.attn
        if name == "zero-residual":
            for linear in (attn.proj, block.mlp.fc2):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
        elif name == "mimetic":
            dim, head = attn.proj.weight.shape[0], attn.head_dim
            w_q, w_k, w_v = attn.qkv.weight.view(3, dim, dim)  # rows: q, k, v; in each, head h's rows h*head...
            for h in range(attn.heads):
                a, b = mimetic_factors(dim, head, *MIMETIC_QK, generator)
                w_q[h * head:(h + 1) * head] = a
                w_k[h * head:(h + 1) * head] = b
            alpha, beta = MIMETIC_VO
            a, b = mimetic_factors(dim, dim, alpha, -beta, generator)
            w_v.copy_(a)  # v = x W_v^T, out = v W_proj^T: W_v^T W_proj^T = A^T B
            attn.proj.weight.copy_(b.T)
