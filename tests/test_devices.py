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
                                     dict(ema_decay=0.9), dict(optimizer="muon"), dict(class_weights="balanced"),
                                     dict(layer_decay=0.8), dict(patch_dropout=0.5)], ids=lambda e: ",".join(e) or "default")
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
    """Apple's MPS has no float64: with its accumulation policy, the loop and each epoch's
    validation make no float64 tensor (run here on the CPU with that policy; the final
    evaluation sums logits it has moved to the host)."""
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


# ---------------------------------------------------------------- precision by compute capability

def _fake_gpu(monkeypatch, capability: tuple[int, int]) -> torch.device:
    """torch.cuda as it answers on a GPU of ``capability`` (is_bf16_supported says yes
    everywhere, as it does on a T4 or V100, where bf16 is only emulated)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return torch.device("cuda")


@pytest.mark.parametrize("capability, auto, tf32", [((7, 5), ["fp16", "fp32"], False), ((7, 0), ["fp16", "fp32"], False),
                                                     ((8, 0), ["bf16", "fp32"], True), ((9, 0), ["bf16", "fp32"], True),
                                                     ((6, 1), ["fp32"], False)])
def test_auto_precision_follows_the_compute_capability(monkeypatch, capability, auto, tf32):
    from vitlab import autotune
    from vitlab.model import ViTConfig

    gpu = _fake_gpu(monkeypatch, capability)
    assert devices.auto_precisions(gpu) == auto
    assert devices.native_bf16(gpu) == (capability >= (8, 0))  # not is_bf16_supported(): emulation is slow
    assert devices.resolve_precision("auto", gpu) == devices.PRECISIONS[auto[0]]
    cfg = ViTConfig(image_size=32, channels=3, num_classes=10, patch_size=4, depth=1, heads=2, dim=32, mlp_dim=32)
    assert sorted({c.precision for c in autotune.candidates(cfg, gpu)}) == sorted(auto)  # what auto times
    assert devices.resolve_precision("fp16", gpu) == torch.float16
    before = torch.get_float32_matmul_precision()
    try:
        assert devices.allow_tf32(gpu) == tf32
        assert torch.get_float32_matmul_precision() == ("high" if tf32 else before)
    finally:
        torch.set_float32_matmul_precision(before)  # process-wide: the other tests compute in full fp32
    with pytest.raises(devices.ConfigError, match="not supported on MPS"):
        devices.resolve_precision("fp16", torch.device("mps"))


def test_fp16_trains_with_a_gradient_scaler_without_host_syncs_and_resumes_bit_exact(tmp_path):
    """fp16 (the tensor-core precision of a T4 or V100) needs a loss scale; the scaler's state is
    part of the checkpoint, and its step runs on the device (fused AdamW: no flag read back)."""
    from safetensors.torch import load_file

    from vitlab.errors import TrainingInterrupted

    cfg = default_config().replace(out=str(tmp_path), precision="fp16", device="cpu", log_every=1000, hflip=0.5,
                                   dropout=0.1, checkpoint_every=5, **{**TINY, "epochs": 2})
    counter, counts = _AllSyncs(), []
    with counter:
        straight = train(cfg.replace(name="a"), stop_when=lambda s: counts.append(counter.count) and False, **QUIET)
    steps = [b - a for a, b in zip(counts, counts[1:])]
    assert sorted(steps)[len(steps) // 2] == 0, steps  # the median step: the log interval and checkpoints aside
    assert "fp16" in (straight.run_dir / "results.md").read_text()
    state = torch.load(straight.run_dir / "last" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 1  # the loss really was scaled
    with pytest.raises(TrainingInterrupted):
        train(cfg.replace(name="b"), stop_when=lambda s: s.step >= 7, **QUIET)
    resumed = train(resume=tmp_path / "b", **QUIET)
    a, b = (load_file(str(r.run_dir / "last" / "model.safetensors")) for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.results == resumed.results


class _AllSyncs(TorchDispatchMode):
    """Every read of a tensor's value back to the host, whoever makes it (torch's optimizer and
    gradient scaler included)."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------- timings, MFU, compile time

def test_mfu_of_a_job_is_against_the_peak_of_all_its_devices():
    from vitlab.train.epochs import mfu_percent

    assert mfu_percent(1000, 1e9, 2e12, 1) == pytest.approx(50)
    assert mfu_percent(1000, 1e9, 2e12, 4) == pytest.approx(12.5)  # four GPUs: four peaks


