"""Choosing the device, precision and attention kernel for the hardware at hand."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import sys
import time

import torch

from .errors import ConfigError


DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,4})?")


def check_device_name(name: object) -> None:
    """A --device is one of a few names: anything else is a ConfigError here, never torch's
    RuntimeError from ``torch.device`` (which also knows names vitlab cannot run on)."""
    if not (isinstance(name, str) and DEVICE_NAME.fullmatch(name)):
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


def resolve_device(name: str = "auto") -> torch.device:
    check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name}: MPS is not available on this machine")
    return device


def capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability, (0, 0) for any other device."""
    if device.type != "cuda":
        return (0, 0)
    return tuple(torch.cuda.get_device_capability(device))[:2]


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively (and so faster than fp32). Not
    ``torch.cuda.is_bf16_supported()``: it counts emulation and answers True on a T4 or V100
    (compute capability 7.x), where bf16 is slower than fp32; native from Ampere (8.0) on."""
    if device.type == "cuda":
        return capability(device) >= (8, 0)
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def fast_fp16(device: torch.device) -> bool:
    """Whether fp16 matrix products run on tensor cores (NVIDIA Volta, 7.0, and later)."""
    return device.type == "cuda" and capability(device) >= (7, 0)


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # name -> autocast dtype
PRECISION_CHOICES = ("auto", *PRECISIONS)  # what --precision takes


def precision_name(dtype: torch.dtype | None) -> str:
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def auto_precisions(device: torch.device) -> list[str]:
    """What ``--precision auto`` chooses among (timed where there are two), the likelier first:
    bf16 where it is native (CPUs with AVX512-bf16 or AMX, NVIDIA Ampere and later), fp16
    where only it has tensor cores (Volta and Turing: V100, T4; with a gradient scaler when
    training), else fp32 (and always on Apple's MPS)."""
    if native_bf16(device):
        return ["bf16", "fp32"]
    if fast_fp16(device):
        return ["fp16", "fp32"]
    return ["fp32"]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32 (``auto``: the likelier of its candidates)."""
    if precision == "auto":
        return PRECISIONS[auto_precisions(device)[0]]
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if precision != "fp32" and device.type == "mps":
        raise ConfigError(f"--precision {precision} is not supported on MPS; use fp32")
    return PRECISIONS[precision]


def allow_tf32(device: torch.device) -> bool:
    """Let fp32 matrix products use TF32 tensor cores on NVIDIA Ampere and later (PyTorch's
    default there is full fp32, several times slower; convolutions use TF32 already): the
    rounding of bf16 autocast's accumulators, and runs stay deterministic. Process-wide,
    set only where such a GPU computes. Returns whether it applies."""
    if capability(device) < (8, 0):
        return False
    torch.set_float32_matmul_precision("high")
    return True


def fastest_attention(device: torch.device, amp_dtype: torch.dtype | None) -> str:
    """The rule of thumb, from benchmarks/train_step.py and variants.py on two CPUs: on CPU
    under bf16 autocast, SDPA falls back to a slow path and explicit matmuls win. A model
    built from Python with ``attention="auto"`` follows it at each call; ``vitlab train``,
    ``predict``, ``evaluate`` and ``load_checkpoint`` time the candidates instead (autotune)."""
    if device.type == "cpu" and amp_dtype is not None:
        return "explicit"
    return "sdpa"


def resolve_attention(attention: str, device: torch.device, amp_dtype: torch.dtype | None) -> str:
    """``attention`` ('auto', 'sdpa' or 'explicit') as the kernel that will run."""
    return fastest_attention(device, amp_dtype) if attention == "auto" else attention


@contextlib.contextmanager
def deterministic_kernels(on: bool):
    """While inside, only deterministic kernels run (an op that has none raises), as PyTorch's
    reproducibility notes say: cuBLAS with a fixed workspace, cuDNN without benchmarking.
    What was set before is put back after."""
    if not on:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any CUDA work
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA and MPS run asynchronously: a timing without
    this measures the launches only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def keep_random_streams(device: torch.device):
    """A context that puts back the CPU's random stream and ``device``'s own (CUDA's or MPS's)
    when it ends: work that only measures (calibration, the kernel choice) leaves a run's draws
    as they were."""
    if device.type in ("cuda", "mps"):
        return torch.random.fork_rng(devices=[device], device_type=device.type)
    return torch.random.fork_rng(devices=[])


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype sums of many losses and counts are kept in on ``device``: float64, except on
    Apple's MPS, which has none (float32 there: a 50,000-image epoch's counts stay exact)."""
    return torch.float32 if device.type == "mps" else torch.float64


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still hold (None on the CPU: a dataset there is in memory already)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return None


RESIDENT_SHARE = 0.7  # of the free memory, at most, for data that stays on the device (the rest: model, activations)


def check_fits(nbytes: int, device: torch.device, what: str, advice: str) -> None:
    """A ConfigError before ``nbytes`` are moved to ``device`` where they would not leave room
    to train, instead of the allocator's out-of-memory traceback half-way through the move."""
    free = free_memory(device)
    if free is not None and nbytes > RESIDENT_SHARE * free:
        raise ConfigError(f"{what} ({byte_size(nbytes)}) does not fit on {device}: {byte_size(free)} are free and "
                          f"training needs room beside it; {advice}")


def byte_size(n: float) -> str:
    """1.5 GiB, 12.0 MiB, 98 KiB."""
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n / 1024:.0f} KiB"


def matmul_peak(device: torch.device, dtype: torch.dtype | None, n: int | None = None, reps: int = 20) -> float:
    """Measured FLOP/s of a large square matrix product (``dtype`` None: fp32), its fastest of
    ``reps`` after three warm-up calls: the ceiling MFU is quoted against. (With one warm-up
    and the median of five, the 2-core CPU once read 482 bf16 GFLOP/s against ~930 in other
    runs.) At the default size this costs ~0.2 s on the 2-core CPU, milliseconds on a GPU."""
    n = n or (8192 if device.type == "cuda" else 1024)
    dtype = dtype or torch.float32
    g = torch.Generator(device=device).manual_seed(0)  # never the global streams a resumed run restored
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(device: torch.device) -> bool:
    """On CPU, stop glibc from handing tensor-sized blocks back to the kernel at every free.

    By default glibc serves blocks above a (moving) threshold with a fresh mmap and unmaps
    them when freed, so every training step pays page faults and page zeroing for its
    activations again. With a fixed 32 MiB mmap threshold and no heap trimming, freed blocks
    are reused. glibc's default is sometimes fast, sometimes not; measured on the 2-core CPU
    against its slow mode: batched CIFAR augmentation 54k -> 218k img/s, a Fashion-MNIST
    training step 0-13% faster (benchmarks/RESULTS.md). Process-wide, so it is set by the
    training and evaluation entry points, not at import. Returns whether it took effect."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
