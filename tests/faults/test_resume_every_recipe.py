"""Resume is bit-exact for every recipe element that draws random numbers, at several stop
points, with progress shown or not; and what a run trains never depends on whether its
progress is shown (the matmul-peak measurement behind the MFU figure once drew from the
global random stream, only when progress was on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitlab.config import default_config
from vitlab.errors import TrainingInterrupted
from vitlab.train import train
from tests.datafiles import metrics_but_the_clock

# every element that draws random numbers, on the embedded digits data (20 steps an epoch)
RECIPE = dict(epochs=2, depth=1, dim=32, heads=2, mlp_dim=32, tensorboard=False, threads=1, precision="fp32", device="cpu",
              dropout=0.1, attn_dropout=0.1, drop_path=0.2, hflip=0.5, translate=1, trivial_augment=0.5,
              random_erasing=0.25, mixup_alpha=0.2, cutmix_alpha=0.2, repeated_augment=2, ema_decay=0.9, log_every=3,
              patch_dropout=0.25, init="mimetic")


def _log(s: str) -> None:
    pass


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {c: load_file(str(run / c / "model.safetensors")) for c in ("last", "best")}


def _same(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    for c in wa:
        assert wa[c].keys() == wb[c].keys() and all(torch.equal(wa[c][k], wb[c][k]) for k in wa[c]), (c, a, b)
    assert metrics_but_the_clock(a) == metrics_but_the_clock(b)


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quiet")
    return train(default_config().replace(out=str(out), name="q", **RECIPE), progress=False, log=_log).run_dir


def test_showing_progress_does_not_change_what_is_trained(quiet_run, tmp_path):
    shown = train(default_config().replace(out=str(tmp_path), name="p", **RECIPE), progress=True, log=_log).run_dir
    _same(quiet_run, shown)


@pytest.mark.parametrize("stop_at, progress_before, progress_after", [
    (7, True, True),  # mid-epoch 1, between log intervals
    (20, False, True),  # at the end of epoch 1
    (31, True, False),  # mid-epoch 2
])
def test_stopped_anywhere_and_resumed_with_or_without_progress_is_the_same_run(quiet_run, tmp_path, stop_at,
                                                                                  progress_before, progress_after):
    cfg = default_config().replace(out=str(tmp_path), name="s", **RECIPE)
    with pytest.raises(TrainingInterrupted):
        train(cfg, progress=progress_before, log=_log, stop_when=lambda s: s.step >= stop_at)
    train(resume=tmp_path / "s", progress=progress_after, log=_log)
    _same(quiet_run, tmp_path / "s")


@pytest.mark.parametrize("extra", [dict(optimizer="muon"),
                                   dict(layer_decay=0.7, freeze_blocks=1, class_weights="balanced", train_per_class=60)],
                         ids=["muon", "finetuning"])
def test_the_optimizer_and_finetuning_elements_resume_exactly(tmp_path, extra):
    """Muon's momentum, per-depth learning rates, frozen blocks, class weights and a per-class
    subset: stopped mid-epoch and resumed, the run that was never stopped."""
    cfg = default_config().replace(out=str(tmp_path), **RECIPE, **extra)
    straight = train(cfg.replace(name="a"), progress=False, log=_log).run_dir
    with pytest.raises(TrainingInterrupted):
        train(cfg.replace(name="b"), progress=False, log=_log, stop_when=lambda s: s.step >= 5)
    train(resume=tmp_path / "b", progress=False, log=_log)
    _same(straight, tmp_path / "b")
