"""Stage 4, the batches: a loader that owns a run's training images on the device (uint8),
the epoch order, the crop plans, ``index_select``, the batched augmentation, mixing and this
rank's rows of each global batch (airbench's ``CifarLoader``: the loop is ``for batch in
batches.epoch(...)``).

Every draw is a pure function of (seed, epoch, batch) or comes from the loader's own
generators (one on the device, one on the host for per-batch scalars), whose states are
saved with each checkpoint: an epoch can be started at any batch
and draws exactly what an uninterrupted run draws there.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from ..augment import BatchAugment, mix_batch

PLAN_IMAGES = 16_384  # crops + flips drawn at once (BatchAugment.plan)


def epoch_order(n: int, seed: int, epoch: int, device: torch.device, repeats: int = 1) -> torch.Tensor:
    """The shuffled sample order of an epoch: a pure function of (seed, epoch), so a
    resumed run draws exactly the batches the uninterrupted one would have.

    With ``repeats`` > 1 (repeated augmentation, Hoffer et al. 2020), n/repeats distinct
    images each appear ``repeats`` times in a row, so their copies share a batch and get
    different augmentations; the epoch keeps its length of n samples."""
    g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    if repeats > 1:
        order = order[: -(-n // repeats)].repeat_interleave(repeats)[:n]
    return order.to(device)


def crop_plans(augment: BatchAugment, seed: int, epoch: int, first: int, steps: int, batch_size: int,
               image_hw: tuple[int, int], device: torch.device, size: int | None = None) -> Iterator[torch.Tensor | None]:
    """Each batch's crop + flip plan (to ``size``, default the augmentation's) for batches
    ``first`` to ``steps`` - 1 of an epoch, drawn PLAN_IMAGES at a time. Each block is a pure
    function of (seed, epoch, block), like ``epoch_order``, so a resumed run crops exactly as
    the uninterrupted one would."""
    per_block = max(1, PLAN_IMAGES // batch_size)
    block = None
    for b in range(first, steps):
        if b == first or b % per_block == 0:
            # (+ 7: not the seed epoch_order uses for the same seed and epoch)
            g = torch.Generator(device=device).manual_seed(((seed * 1_000_003 + epoch) * 65_537 + b // per_block + 7)
                                                           % 2**63)
            block = augment.plan(per_block * batch_size, *image_hw, g, device, size)
        yield None if block is None else block[(b % per_block) * batch_size:][:batch_size]


@dataclass
class Batch:
    index: int  # of the batch in its epoch
    images: torch.Tensor  # this rank's rows, augmented and normalised
    labels: torch.Tensor
    targets: torch.Tensor  # the labels, or soft targets where mixing mixed the batch


class Batches:
    """A run's training batches: ``batch_size`` images (the global batch) drawn by index from the
    images on the device, augmented and mixed as a whole, this rank's ``rows`` handed out."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: BatchAugment, batch_size: int,
                 seed: int, repeats: int, mixup: float, cutmix: float, num_classes: int, rows: slice,
                 low_res: tuple[int, int] = (0, 0)):
        self.images, self.labels, self.augment = images, labels, augment
        self.low_res = low_res  # (side, epochs): the first epochs' images at that side (--progressive-size)
        self.batch_size, self.seed, self.repeats, self.rows = batch_size, seed, repeats, rows
        self.mixup, self.cutmix, self.num_classes = mixup, cutmix, num_classes
        self.steps_per_epoch = len(labels) // batch_size  # the ragged last batch is dropped: static shapes
        # saved with every checkpoint: the augmentation's draws on the device, and the few per-batch
        # scalars of mixing, drawn on the host (on the device, each would cost a device sync)
        self.generator = torch.Generator(device=images.device).manual_seed(seed)
        self.host = np.random.default_rng([seed, 17])

    def size_in(self, epoch: int) -> int:
        """The side of epoch ``epoch``'s training images (0-based): a pure function of it, so a
        resumed run trains at the size the uninterrupted one did."""
        side, epochs = self.low_res
        return side if epoch < epochs else self.augment.image_size

    def epoch(self, epoch: int, first: int, length: Callable[[], int]) -> Iterator[Batch]:
        """The batches of ``epoch`` from batch ``first``, as long as ``length()`` (asked before
        each batch: a --time-budget run may change it) says the epoch lasts."""
        device, bs = self.images.device, self.batch_size
        order = epoch_order(len(self.labels), self.seed, epoch, device, self.repeats)
        size = self.size_in(epoch)
        plans = crop_plans(self.augment, self.seed, epoch, first, self.steps_per_epoch, bs, self.images.shape[2:],
                           device, size)
        for b, plan in zip(itertools.count(first), plans):
            if b >= length():
                return
            idx = order[b * bs: (b + 1) * bs]
            # index_select, not images[idx]: 6 us instead of 105 us for a CIFAR batch on CPU
            x = self.augment(self.images.index_select(0, idx), self.generator, plan, size)
            y = self.labels.index_select(0, idx)
            target = y
            if self.mixup > 0 or self.cutmix > 0:  # soft targets; accuracy still counts the dominant label
                x, target = mix_batch(x, y, self.num_classes, self.mixup, self.cutmix, self.host)
            yield Batch(b, x[self.rows], y[self.rows], target[self.rows])