def test_calibration_counts_the_compile_time_the_run_will_pay(tmp_path, monkeypatch):
    import time

    from vitlab import budget
    import vitlab.train.timebudget as timebudget
    from vitlab.data import load_dataset
    from vitlab.train.compute import Compute
    from vitlab.train.setup import Setup

    def slow_compile(model):  # a stand-in for torch.compile: the first call pays for the compile
        first = []

        def call(*a, **k):
            if not first:
                first.append(time.sleep(0.6))
            return model(*a, **k)
        return call

    monkeypatch.setattr(timebudget.torch, "compile", slow_compile)
    data = load_dataset("digits", "unused", val_size=0.1)
    seconds = {}
    for compiled in (False, True):
        cfg = default_config().replace(out=str(tmp_path), name="c", time_budget="60s", compile=compiled, precision="fp32",
                                       **TINY)
        compute = Compute.start(cfg)
        setup = Setup.build(cfg, data, compute.device, compute.kernels, compute.dist)
        seconds[compiled] = timebudget.calibrate(cfg, setup, data, compute, steps=2)
        compute.stop()
    assert seconds[False][3] == 0 and seconds[True][3] >= 0.5
    step_s, eval_s = seconds[True][:2]
    args = (60, step_s, eval_s, 100, 180, 1800, 1, 1, 1 << 40, time.perf_counter())
    assert budget.plan(*args, compile_seconds=30).started >= 30
    assert budget.plan(*args, compile_seconds=30).steps < budget.plan(*args).steps


# ---------------------------------------------------------------- memory and failures

def test_a_training_set_the_device_cannot_hold_is_refused_before_it_moves(tmp_path, monkeypatch):
    from vitlab.errors import ConfigError

    monkeypatch.setattr(devices, "free_memory", lambda device: 100_000)  # a nearly full GPU
    with pytest.raises(ConfigError, match=r"the training set as uint8 \(1294 images of 1x8x8\) \(91 KiB\) does not "
                                          r"fit on cpu: 98 KiB are free.*--image-size"):
        train(default_config().replace(out=str(tmp_path), name="m", **TINY), **QUIET)
    assert not (tmp_path / "m").exists()  # refused before the run folder was made
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 << 30, 80 << 30))
    assert devices.free_memory(torch.device("cuda")) == 3 << 30
    assert devices.free_memory(torch.device("cpu")) is None


