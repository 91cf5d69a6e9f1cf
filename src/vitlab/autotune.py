"""Kernel choices by measurement: what ``auto`` means for attention, precision and layout.

Which attention kernel (SDPA or explicit matmuls), which precision (bf16 or fp16 against fp32,
where the device computes the lower precision natively: devices.auto_precisions) and which
feature-map layout (NHWC or NCHW, for the conv-pool tokenizer) is fastest depends on the CPU
or GPU, the thread count, the torch version and the shapes; a rule written on one machine is
wrong on the next (issue 18: SDPA under bf16 ran 2.5x slower than explicit matmuls on one
CPU). So each correct candidate is timed for the real model, a few steps each, and the fastest
is kept. The choice is cached per device fingerprint, shapes, precision request and torch
version in the user's cache folder (``$VITLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/vitlab``,
else ``~/.cache/vitlab``): timing costs at most about 2 s when nothing is cached and nothing
when it is. A flag the user gave (``--attention sdpa``, ``--precision fp32``) is never
second-guessed. A cache file that does not parse, or holds a choice that is not a candidate, is
ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .fileio import atomic_write_text, read_bounded, read_json
from .model import Kernels, ViT, ViTConfig, flops_per_image
from .tokenizers import PatchEmbed
from .devices import (PRECISIONS, auto_precisions, autocast, fastest_attention, keep_random_streams, resolve_precision,
                      synchronize)

CACHE_FILE = "kernels.json"
CACHE_LIMIT = 1 << 20  # bytes read from the cache file at most
CACHE_ENTRIES = 256  # the newest kept
SECONDS = 1.8  # the timing stops here (building the model and warming up come on top: ~2 s in all)
STEP_SECONDS = 0.1  # on a CPU, the batch of a timed pass (tokenizer and one block) is cut to about this much work
ATTENTIONS = ("sdpa", "explicit")


@dataclass(frozen=True)
class Choice:
    """How the model will compute here, and how that was decided."""

    attention: str  # "sdpa" or "explicit"
    precision: str  # "bf16", "fp16" or "fp32"
    channels_last: bool
    source: str = "fixed"  # "measured", "cached" or "fixed" (one candidate: flags or the device decided)
    ms: dict[str, float] = field(default_factory=dict)  # each timed candidate's step, in milliseconds

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    def kernels(self, cls_only_last_block: bool = True) -> Kernels:
        return Kernels(self.attention, cls_only_last_block, self.channels_last)

    def describe(self) -> str:
        return f"{label(self)} ({self.source})"

    def to_dict(self) -> dict:
        return {"attention": self.attention, "precision": self.precision, "channels_last": self.channels_last,
                "source": self.source, "ms": dict(self.ms)}

    @classmethod
    def from_dict(cls, d: object, candidates: list["Choice"]) -> "Choice | None":
        """A saved choice, if it is one of ``candidates``; None for anything else."""
        if not isinstance(d, dict):
            return None
        for c in candidates:
            if (d.get("attention"), d.get("precision"), d.get("channels_last")) == (c.attention, c.precision,
                                                                                    c.channels_last):
                return replace(c, ms=_timings(d.get("ms")))
        return None


def _timings(ms: object) -> dict[str, float]:
    """The per-candidate milliseconds of a saved choice: only short names with finite,
    non-negative values of a sane size (a cache file is untrusted: 10**400 is an int that no
    float can hold); anything else is dropped."""
    out: dict[str, float] = {}
    if not isinstance(ms, dict) or len(ms) > 16:
        return out
    for k, v in ms.items():
        if isinstance(k, str) and len(k) <= 64 and isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                v = float(v)
            except OverflowError:
                continue
            if math.isfinite(v) and 0 <= v <= 1e9:
                out[k] = v
    return out


# ------------------------------------------------------------------ candidates

def candidates(model_cfg: ViTConfig, device: torch.device, attention: str = "auto", precision: str = "auto",
               channels_last: bool | None = None) -> list[Choice]:
    """Every correct combination for what the user left to ``auto``; the rule-of-thumb one first."""
    resolve_precision(precision, device)  # raises for what the device cannot do
    precisions = auto_precisions(device) if precision == "auto" else [precision]
    layouts = [True, False] if channels_last is None and PatchEmbed.registry[model_cfg.patch_embed].layouts else \
        [True if channels_last is None else bool(channels_last)]
    out = []
    for p in precisions:
        rule = fastest_attention(device, PRECISIONS[p])
        attentions = [rule] + [a for a in ATTENTIONS if a != rule] if attention == "auto" else [attention]
        out += [Choice(a, p, cl) for a in attentions for cl in layouts]
    return out


# ------------------------------------------------------------------ the cache

def cache_dir() -> Path:
    if os.environ.get("VITLAB_CACHE_DIR"):
        return Path(os.environ["VITLAB_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "vitlab"


def device_fingerprint(device: torch.device) -> dict:
    """What decides which kernel is fastest, apart from the shapes."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        extra = {"capability": ".".join(map(str, torch.cuda.get_device_capability(index))),
                 "cuda": torch.version.cuda}
    else:
        name, extra = cpu_model(), {"threads": torch.get_num_threads()}
    return {"device": device.type, "name": name, **extra, "torch": torch.__version__}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module knows."""
    try:
        for line in read_bounded(Path("/proc/cpuinfo"), 4 << 20).decode(errors="replace").splitlines():
            if line.split(":", 1)[0].strip() in ("model name", "Model", "Hardware"):
                return line.split(":", 1)[1].strip()
    except (OSError, ValueError):
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_key(fingerprint: dict, model_cfg: ViTConfig, batch: int, training: bool, cls_only_last_block: bool,
              options: list[Choice]) -> str:
    what = {"fingerprint": fingerprint, "model": model_cfg.to_dict(), "batch": batch, "training": training,
            "cls_only_last_block": cls_only_last_block,
            "candidates": [(c.attention, c.precision, c.channels_last) for c in options]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def read_cache(path: Path) -> dict:
    """The cache's entries; {} for a missing, oversized or malformed file (never trusted)."""
    try:
        data = read_json(path, CACHE_LIMIT)  # a named pipe, a huge or deep file: ignored
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == 1 else None
    return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, dict)} \
        if isinstance(entries, dict) else {}


