"""TrivialAugment-Wide (Müller & Hutter 2021) for a whole batch at once.

Each image gets one operation drawn uniformly from the 14 below, at a magnitude drawn
uniformly from 31 bins (with a random sign where the operation has one), as in
``torchvision.transforms.TrivialAugmentWide``. Instead of a Python loop over images,
all geometric operations share one ``grid_sample`` call with per-sample affine
matrices (identity for the other images), and each colour operation runs on the
batch and is kept where it was drawn: no host synchronisation, static shapes. Images are float tensors on the 0-255 scale (the crop's
output, before normalisation); outputs stay on that scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_BINS = 31
OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
       "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
SIGNED = GEOMETRIC + ("brightness", "color", "contrast", "sharpness")


def magnitude_of(op: str, bin_index: torch.Tensor, image_size: int) -> torch.Tensor:
    """TrivialAugmentWide's magnitude for each bin index (float tensor)."""
    t = bin_index.to(torch.float32) / (NUM_BINS - 1)  # 0..1
    if op in ("shear_x", "shear_y"):
        return 0.99 * t
    if op in ("translate_x", "translate_y"):
        return t * image_size  # torchvision: up to 32 px, i.e. the whole side of a 32 px image
    if op == "rotate":
        return 135.0 * t
    if op in ("brightness", "color", "contrast", "sharpness"):
        return 0.99 * t
    if op == "posterize":  # bits kept: 8 down to 2
        return 8 - (bin_index.to(torch.float32) / ((NUM_BINS - 1) / 6)).round()
    if op == "solarize":  # threshold: 255 down to 0
        return 255.0 * (1 - t)
    return torch.zeros_like(t)