def test_running_out_of_device_memory_is_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from vitlab.cli import cli
    from vitlab.train import setup

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(setup.Setup, "build", oom)
    result = CliRunner().invoke(cli, ["train", "--out", str(tmp_path), "--epochs", "1", "--depth", "1", "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "out of memory on the device (CUDA out of memory. Tried to allocate 20.00 GiB" in result.output
    assert "lower --batch-size" in result.output


def test_a_kernel_candidate_that_fails_is_passed_over(monkeypatch):
    """The kernel choice times each candidate at the full batch: one that runs out of memory (or
    that the device lacks) is dropped and another serves the run; only when all fail is it an error."""
    import torch.nn.functional as F

    from vitlab import autotune
    from vitlab.model import ViTConfig

    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    cfg = ViTConfig(image_size=32, channels=3, num_classes=10, patch_size=4, depth=2, heads=2, dim=32, mlp_dim=32)
    cpu = torch.device("cpu")
    options = [autotune.Choice("sdpa", "fp32", True), autotune.Choice("explicit", "fp32", True)]
    monkeypatch.setattr(F, "scaled_dot_product_attention", no_memory)
    choice = autotune.measure(cfg, cpu, options, batch=8, training=True, seconds=0.2, rounds=1)
    assert choice.attention == "explicit" and list(choice.ms) == ["fp32 explicit"]  # no infinity in the cache
    with pytest.raises(torch.OutOfMemoryError):
        autotune.measure(cfg, cpu, options[:1], batch=8, training=True, seconds=0.2, rounds=1)


@pytest.mark.parametrize("error", [ValueError("bad value"), RuntimeError("CUDA error: an illegal memory access"),
                                   KeyError("epoch")])
def test_any_error_of_rank_0_reaches_the_other_ranks(error):
    """Rank 0 decides alone (Compute.by_main) while the others wait in a collective: whatever it
    raises is sent to them at once, not only vitlab's and the OS's errors."""
    from vitlab.distributed import Dist
    from vitlab.errors import VitlabError
    from vitlab.model import Kernels
    from vitlab.train.compute import Compute

    sent = []

    class Rank(Dist):
        def broadcast(self, obj):
            sent.append(obj)
            return obj if self.main else (None, sent[0][1])

    def fail():
        raise error

    rank0 = Compute(torch.device("cpu"), None, Kernels(), Rank(rank=0, world=2, local_rank=0, local_world=2))
    with pytest.raises(type(error)):
        rank0.by_main(fail)
    assert sent and sent[0][0] is None and type(error).__name__ in sent[0][1][1]
    rank1 = Compute(torch.device("cpu"), None, Kernels(), Rank(rank=1, world=2, local_rank=1, local_world=2))
    with pytest.raises(VitlabError, match="rank 0 failed") as raised:
        rank1.by_main(lambda: pytest.fail("rank 1 must not run it"))
    assert raised.value.from_main


# ---------------------------------------------------------------- determinism, locks, launcher

def test_deterministic_mode_holds_while_training_and_is_undone_after(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    train(default_config().replace(out=str(tmp_path), name="d", deterministic=True, **TINY),
          stop_when=lambda s: seen.append(torch.are_deterministic_algorithms_enabled()) and False, **QUIET)
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic is False and devices.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


class FakeMsvcrt:
    """Windows' byte-range locks (msvcrt.locking), for a process with several descriptors: a range
    held through one open descriptor refuses another."""

    LK_NBLCK = 2

    def __init__(self):
        self.held: dict[tuple[int, int, int], int] = {}

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        import os

        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, os.lseek(fd, 0, os.SEEK_CUR))
        holder = self.held.get(key)
        if holder is not None and holder != fd:
            try:
                alive = os.fstat(holder).st_ino == st.st_ino
            except OSError:
                alive = False  # closed: the system released it
            if alive:
                raise OSError(36, "Resource deadlock avoided")
        self.held[key] = fd


def test_the_run_lock_holds_on_windows_too(tmp_path, monkeypatch):
    import vitlab.rundir as rundir

    monkeypatch.setattr(rundir, "fcntl", None)
    monkeypatch.setattr(rundir, "msvcrt", FakeMsvcrt())
    run = tmp_path / "run"
    run.mkdir()
    first = rundir.RunLock(run).acquire()
    with pytest.raises(rundir.RunInUse, match=r"in use by process \d+ on"):  # the holder's line is readable
        rundir.RunLock(run).acquire()
    first.release()
    rundir.RunLock(run).acquire().release()
    (run / rundir.LOCK).unlink()
    (run / rundir.LOCK).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(devices.ConfigError, match="symbolic link"):  # the no-link rule, on this path too
        rundir.RunLock(run).acquire()
    assert not (tmp_path / "elsewhere").exists()


def test_a_rank_ends_when_its_launcher_dies_on_macos_too(tmp_path):
    """Without Linux's PR_SET_PDEATHSIG (macOS), a watcher thread ends an orphaned rank."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rank = ("import sys, time\nfrom vitlab.distributed import die_with_launcher\nsys.platform = 'darwin'\n"
            "die_with_launcher(poll_seconds=0.05)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    launcher = ("import subprocess, sys, time\n"
                f"p = subprocess.Popen([sys.executable, '-c', {rank!r}], stdout=subprocess.PIPE, text=True)\n"
                "p.stdout.readline()\nprint(p.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def test_random_draws_use_generators_of_their_own_device_and_new_crop_plans_need_no_sync(tmp_path, monkeypatch):
    """Every draw with an explicit generator draws for a tensor on the generator's device (torch
    refuses a CPU generator for CUDA tensors, at run time, on the GPU only), and a new block of
    crop plans (here every 2 steps) reads nothing back. With ``device="auto"`` a GPU machine
    checks its own device; here the CPU."""
    import vitlab.train.batches as batches

    monkeypatch.setattr(batches, "PLAN_IMAGES", 2 * 64)
    pairs, counter, counts = [], HostSyncs(), []

    class Draws(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            g = (kwargs or {}).get("generator")
            if g is not None and isinstance(out, torch.Tensor):
                pairs.append((g.device.type, out.device.type, str(func)))
            return out

    cfg = default_config().replace(out=str(tmp_path), name="g", device="auto", batch_size=64, log_every=1000, crop=True,
                                   hflip=0.5, translate=1, trivial_augment=0.5, random_erasing=0.5, **TINY)
    with Draws(), counter:
        train(cfg, stop_when=lambda s: counts.append(counter.count) and False, **QUIET)
    assert {f.split(".")[1] for _, _, f in pairs} >= {"rand", "randint"}  # the crops, flips, erasing, TrivialAugment
    assert all(g == t for g, t, _ in pairs), sorted({p for p in pairs if p[0] != p[1]})
    steps = [b - a for a, b in zip(counts, counts[1:-1])]
    assert len(steps) > 10 and max(steps) == 0, (steps, counter.where[:5])


@pytest.mark.parametrize("kind, forked", [("cpu", ([], None)), ("cuda", ("dev", "cuda")), ("mps", ("dev", "mps"))])
def test_measuring_puts_back_the_random_stream_of_the_device_it_measures(monkeypatch, kind, forked):
    """Calibration and the kernel choice run inside devices.keep_random_streams: the CPU's stream
    and the device's own, on a Mac too (it kept CUDA's only)."""
    import contextlib

    asked = []
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices, device_type=None: asked.append(
        (devices, device_type)) or contextlib.nullcontext())
    device = torch.device(kind)
    with devices.keep_random_streams(device):
        pass
    want = ([device] if forked[0] == "dev" else [], forked[1])
    assert asked == [want]