def write_cache(path: Path, key: str, choice: Choice, fingerprint: dict) -> None:
    """Add one entry (atomically; a cache that cannot be written is not an error)."""
    try:
        entries = read_cache(path)
        entries.pop(key, None)
        entries[key] = {**choice.to_dict(), "fingerprint": fingerprint, "time": time.time()}
        kept = dict(list(entries.items())[-CACHE_ENTRIES:])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"version": 1, "entries": kept}, indent=1, default=str))
    except OSError:
        pass


# ------------------------------------------------------------------ timing

def choose(model_cfg: ViTConfig, device: torch.device, *, batch: int, training: bool, attention: str = "auto",
           precision: str = "auto", channels_last: bool | None = None, cls_only_last_block: bool = True) -> Choice:
    """The fastest correct way to compute ``model_cfg`` on ``device`` for batches of ``batch``
    (a training step when ``training``, else a forward pass), from the cache or timed now."""
    options = candidates(model_cfg, device, attention, precision, channels_last)
    if len(options) == 1:
        return options[0]
    fingerprint = device_fingerprint(device)
    key = cache_key(fingerprint, model_cfg, batch, training, cls_only_last_block, options)
    path = cache_dir() / CACHE_FILE
    cached = Choice.from_dict(read_cache(path).get(key), options)
    if cached is not None:
        return replace(cached, source="cached")
    choice = measure(model_cfg, device, options, batch, training, cls_only_last_block)
    write_cache(path, key, choice, fingerprint)
    return choice