def _affine_sources(op_index: torch.Tensor, mag: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2, 3) maps from output pixel (x, y, 1) to the input pixel it reads, in pixel
    units: shears about the top-left corner, rotation about the centre (as torchvision's
    TrivialAugment applies them)."""
    b = op_index.shape[0]
    m = torch.zeros(b, 2, 3, device=mag.device)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    sel = lambda name: op_index == OPS.index(name)  # noqa: E731
    zero = torch.zeros_like(mag)
    # shear about the image's top-left corner, as torchvision's F.affine(..., center=[0, 0]):
    # source x = x + m (y + 0.5), pixel centres sitting half a pixel from the edge
    m[:, 0, 1] = torch.where(sel("shear_x"), mag, zero)
    m[:, 1, 0] = torch.where(sel("shear_y"), mag, zero)
    m[:, 0, 2] = torch.where(sel("translate_x"), -mag, torch.where(sel("shear_x"), 0.5 * mag, zero))
    m[:, 1, 2] = torch.where(sel("translate_y"), -mag, torch.where(sel("shear_y"), 0.5 * mag, zero))
    rot = sel("rotate")
    theta = torch.deg2rad(torch.where(rot, mag, torch.zeros_like(mag)))
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # source = R(-theta) (p - c) + c; image y points down, so a positive angle turns counter-clockwise
    r = torch.stack([torch.stack([cos, -sin, cx - cos * cx + sin * cy], 1),
                     torch.stack([sin, cos, cy - sin * cx - cos * cy], 1)], 1)
    return torch.where(rot.view(b, 1, 1), r, m)


def affine_nearest(x: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Warp each image by its own pixel-space map (B, 2, 3), nearest neighbour, black fill."""
    b, _, height, width = x.shape
    ys, xs = torch.meshgrid(torch.arange(height, device=x.device, dtype=torch.float32),
                            torch.arange(width, device=x.device, dtype=torch.float32), indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, height * width, 3)
    src = pix @ sources.transpose(1, 2)  # (B, HW, 2) input pixel coordinates
    scale = torch.tensor([2.0 / width, 2.0 / height], device=x.device)
    grid = ((src + 0.5) * scale - 1).view(b, height, width, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * a + (1 - factor) * b, clamped to [0, 255]; factor per sample."""
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp(0, 255)


def _sharpness_reference(x: torch.Tensor) -> torch.Tensor:
    """The image smoothed by PIL's SMOOTH kernel, border pixels kept."""
    c = x.shape[1]
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13
    blurred = F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c).round()  # rounded, as PIL and torchvision do
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = blurred
    return out


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to span 0-255 (unchanged where it is flat)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, torch.ones_like(hi), 255.0 / (hi - lo).clamp_min(1e-6))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((x - lo) * scale).clamp(0, 255)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel of each image (PIL's / torchvision's
    look-up table), all channels of the batch at once: one scatter_add for the
    histograms, one gather for the look-up."""
    b, c, height, width = x.shape
    v = x.round().clamp(0, 255).long().view(b * c, height * width)
    hist = torch.zeros(b * c, 256, device=x.device).scatter_add_(1, v, torch.ones_like(v, dtype=torch.float32))
    # the count of the last non-zero bin is left out of the step, as in PIL
    last = 255 - (hist.flip(1) > 0).float().argmax(1)
    last_count = hist.gather(1, last.unsqueeze(1)).squeeze(1)
    step = torch.div(hist.sum(1) - last_count, 255, rounding_mode="floor")
    cum = hist.cumsum(1)
    safe_step = step.clamp_min(1).unsqueeze(1)
    lut = torch.div(torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], 1) + torch.div(safe_step, 2, rounding_mode="floor"),
                    safe_step, rounding_mode="floor").clamp(0, 255)
    out = lut.gather(1, v).view(b, c, height, width)
    return torch.where((step == 0).view(b, c, 1, 1), x, out)


def _color_op(op: str, x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    if op in ("brightness", "color", "contrast", "sharpness"):
        factor = 1.0 + mag
        if op == "brightness":
            return _blend(x, torch.zeros_like(x), factor)
        if op == "color":  # saturation; grey images have none
            return x if x.shape[1] == 1 else _blend(x, _gray(x).floor().expand_as(x), factor)
        if op == "contrast":
            return _blend(x, _gray(x).floor().mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)
        return _blend(x, _sharpness_reference(x), factor)
    if op == "posterize":
        step = torch.exp2(8 - mag).view(-1, 1, 1, 1)
        return torch.floor(x.round().clamp(0, 255) / step) * step
    if op == "solarize":
        return torch.where(x >= mag.view(-1, 1, 1, 1), 255 - x, x)
    if op == "autocontrast":
        return autocontrast(x)
    if op == "equalize":
        return equalize(x)
    raise ValueError(op)


def sample_ops(n: int, image_size: int, generator: torch.Generator | None, device: torch.device | str,
               prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: an operation index (0 = identity, also drawn when the image is not
    augmented, with probability 1 - prob) and its signed magnitude."""
    u = torch.rand(n, 3, generator=generator, device=device)
    op_index = (u[:, 0] * len(OPS)).long().clamp_max(len(OPS) - 1)
    op_index = torch.where(u[:, 2] < prob, op_index, torch.zeros_like(op_index))
    bins = (u[:, 1] * NUM_BINS).long().clamp_max(NUM_BINS - 1)
    sign = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
    mag = torch.zeros(n, device=device)
    for k, op in enumerate(OPS):
        m = magnitude_of(op, bins, image_size)
        if op in SIGNED:
            m = m * sign
        mag = torch.where(op_index == k, m, mag)
    return op_index, mag


def apply_ops(x: torch.Tensor, op_index: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Apply each sample's operation to a float batch on the 0-255 scale."""
    geometric = (op_index >= OPS.index(GEOMETRIC[0])) & (op_index <= OPS.index(GEOMETRIC[-1]))
    warped = affine_nearest(x, _affine_sources(op_index, mag, x.shape[2], x.shape[3]))
    out = torch.where(geometric.view(-1, 1, 1, 1), warped, x)
    for k in range(OPS.index("brightness"), len(OPS)):
        out = torch.where((op_index == k).view(-1, 1, 1, 1), _color_op(OPS[k], x, mag), out)
    return out


def trivial_augment(x: torch.Tensor, generator: torch.Generator | None = None, prob: float = 1.0) -> torch.Tensor:
    """TrivialAugment-Wide on a float batch (B, C, H, W) with values in [0, 255]; each
    image is augmented with probability ``prob`` (1.0 is the published method)."""
    op_index, mag = sample_ops(x.shape[0], x.shape[-1], generator, x.device, prob)
    return apply_ops(x, op_index, mag)


__all__ = ["OPS", "trivial_augment", "sample_ops", "apply_ops", "equalize", "autocontrast", "affine_nearest",
           "magnitude_of"]
