"""What a GPU or a Mac would break, checked on the CPU: host syncs in the hot loop, float64
tensors on a device that has none, timings that do not wait for the device, the order of
DistributedDataParallel and torch.compile, and ``device="auto"`` for a Python caller."""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitlab import devices, load_checkpoint
from vitlab.config import default_config
from vitlab.train import train

TINY = dict(epochs=1, depth=1, dim=32, heads=2, mlp_dim=32, tensorboard=False, threads=1)
QUIET = dict(progress=False, log=lambda s: None)


class HostSyncs(TorchDispatchMode):
    """Counts the reads of a tensor's value back to the host (``.item()``, ``int()``, ``bool()``:
    aten._local_scalar_dense, a device sync on a GPU) made by vitlab's own code."""

    def __init__(self):
        super().__init__()
        self.count, self.where = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            inner = [f for f in traceback.extract_stack() if "_python_dispatch" not in f.filename][-2]
            if "/vitlab/" in inner.filename and "/tests/" not in inner.filename:  # (torch's own, e.g. AdamW: not ours)
                self.count += 1
                self.where.append(f"{inner.filename.rsplit('/', 1)[-1]}:{inner.lineno} {inner.line}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("element", [dict(), dict(hflip=0.5, translate=1), dict(crop=False),
                                     dict(trivial_augment=1.0), dict(random_erasing=0.5), dict(mixup_alpha=0.4),
                                     dict(cutmix_alpha=1.0), dict(mixup_alpha=0.4, cutmix_alpha=1.0),
                                     dict(repeated_augment=2), dict(dropout=0.1, attn_dropout=0.1, drop_path=0.2),
                                     dict(ema_decay=0.9)], ids=lambda e: ",".join(e) or "default")
def test_a_step_that_does_not_log_reads_nothing_back_from_the_device(tmp_path, element):
    counter, counts = HostSyncs(), []

    def after_each_step(state) -> bool:
        counts.append(counter.count)
        return False

    cfg = default_config().replace(out=str(tmp_path), name="s", log_every=1000, **{**TINY, "epochs": 1}, **element)
    with counter:
        train(cfg, stop_when=after_each_step, **QUIET)
    steps = [b - a for a, b in zip(counts, counts[1:-1])]  # between steps, the epoch's last (which logs) aside
    assert len(steps) > 10 and max(steps) == 0, (element, steps, counter.where[:5])


def test_no_float64_on_a_device_that_has_none(tmp_path, monkeypatch):
    """Apple's MPS has no float64: with its accumulation policy, the loop, the validation and the
    final evaluation make no float64 tensor (run here on the CPU with that policy)."""
    import vitlab.inference as inference
    import vitlab.train.folder as folder
    import vitlab.train.state as state

    for module in (devices, inference, folder, state):
        monkeypatch.setattr(module, "accumulation_dtype", lambda device: torch.float32)
    made = []

    class Float64(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    made.append(str(func))
            return out

    import vitlab.train.epochs as epochs
    real_epoch, real_end = epochs.train_epoch, epochs.end_epoch

    def watched(fn):
        def run(*a, **k):
            with Float64():
                return fn(*a, **k)
        return run

    monkeypatch.setattr(epochs, "train_epoch", watched(real_epoch))
    monkeypatch.setattr(epochs, "end_epoch", watched(real_end))
    result = train(default_config().replace(out=str(tmp_path), name="m", mixup_alpha=0.2, ema_decay=0.9, **TINY),
                   **QUIET)
    assert not made, sorted(set(made))[:5]
    assert 0 <= result.results["Test"][1] <= 1


def test_timings_wait_for_the_device_they_time(tmp_path, monkeypatch):
    """Calibration and the kernel choice synchronise the device around what they time (on a GPU,
    launches return at once: an unsynchronised timing measures nothing)."""
    import vitlab.autotune as autotune
    import vitlab.train.timebudget as timebudget

    seen = []
    for module in (autotune, timebudget):
        monkeypatch.setattr(module, "synchronize", lambda device: seen.append(device))
    cfg = default_config().replace(out=str(tmp_path), name="b", time_budget="60s", epochs=1, depth=1, dim=32, heads=2,
                                   mlp_dim=32, tensorboard=False, precision="fp32")
    from vitlab.data import load_dataset
    from vitlab.train.compute import Compute
    from vitlab.train.setup import Setup

    data = load_dataset("digits", "unused", val_size=0.1)
    compute = Compute.start(cfg)
    setup = Setup.build(cfg, data, compute.device, compute.kernels, compute.dist)
    timebudget.calibrate(cfg, setup, data, compute, steps=2)
    assert len(seen) == (2 + 2) + 2 * 3 and set(seen) == {compute.device}  # after each step; around each eval pass
    seen.clear()
    autotune.measure(setup.model.cfg, compute.device, autotune.candidates(setup.model.cfg, compute.device), batch=8,
                     training=True, seconds=0.2, rounds=1)
    assert seen and set(seen) == {compute.device}


def test_data_parallel_wraps_before_compiling(monkeypatch):
    """DistributedDataParallel first, torch.compile after: PyTorch's order, which lets the gradient
    all-reduce overlap the backward pass."""
    import torch.nn.parallel

    from vitlab.data import load_dataset
    from vitlab.distributed import Dist
    from vitlab.model import Kernels
    from vitlab.train.setup import Setup

    order = []

    class FakeDDP(torch.nn.Module):
        def __init__(self, module, device_ids=None):
            super().__init__()
            order.append("ddp")
            self.module = module

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    monkeypatch.setattr(torch, "compile", lambda m: order.append(("compile", type(m).__name__)) or m)
    cfg = default_config().replace(compile=True, depth=1, dim=32, heads=2, mlp_dim=32)
    setup = Setup.build(cfg, load_dataset("digits", "unused", val_size=0.1), torch.device("cpu"), Kernels(),
                        Dist(rank=0, world=2, local_rank=0, local_world=2))
    assert order == ["ddp", ("compile", "FakeDDP")] and isinstance(setup.step_model, FakeDDP)


def test_load_checkpoint_takes_auto_and_refuses_a_bad_device_in_one_line(digits_run):
    from vitlab.errors import ConfigError

    model, cfg = load_checkpoint(digits_run / "best", device="auto")  # cuda, then mps, then cpu
    assert next(model.parameters()).device.type == devices.resolve_device("auto").type
    with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda"):
        load_checkpoint(digits_run / "best", device="tpu")
