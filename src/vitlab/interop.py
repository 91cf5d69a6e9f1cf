"""vitlab models as timm and Hugging Face transformers models: the same function, other names.

vitlab's ViT has timm's structure and parameter names, so a timm
``VisionTransformer`` built with the matching arguments takes its weights unchanged;
transformers' ``ViTForImageClassification`` takes them renamed, with the fused QKV
projection split into query, key and value. Only what those classes can express
exports: the plain patch projection (``conv``, or ``linear``: the same map), no
locality self-attention, the GELU MLP, and for transformers a class token, no LayerScale
and no QK-norm.
"""

from __future__ import annotations

import re

import torch

from .errors import VitlabError
from .model import ViT, ViTConfig
from .tokenizers import PatchEmbed


class ExportError(VitlabError):
    """The model cannot be expressed in the requested format, or its export failed its check."""


def unsupported(cfg: ViTConfig, fmt: str) -> list[str]:
    """Why ``cfg`` cannot be exported as ``fmt`` ("timm" or "hf"): empty when it can."""
    reasons = []
    if not PatchEmbed.registry[cfg.patch_embed].plain:
        reasons.append(f"the {cfg.patch_embed} tokenizer (timm's and transformers' ViTs cut plain patches "
                       f"with one projection)")
    if cfg.lsa:
        reasons.append("locality self-attention (a learnable temperature and a masked diagonal)")
    if cfg.mlp_act != "gelu":
        reasons.append(f"the {cfg.mlp_act} MLP activation (timm's and transformers' ViTs use GELU)")
    if fmt == "hf":
        if cfg.qk_norm:
            reasons.append("QK-norm (transformers' ViT has none)")
        if cfg.pool != "cls":
            reasons.append("mean pooling (ViTForImageClassification classifies the class token)")
        if cfg.layer_scale > 0:
            reasons.append("LayerScale (transformers' ViT has none)")
    if fmt == "timm-folder" and cfg.norm_eps != 1e-6:
        reasons.append(f"LayerNorm epsilon {cfg.norm_eps:g} (a checkpoint of vitlab 0.1; timm's config.json can only "
                       f"name its LayerNorm, whose epsilon is 1e-6; vitlab.interop.to_timm() exports it in Python)")
    return reasons


def check_exportable(cfg: ViTConfig, fmt: str) -> None:
    reasons = unsupported(cfg, fmt)
    if reasons:
        name = {"hf": "Hugging Face transformers", "timm": "timm", "timm-folder": "timm"}[fmt]
        raise ExportError(f"this model cannot be exported to {name}: it uses {'; and '.join(reasons)}. "
                          f"ONNX (--format onnx) exports every vitlab architecture")


def _patch_weight(model: ViT) -> torch.Tensor:
    w = model.patch_embed.proj.weight.detach()
    c, p = model.cfg.channels, model.cfg.patch_size
    return w if w.ndim == 4 else w.reshape(model.cfg.dim, c, p, p)  # linear: the same map as a conv


# ------------------------------------------------------------------- timm

def timm_model_args(cfg: ViTConfig) -> dict:
    """``timm.models.vision_transformer.VisionTransformer`` arguments of the same function."""
    return dict(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.channels, num_classes=cfg.num_classes,
                embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.dim, qkv_bias=True,
                class_token=cfg.pool == "cls", global_pool="token" if cfg.pool == "cls" else "avg", fc_norm=False,
                init_values=cfg.layer_scale or None, no_embed_class=False, drop_rate=0.0, drop_path_rate=0.0,
                qk_norm=cfg.qk_norm)


def timm_state_dict(model: ViT) -> dict[str, torch.Tensor]:
    """vitlab's weights under timm's names (they are timm's names already)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["patch_embed.proj.weight"] = _patch_weight(model).clone()
    return sd


def to_timm(model: ViT) -> torch.nn.Module:
    """A timm ``VisionTransformer`` computing what ``model`` computes (eval mode, CPU)."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    check_exportable(model.cfg, "timm")
    args = timm_model_args(model.cfg)
    out = VisionTransformer(**args, norm_layer=partial(torch.nn.LayerNorm, eps=model.cfg.norm_eps))
    out.load_state_dict(timm_state_dict(model.cpu()))
    return out.eval()


# ----------------------------------------------------------- transformers

# PIL's "L" conversion, the one vitlab applies to colour files for a grey model.
LUMA = (0.299, 0.587, 0.114)


def hf_channels(cfg: ViTConfig) -> int:
    """transformers' pipeline converts every image to RGB, so a grey model is exported as one
    that takes three channels and weighs them as PIL's grey conversion does (the same map:
    for a grey image the three channels are equal and the weights sum to one)."""
    return 3 if cfg.channels == 1 else cfg.channels


