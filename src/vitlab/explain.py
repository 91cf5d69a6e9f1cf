"""Where a ViT looks: attention maps and relevance maps for a batch, and how faithful they are.

Every method is a pure function of a model and a batch of normalised images (B, C, H, W)
that returns (B, H, W) maps on the model's device, computed for the whole batch at once
(no per-image Python loop), in eval mode, from ``ViT.forward_with_attention`` (the
explicit attention kernel, every token of every block). None of them changes what the
model predicts: the logits they see are the logits of ``model(x)``.

- :func:`raw_attention` -- the last layer's attention of the class token over the
  patches, per head or averaged over heads (the maps DINO shows).
- :func:`rollout` -- attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in
  Transformers", ACL 2020): per layer, fuse the heads (mean, max or min), optionally
  zero the lowest fraction of the weights (never the class token's own entry), add the
  identity for the residual path, renormalise the rows, and multiply through the layers.
- :func:`gradient_attention` -- gradient-weighted attention (Chefer, Gur & Wolf,
  "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
  Transformers", ICCV 2021): R = I; for each layer R += mean_heads((dA * A)^+) R, with dA
  the gradient of the target class's logit with respect to that layer's attention.

The class token's row over the patches is the map; a model without a class token
(``pool: mean``) averages the rows of all tokens, as its head averages the tokens. The
token grid (image/patch per side, for every tokenizer) is stretched onto the image.

:func:`perturbation_curves` measures faithfulness (Chefer et al.'s perturbation test at
patch granularity, and Petsiuk et al.'s deletion/insertion, BMVC 2018).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import ViT

METHODS = ("gradient", "rollout", "attention")
FUSIONS = ("mean", "max", "min")


def _attentions(model: ViT, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.eval()
    with torch.no_grad():
        return model.forward_with_attention(x)


def _fuse(attn: torch.Tensor, fusion: str) -> torch.Tensor:
    if fusion == "mean":
        return attn.mean(1)
    if fusion == "max":
        return attn.amax(1)
    if fusion == "min":
        return attn.amin(1)
    raise ValueError(f"head fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")


def _token_relevance(model: ViT, rows: torch.Tensor) -> torch.Tensor:
    """(B, T, T) token-to-token relevance -> (B, patches): the class token's row over the
    patches, or (no class token) the mean row over all tokens."""
    if model.cls_token is not None:
        return rows[:, 0, 1:]
    return rows.mean(1)


def to_image(model: ViT, relevance: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """(B, patches) relevance on the token grid -> (B, size, size), stretched bilinearly."""
    g = model.cfg.grid
    size = size or model.cfg.image_size
    grid = relevance.reshape(-1, 1, g, g).float()
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map (the last two dimensions) scaled to [0, 1]; a constant map becomes zeros."""
    flat = maps.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(maps)


