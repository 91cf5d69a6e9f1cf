"""Choosing the device, precision and attention kernel for the hardware at hand."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
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


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively (and so faster than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "mps":
            raise ConfigError("--precision bf16 is not supported on MPS; use fp32")
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else None


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


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype sums of many losses and counts are kept in on ``device``: float64, except on
    Apple's MPS, which has none (float32 there: a 50,000-image epoch's counts stay exact)."""
    return torch.float32 if device.type == "mps" else torch.float64


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