def hf_config(cfg: ViTConfig, classes: list[str]):
    from transformers import ViTConfig as HFViTConfig

    return HFViTConfig(hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                       intermediate_size=cfg.mlp_dim, hidden_act="gelu", hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, layer_norm_eps=cfg.norm_eps, image_size=cfg.image_size,
                       patch_size=cfg.patch_size, num_channels=hf_channels(cfg), qkv_bias=True,
                       id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})


# Each vitlab tensor, and the names transformers has used for it (v5 first, then v4).
_HF_NAMES = {
    "cls_token": ["vit.embeddings.cls_token"],
    "pos_embed": ["vit.embeddings.position_embeddings"],
    "patch_embed.proj.weight": ["vit.embeddings.patch_embeddings.projection.weight"],
    "patch_embed.proj.bias": ["vit.embeddings.patch_embeddings.projection.bias"],
    "norm.weight": ["vit.layernorm.weight"],
    "norm.bias": ["vit.layernorm.bias"],
    "head.weight": ["classifier.weight"],
    "head.bias": ["classifier.bias"],
}
_HF_BLOCK_NAMES = {
    "norm1": ["vit.layers.{i}.layernorm_before", "vit.encoder.layer.{i}.layernorm_before"],
    "norm2": ["vit.layers.{i}.layernorm_after", "vit.encoder.layer.{i}.layernorm_after"],
    "q": ["vit.layers.{i}.attention.q_proj", "vit.encoder.layer.{i}.attention.attention.query"],
    "k": ["vit.layers.{i}.attention.k_proj", "vit.encoder.layer.{i}.attention.attention.key"],
    "v": ["vit.layers.{i}.attention.v_proj", "vit.encoder.layer.{i}.attention.attention.value"],
    "attn.proj": ["vit.layers.{i}.attention.o_proj", "vit.encoder.layer.{i}.attention.output.dense"],
    "mlp.fc1": ["vit.layers.{i}.mlp.fc1", "vit.encoder.layer.{i}.intermediate.dense"],
    "mlp.fc2": ["vit.layers.{i}.mlp.fc2", "vit.encoder.layer.{i}.output.dense"],
}


def hf_state_dict(model: ViT, hf_keys: set[str]) -> dict[str, torch.Tensor]:
    """vitlab's weights under the names of the transformers model whose keys are ``hf_keys``."""
    def name(candidates: list[str], **fmt) -> str:
        for c in candidates:
            if c.format(**fmt) in hf_keys:
                return c.format(**fmt)
        raise ExportError(f"this transformers version names its ViT weights differently ({candidates[0]!r} not "
                          f"found); vitlab knows transformers 4.x and 5.x")

    src = {k: v.detach().clone() for k, v in model.state_dict().items()}
    src["patch_embed.proj.weight"] = _patch_weight(model).clone()
    if model.cfg.channels == 1:  # see hf_channels
        src["patch_embed.proj.weight"] = src["patch_embed.proj.weight"] * torch.tensor(LUMA).view(1, 3, 1, 1)
    out = {name(names): src[ours] for ours, names in _HF_NAMES.items()}
    d = model.cfg.dim
    for i in range(model.cfg.depth):
        block = {k[len(f"blocks.{i}."):]: v for k, v in src.items() if k.startswith(f"blocks.{i}.")}
        for part in ("weight", "bias"):
            q, k, v = block[f"attn.qkv.{part}"].split(d)  # the fused projection's rows: q, then k, then v
            pieces = {"norm1": block[f"norm1.{part}"], "norm2": block[f"norm2.{part}"], "q": q, "k": k, "v": v,
                      "attn.proj": block[f"attn.proj.{part}"], "mlp.fc1": block[f"mlp.fc1.{part}"],
                      "mlp.fc2": block[f"mlp.fc2.{part}"]}
            for ours, tensor in pieces.items():
                out[name([n + f".{part}" for n in _HF_BLOCK_NAMES[ours]], i=i)] = tensor.clone()
    return out


def to_hf(model: ViT, classes: list[str] | None = None):
    """A transformers ``ViTForImageClassification`` computing what ``model`` computes (eval mode, CPU)."""
    from transformers import ViTForImageClassification

    check_exportable(model.cfg, "hf")
    classes = classes or [str(i) for i in range(model.cfg.num_classes)]
    out = ViTForImageClassification(hf_config(model.cfg, classes))
    missing, unexpected = out.load_state_dict(hf_state_dict(model.cpu(), set(out.state_dict())), strict=False)
    missing = [k for k in missing if not re.search(r"pooler", k)]
    if missing or unexpected:
        raise ExportError(f"the transformers model did not take every weight (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return out.eval()