def measure(model_cfg: ViTConfig, device: torch.device, options: list[Choice], batch: int, training: bool,
            cls_only_last_block: bool = True, seconds: float = SECONDS, rounds: int = 3,
            images: int | None = None) -> Choice:
    """Time each option on the model's tokenizer and one of its blocks, with random weights
    and images, and estimate a step as tokenizer + depth x block: the candidates differ only
    there, and one block at (nearly) the real batch is representative where a whole model at
    a cut-down batch was not (benchmarks/kernel_choice.py: at 1-2 images the per-image cost
    doubled, and the choice flipped). Options are timed in interleaved rounds (each its
    fastest), so that a machine that slows down mid-way slows all alike; the rounds stop at
    ``seconds``. The caller's random streams are left as they were. ``images``: the batch
    to time (default: ``batch``, on a CPU cut to about STEP_SECONDS of work)."""
    deadline = time.perf_counter() + seconds
    one = replace(model_cfg, depth=1)
    timed_flops = flops_per_image(one, training)  # the tokenizer, one block and the head
    if images:
        n = images
    elif device.type == "cpu":  # at 25 GFLOP/s a thread
        n = max(1, min(batch, round(STEP_SECONDS * 25e9 * torch.get_num_threads() / timed_flops)))
    else:
        n = batch
    with keep_random_streams(device):
        torch.manual_seed(0)
        first = ViT(one, options[0].kernels(cls_only_last_block)).to(device).train(training)
        models = [first] + [first.with_kernels(c.kernels(cls_only_last_block)) for c in options[1:]]
        x = torch.randn(n, model_cfg.channels, model_cfg.image_size, model_cfg.image_size, device=device)
        with torch.no_grad():
            tokens = first.embed(x)

        def timed(fn, c: Choice, model: ViT) -> float:
            synchronize(device)
            t = time.perf_counter()
            if training:
                with autocast(device, c.amp_dtype):
                    out = fn()
                out.float().square().mean().backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode(), autocast(device, c.amp_dtype):
                    fn()
            synchronize(device)
            return time.perf_counter() - t

        def step(c: Choice) -> float:
            model = models[options.index(c)]
            block_input = tokens.detach().requires_grad_(training)
            return (timed(lambda: model.embed(x), c, model)
                    + model_cfg.depth * timed(lambda: model.blocks[0](block_input), c, model))

        best = _best_times(step, options, deadline, rounds)
    fastest = min(range(len(options)), key=best.__getitem__)
    ms = {label(c): 1e3 * t * batch / n for c, t in zip(options, best)
          if math.isfinite(t)}  # per step of the real batch, estimated (an option that failed: absent)
    return replace(options[fastest], source="measured", ms=ms)


def _best_times(step, options: list[Choice], deadline: float, rounds: int) -> list[float]:
    """Each option's fastest ``step(option)``: one warm-up round (first calls allocate, pick oneDNN
    primitives, cast weights), then interleaved rounds while another fits before ``deadline``.
    An option that fails (out of memory at this batch, a kernel this device lacks) is out, its
    time infinite: another serves the run. When every one fails, the first failure is raised."""
    best = [float("inf")] * len(options)
    failed: dict[int, BaseException] = {}

    def attempt(i: int) -> float:
        try:
            return step(options[i])
        except (RuntimeError, NotImplementedError) as e:  # torch.OutOfMemoryError is a RuntimeError
            failed[i] = e
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # what the failed attempt held, back for the next
            return float("inf")

    t = time.perf_counter()
    for i in range(len(options)):
        attempt(i)
    if len(failed) == len(options):
        raise failed[0]
    round_seconds = time.perf_counter() - t
    for r in range(rounds):  # at least one; another only if it fits before the deadline
        t = time.perf_counter()
        if r and t + round_seconds > deadline:
            break
        for i in range(len(options)):
            if i not in failed:
                best[i] = min(best[i], attempt(i))
        round_seconds = time.perf_counter() - t
    return best


def label(c: Choice) -> str:
    """'fp32 sdpa', 'bf16 explicit NCHW' (the layout named only when it is not the default NHWC)."""
    return f"{c.precision} {c.attention}" + ("" if c.channels_last else " NCHW")
