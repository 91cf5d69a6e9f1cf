"""Explanation figures: for image files, for images of a run's own dataset, and the
``attention.png`` every training run writes. The maps come from :mod:`vitlab.explain`;
each carries its faithfulness score (the deletion AUC of that map against random order).

What is written is bounded whatever is asked: images are explained CHUNK at a time (memory
does not grow with their number), a grid holds at most PAGE images (more go to numbered
pages), a split gives at most MAX_COUNT images, and a figure of per-head or per-layer maps
wraps at MAX_COLUMNS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from . import explain, report
from .errors import ConfigError, DataError
from .fileio import printable
from .images import check_channels, failure_reason
from .inference import Predictor

CHUNK = 64  # images explained at a time
PAGE = 64  # images in one grid figure (8 x 8)
MAX_COUNT = 1024  # images of a split that one command explains (16 pages of each kind at most)
MAX_COLUMNS = 12  # per-head / per-layer maps in one row of a figure


@dataclass
class Explained:
    """One batch, explained: the images (uint8), the maps (B, H, W) in [0, 1], the logits and
    the per-image deletion AUC of the map and of a random order of the patches."""

    images: torch.Tensor
    maps: torch.Tensor
    logits: torch.Tensor
    deletion: torch.Tensor
    deletion_random: torch.Tensor
    extra: dict[str, torch.Tensor]  # "heads": (B, heads, H, W), "layers": (B, layers, H, W)


def parse_target(target: str | None, classes: Sequence[str]) -> int | None:
    """A --target given as a class name or an index."""
    if target is None:
        return None
    if target in classes:
        return list(classes).index(target)
    if target.lstrip("-").isdigit() and 0 <= int(target) < len(classes):
        return int(target)
    shown = ", ".join(list(classes)[:10]) + (" ..." if len(classes) > 10 else "")
    raise ConfigError(f"--target {target!r} is neither a class name nor an index 0..{len(classes) - 1} ({shown})")


def explain_images(predictor: Predictor, images: torch.Tensor, method: str = "gradient", head_fusion: str = "mean",
                   discard_ratio: float = 0.0, target: int | None = None, per_head: bool = False,
                   per_layer: bool = False, batch_size: int = 64, seed: int = 0) -> Explained:
    """Maps, logits and faithfulness for uint8 images (N, C, H, W), in batches."""
    model, parts = predictor.model, []
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(images), batch_size):
        x = predictor.normalize(images[i: i + batch_size].to(predictor.device))
        rel = explain.tokens(model, x, method, head_fusion, discard_ratio, target)
        with torch.no_grad():
            logits = model(x).float()
        rand = torch.rand(rel.shape, generator=g).to(rel.device)
        extra = {}
        if per_head:
            extra["heads"] = explain.normalise(explain.raw_attention(model, x, per_head=True))
        if per_layer:
            layers = explain.rollout_tokens(model, x, head_fusion, discard_ratio, per_layer=True)
            b, n_layers, n = layers.shape
            extra["layers"] = explain.normalise(explain.to_image(model, layers.reshape(b * n_layers, n)).reshape(
                b, n_layers, model.cfg.image_size, model.cfg.image_size))
        parts.append((explain.normalise(explain.to_image(model, rel)), logits, explain.deletion_scores(model, x, rel),
                      explain.deletion_scores(model, x, rand), extra))
    cat = lambda k: torch.cat([p[k].cpu() for p in parts])  # noqa: E731
    extra = {k: torch.cat([p[4][k].cpu() for p in parts]) for k in parts[0][4]}
    return Explained(images.cpu(), cat(0), cat(1), cat(2), cat(3), extra)


def _title(ex: Explained, i: int, classes: Sequence[str], k: int = 3) -> str:
    probs, idx = ex.logits[i].softmax(0).topk(min(k, len(classes)))
    return ", ".join(f"{report.short(classes[int(c)], 14)} {float(p):.2f}" for p, c in zip(probs, idx))


def _score(ex: Explained, i: int) -> str:
    return f"deletion AUC {float(ex.deletion[i]):.2f} (random {float(ex.deletion_random[i]):.2f}; lower: more faithful)"


def overlay(ax, image: torch.Tensor, heat: torch.Tensor) -> None:
    report.show_image(ax, image)
    ax.imshow(heat.numpy(), cmap="jet", alpha=0.45, interpolation="bilinear",
              extent=(-0.5, image.shape[-1] - 0.5, image.shape[-2] - 0.5, -0.5))


def plot_one(ex: Explained, i: int, classes: Sequence[str], path: Path, method: str, name: str) -> None:
    """image | heatmap | overlay (and the per-head / per-layer maps below), titled with the
    top classes and the map's faithfulness score."""
    rows = [("", ex.maps[i:i + 1], 0)]
    for key, label in (("heads", "head"), ("layers", "after layer")):
        if key in ex.extra:
            maps = ex.extra[key][i]
            rows += [(label, maps[j: j + MAX_COLUMNS], j) for j in range(0, len(maps), MAX_COLUMNS)]
    cols = max(3, *(len(r[1]) for r in rows[1:])) if len(rows) > 1 else 3
    fig = report.new_figure(2.2 * cols, 2.4 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    report.show_image(axes[0, 0], ex.images[i])
    axes[0, 0].set_title("image", fontsize=8)
    axes[0, 1].imshow(ex.maps[i].numpy(), cmap="jet", interpolation="nearest")
    axes[0, 1].set_title(f"{method} map", fontsize=8)
    overlay(axes[0, 2], ex.images[i], ex.maps[i])
    axes[0, 2].set_title("overlay", fontsize=8)
    for r, (label, maps, first) in enumerate(rows[1:], start=1):
        for j, heat in enumerate(maps):
            overlay(axes[r, j], ex.images[i], heat)
            axes[r, j].set_title(f"{label} {first + j + 1}", fontsize=7)
    fig.suptitle(f"{printable(name)}: {_title(ex, i, classes)}\n{_score(ex, i)}", fontsize=8)
    report.save_png(fig, path)


def plot_grid(ex: Explained, index: Sequence[int], classes: Sequence[str], labels: torch.Tensor | None, path: Path,
              title: str, cols: int = 8) -> None:
    """A grid of overlays, each titled with its prediction (and the true label, mistakes in
    red) and its map's deletion AUC."""
    tiles = []
    for i in index:
        pred = int(ex.logits[i].argmax())
        right = labels is None or pred == int(labels[i])
        note = f"del {float(ex.deletion[i]):.2f}/{float(ex.deletion_random[i]):.2f}"
        if labels is not None:
            note = f"true: {report.short(classes[int(labels[i])])}  " + note
        tiles.append(report.Tile(ex.images[i], f"{report.short(classes[pred])} ({float(ex.logits[i].softmax(0)[pred]):.2f})",
                                 note, "black" if labels is None else ("tab:green" if right else "tab:red"),
                                 "black" if right else "tab:red", mistake=not right, heat=ex.maps[i]))
    report.plot_tiles(tiles, path, title + "\n(del: deletion AUC of the map / of a random order; lower: more faithful)",
                      cols, cell=(1.5, 1.85), sizes=(7, 5.5, 8), title_lines=2)


def explain_files(predictor: Predictor, paths: Sequence[Path], out: Path, method: str = "gradient",
                  note: Callable[[Path, str], None] | None = None, **options) -> Iterator[tuple[Path, Path | str]]:
    """One PNG per readable image file in ``out``, CHUNK files at a time; for each path, the
    PNG or why not. ``note(path, text)`` hears what decoding did to an image."""
    from .images import load_image

    m = predictor.meta.model
    check_channels(m.channels, printable(predictor.meta.dataset) + " model")
    used: set[str] = set()
    for start in range(0, len(paths), CHUNK):
        loaded = []
        for path in paths[start: start + CHUNK]:
            notes: list[str] = []
            try:
                loaded.append((Path(path), load_image(Path(path), m.channels, m.image_size, notes)))
            except (OSError, ValueError) as e:
                yield Path(path), failure_reason(e)
                continue
            for text in notes if note is not None else ():
                note(Path(path), text)
        if not loaded:
            continue
        ex = explain_images(predictor, torch.stack([img for _, img in loaded]), method, **options)
        out.mkdir(parents=True, exist_ok=True)
        for i, (path, _) in enumerate(loaded):
            stem = printable(path.stem) or "image"
            name, k = f"{stem}-{method}.png", 1
            while name in used:
                k += 1
                name = f"{stem}-{k}-{method}.png"
            used.add(name)
            plot_one(ex, i, predictor.classes, out / name, method, path.name)
            yield path, out / name


def explain_split(predictor: Predictor, images: torch.Tensor, labels: torch.Tensor, out: Path, split: str,
                  count: int, method: str = "gradient", **options) -> dict[str, list[Path]]:
    """The first ``count`` images of a split, explained, as grids of correct and of mistaken
    ones (``<split>-correct-<method>.png``; past PAGE images, numbered pages ``-2``, ``-3`` ...)."""
    limit = min(len(images), MAX_COUNT)
    if not 1 <= count <= limit:
        beyond = f"the {split} split's {len(images)} images" if count > len(images) else \
            f"the limit of {MAX_COUNT:,} images one command explains (16 pages of 64)"
        raise DataError(f"--count {count} is beyond {beyond} (choose 1..{limit})")
    logits = predictor.logits(images[:count])
    right = logits.argmax(1) == labels[:count]
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for key, mask in (("correct", right), ("mistaken", ~right)):
        index = mask.nonzero().flatten()
        pages = [index[i: i + PAGE] for i in range(0, len(index), PAGE)] or [index]
        written[key] = []
        for number, page in enumerate(pages, start=1):
            ex = explain_images(predictor, images[page], method, **options)
            suffix = "" if number == 1 else f"-{number}"
            path = out / f"{split}-{key}-{method}{suffix}.png"
            of = f" (page {number} of {len(pages)})" if len(pages) > 1 else ""
            plot_grid(ex, range(len(page)), predictor.classes, labels[page], path,
                      f"{split}: {len(index)} of {count} images {key}{of}, {method} maps")
            written[key].append(path)
    return written