def raw_attention_tokens(model: ViT, x: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """Last layer's attention over the patches: (B, patches), or (B, heads, patches)."""
    _, attns = _attentions(model, x)
    last = attns[-1]  # (B, heads, T, T)
    if model.cls_token is not None:
        rows = last[:, :, 0, 1:]
    else:
        rows = last.mean(2)
    return rows if per_head else rows.mean(1)


def raw_attention(model: ViT, x: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """The last layer's class-token attention over the patches: (B, H, W), or (B, heads, H, W)."""
    rel = raw_attention_tokens(model, x, per_head)
    if per_head:
        b, h, n = rel.shape
        return to_image(model, rel.reshape(b * h, n)).reshape(b, h, model.cfg.image_size, model.cfg.image_size)
    return to_image(model, rel)


def _discard(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest ``ratio`` of each matrix's entries, never entry (0, 0) (the class token
    attending to itself), as in the reference rollout code; batched with one topk."""
    if ratio <= 0:
        return fused
    b, t, _ = fused.shape
    flat = fused.reshape(b, t * t).clone()
    k = int(t * t * ratio)
    if k == 0:
        return fused
    ranked = flat.clone()
    ranked[:, 0] = float("inf")  # never selected
    idx = ranked.topk(k, dim=1, largest=False).indices
    flat.scatter_(1, idx, 0.0)
    return flat.view(b, t, t)


def rollout_layers(attns: list[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0) -> list[torch.Tensor]:
    """The rollout after each layer: a list of (B, T, T) joint attentions."""
    out = []
    joint = None
    for attn in attns:
        a = _discard(_fuse(attn.float(), head_fusion), discard_ratio)
        a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
        out.append(joint)
    return out


def rollout_tokens(model: ViT, x: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
                   per_layer: bool = False) -> torch.Tensor:
    """Attention rollout on the token grid: (B, patches), or (B, layers, patches)."""
    if not 0 <= discard_ratio < 1:
        raise ValueError(f"discard ratio must be in [0, 1), got {discard_ratio}")
    _, attns = _attentions(model, x)
    joints = rollout_layers(attns, head_fusion, discard_ratio)
    if per_layer:
        return torch.stack([_token_relevance(model, j) for j in joints], 1)
    return _token_relevance(model, joints[-1])


def rollout(model: ViT, x: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): (B, H, W)."""
    return to_image(model, rollout_tokens(model, x, head_fusion, discard_ratio))


def gradient_tokens(model: ViT, x: torch.Tensor, target: torch.Tensor | int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chefer et al.'s gradient-weighted relevance on the token grid, (B, patches), and the
    logits. ``target``: the class to explain per image (default: the predicted one)."""
    model.eval()
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)  # a graph even when the weights are frozen (EMA)
        logits, attns = model.forward_with_attention(x)
        if target is None:
            target = logits.argmax(1)
        elif isinstance(target, int):
            target = torch.full((len(x),), target, device=logits.device, dtype=torch.long)
        chosen = logits.gather(1, target.to(logits.device).view(-1, 1)).sum()  # images do not interact: one backward
        grads = torch.autograd.grad(chosen, attns)
    with torch.no_grad():
        t = attns[0].shape[-1]
        relevance = torch.eye(t, device=x.device).expand(len(x), t, t).clone()
        for attn, grad in zip(attns, grads):
            cam = (grad * attn).clamp_min(0).mean(1).float()
            relevance = relevance + cam @ relevance
    return _token_relevance(model, relevance), logits.detach()


def gradient_attention(model: ViT, x: torch.Tensor, target: torch.Tensor | int | None = None) -> torch.Tensor:
    """Gradient-weighted attention (Chefer, Gur & Wolf 2021): (B, H, W)."""
    return to_image(model, gradient_tokens(model, x, target)[0])


def tokens(model: ViT, x: torch.Tensor, method: str = "gradient", head_fusion: str = "mean",
           discard_ratio: float = 0.0, target: torch.Tensor | int | None = None) -> torch.Tensor:
    """Any method's relevance on the token grid, (B, patches)."""
    if method == "gradient":
        return gradient_tokens(model, x, target)[0]
    if method == "rollout":
        return rollout_tokens(model, x, head_fusion, discard_ratio)
    if method == "attention":
        return raw_attention_tokens(model, x)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


# ------------------------------------------------------------- faithfulness

@dataclass
class Curves:
    """Perturbation curves over the fractions 0, 0.1, ..., 1 of the patches, averaged over images."""

    fractions: list[float]
    positive: list[float]  # accuracy as the most relevant patches are removed first (lower AUC: more faithful)
    negative: list[float]  # accuracy as the least relevant go first (higher AUC: more faithful)
    deletion: list[float]  # probability of the predicted class, most relevant removed first (lower is better)
    insertion: list[float]  # the same, inserting the most relevant first into a blank image (higher is better)

    @staticmethod
    def auc(ys: list[float]) -> float:
        """Area under a curve sampled at equal steps from 0 to 1 (trapezoids)."""
        n = len(ys) - 1
        return sum((ys[i] + ys[i + 1]) / 2 for i in range(n)) / n

    def aucs(self) -> dict[str, float]:
        return {k: self.auc(getattr(self, k)) for k in ("positive", "negative", "deletion", "insertion")}


def patch_mask(model: ViT, keep: torch.Tensor) -> torch.Tensor:
    """(B, patches) booleans -> (B, 1, H, W) pixel mask of the kept patches."""
    g, p = model.cfg.grid, model.cfg.patch_size
    return keep.view(-1, 1, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)


@torch.no_grad()
def perturbation_curves(model: ViT, x: torch.Tensor, labels: torch.Tensor, relevance: torch.Tensor,
                        steps: int = 10, fill: float = 0.0) -> Curves:
    """Remove patches (replace their pixels by ``fill``: 0 is the dataset mean in normalised
    units) in order of decreasing relevance, then of increasing relevance, in ``steps`` equal
    steps, recording accuracy and the probability of the class predicted on the intact
    image; insertion adds the most relevant patches first to an all-``fill`` image."""
    model.eval()
    b, n = relevance.shape
    labels = labels.to(x.device)
    predicted = model(x).argmax(1)
    order_desc = relevance.argsort(1, descending=True)
    ranks_desc = torch.empty_like(order_desc).scatter_(1, order_desc, torch.arange(n, device=x.device).expand(b, n))
    fractions, pos, neg, dele, ins = [], [], [], [], []
    for i in range(steps + 1):
        k = round(n * i / steps)
        fractions.append(i / steps)
        removed_top = ranks_desc < k  # the k most relevant patches
        removed_bottom = ranks_desc >= n - k  # the k least relevant
        for removed, acc_list, prob_list in ((removed_top, pos, dele), (removed_bottom, neg, None)):
            xm = torch.where(patch_mask(model, removed), torch.full_like(x, fill), x)
            logits = model(xm).float()
            acc_list.append(float((logits.argmax(1) == labels).float().mean()))
            if prob_list is not None:
                prob_list.append(float(logits.softmax(1).gather(1, predicted.view(-1, 1)).mean()))
        xi = torch.where(patch_mask(model, removed_top), x, torch.full_like(x, fill))
        ins.append(float(model(xi).float().softmax(1).gather(1, predicted.view(-1, 1)).mean()))
    return Curves(fractions, pos, neg, dele, ins)


@torch.no_grad()
def deletion_scores(model: ViT, x: torch.Tensor, relevance: torch.Tensor, steps: int = 10, fill: float = 0.0
                    ) -> torch.Tensor:
    """Per image: the deletion AUC of its map (the predicted class's probability as its most
    relevant patches are removed first; lower: the map found what the decision rests on)."""
    model.eval()
    b, n = relevance.shape
    predicted = model(x).argmax(1)
    order = relevance.argsort(1, descending=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
    probs = []
    for i in range(steps + 1):
        xm = torch.where(patch_mask(model, ranks < round(n * i / steps)), torch.full_like(x, fill), x)
        probs.append(model(xm).float().softmax(1).gather(1, predicted.view(-1, 1))[:, 0])
    p = torch.stack(probs, 1)
    return ((p[:, 1:] + p[:, :-1]) / 2).mean(1)
