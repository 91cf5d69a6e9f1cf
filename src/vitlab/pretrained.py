"""Starting from someone else's weights: a vitlab checkpoint folder, a timm model folder (as
timm saves one for the Hugging Face hub: ``config.json`` with ``architecture`` and
``model_args``) or a transformers ViT folder (``config.json`` with ``model_type: vit``), read
offline and through safetensors only, as a vitlab :class:`ViT`; and adapted to another image
size, patch size, class count or channel count as timm adapts its own models.

Nothing here downloads, unpickles or runs code named by a file: a folder's ``config.json`` is
data, checked field by field against what vitlab's ViT can express, and its weights' header
is checked against the shapes that config implies before any tensor is read.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import MANIFEST, WEIGHTS, expected_tensors, open_checkpoint, safetensors_header
from .errors import CheckpointError, ConfigError
from .fileio import open_regular, printable, read_json
from .interop import _HF_BLOCK_NAMES, _HF_NAMES
from .model import ViT, ViTConfig, resample_positions
from .tokenizers import PatchEmbed

CONFIG_JSON = "config.json"
CONFIG_LIMIT = 1 << 20  # bytes of a foreign config.json read at most
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
PICKLES = ("pytorch_model.bin", "model.bin", "model.pth", "model.pt", "open_clip_pytorch_model.bin")

# timm's plain ViT sizes (vision_transformer.py): width, heads, depth; MLP 4x, qkv bias, class token
TIMM_SIZES = {"tiny": (192, 3, 12), "small": (384, 6, 12), "medium": (512, 8, 12), "base": (768, 12, 12),
              "large": (1024, 16, 24), "huge": (1280, 16, 32)}
TIMM_NAME = re.compile(r"(?:vit|deit)_(tiny|small|medium|base|large|huge)_patch(\d+)_(\d+)(?:\.[\w.]+)?")
# timm VisionTransformer arguments, and the values vitlab's ViT computes the same function with
TIMM_FREE = {"img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
             "qkv_bias", "class_token", "global_pool", "fc_norm", "init_values", "no_embed_class", "qk_norm"}
TIMM_ALLOWED = {"drop_rate": None, "pos_drop_rate": None, "proj_drop_rate": None, "attn_drop_rate": None,
                "drop_path_rate": None, "reg_tokens": 0, "pre_norm": False, "dynamic_img_size": False,
                "dynamic_img_pad": False, "weight_init": None, "act_layer": None, "norm_layer": None}


@dataclass
class Source:
    """What a folder holds: the architecture as vitlab's config, its weights under vitlab's names."""

    kind: str  # "vitlab", "timm" or "hf"
    cfg: ViTConfig
    weights: Path
    names: dict[str, str]  # vitlab name -> the file's name (q, k and v: "<q>|<k>|<v>", fused on reading)
    has_head: bool
    classes: list[str] | None = None

    def sha256(self) -> str:
        h = hashlib.sha256()
        with open_regular(self.weights) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def load_pretrained(folder: str | Path, image_size: int | None = None, patch_size: int | None = None,
                    num_classes: int | None = None, channels: int | None = None) -> tuple[ViT, ViTConfig]:
    """A ViT (eval mode, CPU, fp32) with the weights of ``folder``: a vitlab checkpoint folder,
    a timm model folder or a transformers ViT folder. At its own size it computes the source
    model's logits. Asked for another ``image_size`` or ``patch_size``, the position embedding
    is resampled (bicubic, as timm's ``resample_abs_pos_embed``) and the patch projection too
    (FlexiViT's pseudo-inverse resize, as timm's ``resample_patch_embed``); another
    ``num_classes`` (or a folder without a classifier) starts a new head; 1 channel from RGB
    weights sums the patch projection over the colours (timm's ``adapt_input_conv``)."""
    source = read_source(Path(folder))
    target = target_config(source, image_size, patch_size, num_classes, channels)
    model = ViT(target)  # a new head, where one is needed, starts as vitlab's does
    load_into(model, source)
    return model.eval(), target


def load_into(model: ViT, source: "Source") -> None:
    """``source``'s weights, adapted to ``model``'s config, loaded into ``model`` (what starts
    anew, a head for other classes, keeps ``model``'s own initialisation)."""
    fresh = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model.load_state_dict(adapt(read_weights(source), source.cfg, model.cfg, fresh))


def target_config(source: Source, image_size: int | None, patch_size: int | None, num_classes: int | None,
                  channels: int | None) -> ViTConfig:
    """The source's architecture at the asked sizes; a ConfigError naming what cannot map."""
    src = source.cfg
    if num_classes is None and not source.has_head:
        raise ConfigError(f"{printable(source.weights.parent)} has no classification head: give num_classes")
    if image_size is not None and patch_size is None:
        patch_size = patch_for(image_size, src.patch_size)
    changes = {k: v for k, v in (("image_size", image_size), ("patch_size", patch_size), ("num_classes", num_classes),
                                 ("channels", channels)) if v is not None and v != getattr(src, k)}
    plain = PatchEmbed.registry[src.patch_embed].plain
    for field in ("patch_size", "channels"):
        if field in changes and not plain:
            raise ConfigError(f"{printable(source.weights.parent)}: its {src.patch_embed} tokenizer cannot be adapted "
                              f"to another {field.replace('_', ' ')} ({getattr(src, field)} -> {changes[field]})")
    return replace(src, **changes)


def patch_for(image_size: int, patch: int) -> int:
    """``patch`` where it tiles ``image_size``, else the patch size nearest it that does (patches
    of 16 for 40-px images: 20)."""
    if image_size % patch == 0:
        return patch
    fits = [p for p in range(1, min(64, image_size) + 1) if image_size % p == 0 and (image_size // p) ** 2 <= 4096]
    return min(fits, key=lambda p: (abs(math.log(p / patch)), -p))


# ------------------------------------------------------------------ reading a folder

def read_source(folder: Path) -> Source:
    if not folder.is_dir():
        raise CheckpointError(f"{printable(folder)} is not a folder (vitlab reads a vitlab checkpoint folder, or a "
                              f"timm or transformers model folder with config.json and model.safetensors)")
    if (folder / MANIFEST).is_file():
        meta = open_checkpoint(folder)  # checksums and header checked
        names = {k: k for k in expected_tensors(meta.model)}
        return Source("vitlab", meta.model, folder / WEIGHTS, names, True, list(meta.classes))
    if not (folder / CONFIG_JSON).is_file():
        raise CheckpointError(f"{printable(folder)}: neither a vitlab checkpoint (model.json) nor a timm or "
                              f"transformers model folder (config.json)")
    try:
        config = read_json(folder / CONFIG_JSON, CONFIG_LIMIT)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{printable(folder / CONFIG_JSON)}: cannot read ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{printable(folder / CONFIG_JSON)}: not a JSON object")
    weights = folder / WEIGHTS
    if not weights.is_file():
        pickled = [p for p in PICKLES if (folder / p).is_file()]
        if pickled:
            raise CheckpointError(
                f"{printable(folder)} holds its weights only as a pickle ({pickled[0]}), which vitlab does not load "
                f"(unpickling can run code). Convert it once, where you trust the file: python -c \"import torch; "
                f"from safetensors.torch import save_file; save_file({{k: v.contiguous() for k, v in "
                f"torch.load('{pickled[0]}', weights_only=True).items()}}, 'model.safetensors')\"")
        raise CheckpointError(f"{printable(folder)}: no {WEIGHTS}")
    header = safetensors_header(weights)  # read once: the names it holds, then their shapes
    if "architecture" in config:
        cfg, classes, has_head = timm_config(config, folder)
        names = {k: k for k in expected_tensors(cfg) if has_head or not k.startswith("head.")}
        source = Source("timm", cfg, weights, names, has_head, classes)
    elif config.get("model_type") == "vit":
        source = hf_source(config, folder, weights, set(header))
    else:
        raise CheckpointError(f"{printable(folder / CONFIG_JSON)}: not a timm model (no 'architecture') nor a "
                              f"transformers ViT (model_type {str(config.get('model_type'))[:40]!r})")
    check_header(source, header)
    return source


def _refuse(folder: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{printable(folder)}: vitlab cannot load this model: {what}")


def timm_config(config: dict, folder: Path) -> tuple[ViTConfig, list[str] | None, bool]:
    """A timm hub config (architecture + model_args) as vitlab's ViTConfig, its class names (if it
    has them) and whether it has a head (timm builds none with num_classes=0)."""
    arch = str(config["architecture"])
    if re.search(r"_r\d+_|resnet|hybrid", arch):
        raise _refuse(folder, f"{arch[:60]} has a hybrid (CNN) backbone")
    match = TIMM_NAME.fullmatch(arch)
    if not match:
        raise _refuse(folder, f"timm architecture {arch[:60]!r} is not a plain ViT vitlab knows "
                              f"(vit_/deit_ tiny, small, medium, base, large or huge, with a patch size and image size)")
    size, patch, image = match.groups()
    dim, heads, depth = TIMM_SIZES[size]
    args = dict(img_size=int(image), patch_size=int(patch), in_chans=3, num_classes=1000, embed_dim=dim, depth=depth,
                num_heads=heads, mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token", fc_norm=None,
                init_values=None, no_embed_class=False, qk_norm=False)
    given = config.get("model_args") or {}
    if not isinstance(given, dict):
        raise _refuse(folder, "model_args is not an object")
    for k, v in given.items():
        if k in TIMM_FREE:
            args[k] = v
        elif k not in TIMM_ALLOWED or (TIMM_ALLOWED[k] is not None and v != TIMM_ALLOWED[k]) or (
                k in ("act_layer", "norm_layer") and v not in (None, "gelu", "layernorm")):
            raise _refuse(folder, f"model_args {k}={str(v)[:40]} (vitlab's ViT has no such option)")
    if "num_classes" in config and "num_classes" not in given:
        args["num_classes"] = config["num_classes"]
    img = args["img_size"]
    if isinstance(img, (list, tuple)):
        if len(img) != 2 or img[0] != img[1]:
            raise _refuse(folder, f"image size {img} (vitlab's ViT takes square images)")
        img = img[0]
    pool = args["global_pool"]
    if args["no_embed_class"] or not args["qkv_bias"]:
        raise _refuse(folder, "no_embed_class or qkv_bias=False")
    if args["class_token"] and pool == "token":
        vit_pool = "cls"
    elif pool == "avg" and not args["class_token"]:
        vit_pool = "mean"
    else:
        raise _refuse(folder, f"global_pool {pool!r} with class_token={args['class_token']}")
    fc_norm = args["fc_norm"] if args["fc_norm"] is not None else pool == "avg"  # timm's default
    if fc_norm:
        raise _refuse(folder, "fc_norm (a norm after pooling)")
    try:
        dim, classes_n = int(args["embed_dim"]), int(args["num_classes"])
        if classes_n == 1 or classes_n < 0:
            raise ValueError(f"num_classes {classes_n}")
        cfg = ViTConfig(image_size=int(img), channels=int(args["in_chans"]), num_classes=max(2, classes_n),
                        patch_size=int(args["patch_size"]), depth=int(args["depth"]), heads=int(args["num_heads"]),
                        dim=dim, mlp_dim=int(dim * float(args["mlp_ratio"])), pool=vit_pool,
                        layer_scale=float(args["init_values"] or 0.0), patch_embed="conv", norm_eps=1e-6,
                        qk_norm=args["qk_norm"])
    except (ConfigError, TypeError, ValueError) as e:
        raise _refuse(folder, f"its model_args do not make a ViT vitlab can build ({e})") from None
    pretrained = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    labels = config.get("label_names") or pretrained.get("label_names")
    classes = [str(c) for c in labels] if isinstance(labels, list) and len(labels) == classes_n else None
    return cfg, classes, classes_n > 0  # (without a head, num_classes 2 stands in: the caller must give one)


def hf_source(config: dict, folder: Path, weights: Path, keys: set[str]) -> Source:
    """A transformers ViT folder: ``ViTForImageClassification`` (a classifier) or ``ViTModel``
    (none); ``keys``: the names its weights file holds."""
    def get(name, kind, default=None):
        v = config.get(name, default)
        if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
            raise _refuse(folder, f"config.json {name}={str(v)[:40]}")
        return v

    if get("hidden_act", str, "gelu") != "gelu":
        raise _refuse(folder, f"hidden_act {config.get('hidden_act')!r} (vitlab's MLP uses exact GELU)")
    if config.get("use_mask_token") or config.get("encoder_stride", 16) is None:
        raise _refuse(folder, "a mask token")
    labels = config.get("id2label") if isinstance(config.get("id2label"), dict) else {}
    has_head = "classifier.weight" in keys
    try:
        cfg = ViTConfig(image_size=get("image_size", int, 224), channels=get("num_channels", int, 3),
                        num_classes=max(2, len(labels)) if has_head else 2, patch_size=get("patch_size", int, 16),
                        depth=get("num_hidden_layers", int, 12), heads=get("num_attention_heads", int, 12),
                        dim=get("hidden_size", int, 768), mlp_dim=get("intermediate_size", int, 3072), pool="cls",
                        patch_embed="conv", norm_eps=float(get("layer_norm_eps", (int, float), 1e-12)))
    except (ConfigError, TypeError, ValueError) as e:
        raise _refuse(folder, f"its config does not make a ViT vitlab can build ({e})") from None

    def name(candidates: list[str], **fmt) -> str:
        """The file's name for a tensor: transformers 5's or 4's, of a classifier ("vit." first) or
        of a bare ViTModel (no prefix); the first candidate when none is there (check_header says so)."""
        for c in candidates:
            for full in (c.format(**fmt), c.format(**fmt).removeprefix("vit.")):
                if full in keys:
                    return full
        return candidates[0].format(**fmt)

    names = {ours: name(theirs) for ours, theirs in _HF_NAMES.items() if has_head or not ours.startswith("head.")}
    for i in range(cfg.depth):
        for part in ("weight", "bias"):
            for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attn.proj"),
                                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                names[f"blocks.{i}.{ours}.{part}"] = name([n + f".{part}" for n in _HF_BLOCK_NAMES[theirs]], i=i)
            names[f"blocks.{i}.attn.qkv.{part}"] = "|".join(
                name([n + f".{part}" for n in _HF_BLOCK_NAMES[x]], i=i) for x in ("q", "k", "v"))
    if has_head and len(labels) != cfg.num_classes:
        raise _refuse(folder, "id2label does not name every class of its classifier")
    classes = [str(labels.get(str(i), labels.get(i, i))) for i in range(len(labels))] if has_head else None
    if not get("qkv_bias", bool, True):  # no q/k/v biases in the file: vitlab's are zero then
        for i in range(cfg.depth):
            names[f"blocks.{i}.attn.qkv.bias"] = "zeros"
    return Source("hf", cfg, weights, names, has_head, classes)


def check_header(source: Source, header: dict[str, dict]) -> None:
    """Every tensor the architecture needs is in the file (its ``header``), in a float dtype, of the
    shape it needs (q, k and v each a third of the fused projection), before anything is read."""
    expected = expected_tensors(source.cfg)
    for ours, theirs in source.names.items():
        shape = expected[ours]
        parts = theirs.split("|")
        if parts == ["zeros"]:
            continue
        want = [(shape[0] // len(parts), *shape[1:])] * len(parts)
        if ours == "patch_embed.proj.weight" and source.cfg.patch_embed == "linear":
            want = [shape]
        for name, part_shape in zip(parts, want):
            entry = header.get(name)
            if not isinstance(entry, dict):
                raise CheckpointError(f"{printable(source.weights)}: no tensor {name!r} (the {source.kind} model's "
                                      f"{ours.replace('.', ' ')}); not the model its config.json describes")
            if entry.get("dtype") not in DTYPES or tuple(entry.get("shape", ())) != tuple(part_shape):
                raise CheckpointError(f"{printable(source.weights)}: {name} is {entry.get('dtype')} "
                                      f"{entry.get('shape')}, expected a float tensor of shape {list(part_shape)}")


def read_weights(source: Source) -> dict[str, torch.Tensor]:
    """The source's tensors under vitlab's names, in float32 (q, k and v fused in that order)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(source.weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{printable(source.weights)}: cannot read weights ({e})") from None
    expected = expected_tensors(source.cfg)
    out = {}
    for ours, theirs in source.names.items():
        if theirs == "zeros":
            out[ours] = torch.zeros(expected[ours])
        else:
            parts = theirs.split("|")  # (one name, or q|k|v to fuse: a 0-d tensor, LSA's temperature, cannot be cat)
            out[ours] = raw[parts[0]].float() if len(parts) == 1 else torch.cat([raw[n].float() for n in parts])
    return out


# ------------------------------------------------------------------ adapting

def adapt(state: dict[str, torch.Tensor], src: ViTConfig, dst: ViTConfig,
          fresh: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (of ``src``) for a model of ``dst``; ``fresh``: a newly built ``dst`` model's
    tensors, for what starts anew (the head, when the classes differ)."""
    out = dict(state)
    if dst.num_classes != src.num_classes or "head.weight" not in state:
        out["head.weight"], out["head.bias"] = fresh["head.weight"], fresh["head.bias"]
    if (dst.patch_size, dst.channels) != (src.patch_size, src.channels):
        w = out["patch_embed.proj.weight"]
        conv = w if w.ndim == 4 else w.reshape(src.dim, src.channels, src.patch_size, src.patch_size)
        conv = adapt_channels(conv, dst.channels)
        conv = resample_patch(conv, dst.patch_size)
        out["patch_embed.proj.weight"] = conv if w.ndim == 4 else conv.reshape(dst.dim, -1)
    if dst.grid != src.grid:
        prefix = 1 if src.pool == "cls" else 0
        out["pos_embed"] = resample_positions(out["pos_embed"], prefix, src.grid, dst.grid)
    return {k: v.contiguous() for k, v in out.items()}


def adapt_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A patch projection (D, C, p, p) for ``channels`` inputs: 1 from several by their sum (a grey
    image as equal colours computes what it did), more by tiling and rescaling (timm's rule)."""
    have = weight.shape[1]
    if channels == have:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    tiled = weight.repeat(1, math.ceil(channels / have), 1, 1)[:, :channels]
    return tiled * (have / channels)


def resample_patch(weight: torch.Tensor, patch: int) -> torch.Tensor:
    """A patch projection (D, C, p, p) for patches of side ``patch``: the kernel whose response to
    a resized patch best matches the old one's to the original (FlexiViT: with R the bicubic
    resize of a p x p patch, w' = pinv(R^T) w)."""
    old = weight.shape[-1]
    if old == patch:
        return weight
    basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    resized = F.interpolate(basis, size=(patch, patch), mode="bicubic", antialias=True, align_corners=False)
    resize = resized.reshape(old * old, patch * patch).T  # R: a resized patch = R @ the patch
    inverse = torch.linalg.pinv(resize.T)  # (patch^2, old^2)
    flat = weight.double().reshape(-1, old * old)
    return (flat @ inverse.T).reshape(*weight.shape[:2], patch, patch).to(weight.dtype)
