"""`auto` means measured (issue 18): each correct kernel is timed for the real shapes, the
fastest is kept and cached per device, and a flag or a resumed run is never second-guessed."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from vitlab import autotune
from vitlab.config import default_config
from vitlab.errors import TrainingInterrupted
from vitlab.model import ViTConfig
from vitlab.devices import native_bf16
from vitlab.train import train

KINDS = ["bf16", "fp32"] if native_bf16(torch.device("cpu")) else ["fp32"]  # bf16 only where the CPU has it
SMALL = ViTConfig(image_size=8, channels=1, num_classes=10, patch_size=2, depth=2, dim=32, heads=2, mlp_dim=64)
TINY = dict(depth=1, dim=32, heads=2, mlp_dim=32, log_every=4)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / autotune.CACHE_FILE


def _refuse_to_time(monkeypatch):
    def measure(*a, **k):
        raise AssertionError("timed although the choice was fixed or cached")

    monkeypatch.setattr(autotune, "measure", measure)


def _entries(cache) -> dict:
    return json.loads(cache.read_text())["entries"]


def test_auto_times_every_candidate_once_then_reads_the_cache(cache, monkeypatch):
    rng = torch.get_rng_state()
    first = autotune.choose(SMALL, torch.device("cpu"), batch=64, training=True)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's random stream is untouched
    assert first.source == "measured" and set(first.ms) == {f"{p} {a}" for p in KINDS for a in ("sdpa", "explicit")}
    assert all(v > 0 for v in first.ms.values())
    assert first.attention == min(first.ms, key=first.ms.get).split()[1]  # the fastest was kept
    (entry,) = _entries(cache).values()
    assert entry["attention"] == first.attention and entry["fingerprint"]["name"] == autotune.cpu_model()
    _refuse_to_time(monkeypatch)
    again = autotune.choose(SMALL, torch.device("cpu"), batch=64, training=True)
    assert (again.source, again.attention, again.precision) == ("cached", first.attention, first.precision)
    # other shapes, or inference instead of training, are other entries
    with pytest.raises(AssertionError, match="timed"):
        autotune.choose(SMALL, torch.device("cpu"), batch=32, training=True)
    with pytest.raises(AssertionError, match="timed"):
        autotune.choose(SMALL, torch.device("cpu"), batch=64, training=False)


def test_explicit_flags_are_never_timed(cache, monkeypatch):
    _refuse_to_time(monkeypatch)
    c = autotune.choose(SMALL, torch.device("cpu"), batch=64, training=True, attention="explicit", precision="bf16")
    assert (c.attention, c.precision, c.source) == ("explicit", "bf16", "fixed") and not cache.exists()


def test_the_conv_pool_tokenizer_also_times_its_layout(cache):
    cfg = ViTConfig(image_size=16, channels=1, num_classes=10, patch_size=4, patch_embed="conv-pool", depth=1, dim=32,
                    heads=2, mlp_dim=64)
    c = autotune.choose(cfg, torch.device("cpu"), batch=32, training=True)
    assert set(c.ms) == {f"{p} {a}{layout}" for p in KINDS for a in ("sdpa", "explicit") for layout in ("", " NCHW")}


@pytest.mark.parametrize("bad", [
    "{not json",
    json.dumps({"version": 1, "entries": "a string"}),
    "HOLE",  # filled in below: the measured key, with a choice that is not a candidate
    json.dumps({"version": 1, "entries": {}, "pad": "x" * (autotune.CACHE_LIMIT + 10)}),  # over the size limit
])
def test_a_corrupt_cache_is_ignored_not_trusted(cache, monkeypatch, bad):
    autotune.choose(SMALL, torch.device("cpu"), batch=64, training=True)
    (key,) = _entries(cache)
    if bad == "HOLE":
        bad = json.dumps({"version": 1, "entries": {key: {"attention": "os.system", "precision": "fp8",
                                                          "channels_last": "yes"}}})
    cache.write_text(bad)
    c = autotune.choose(SMALL, torch.device("cpu"), batch=64, training=True)
    assert c.source == "measured" and c.attention in autotune.ATTENTIONS
    assert _entries(cache)[key]["attention"] == c.attention  # rewritten with what was measured


def test_timing_a_reference_sized_model_takes_at_most_two_seconds(cache):
    ref = ViTConfig(image_size=32, channels=3, num_classes=10)  # 12 blocks, width 256: 3.5 s per batch of 128 here
    t = time.perf_counter()
    c = autotune.choose(ref, torch.device("cpu"), batch=128, training=True)
    assert c.source == "measured" and time.perf_counter() - t < 2.5  # 2 s of timing, and building the model


def _flip_cached_attention(cache) -> str:
    data = json.loads(cache.read_text())
    (entry,) = data["entries"].values()
    entry["attention"] = "explicit" if entry["attention"] == "sdpa" else "sdpa"
    cache.write_text(json.dumps(data))
    return entry["attention"]


def test_a_run_computes_as_chosen_and_a_resumed_run_as_it_started(cache, tmp_path, monkeypatch):
    lines = []
    cfg = default_config().replace(out=str(tmp_path), name="a", epochs=2, **TINY)
    with pytest.raises(TrainingInterrupted):
        train(cfg, progress=False, log=lines.append, stop_when=lambda s: s.step >= 5)
    measured = next(e for e in _entries(cache).values() if e["attention"])
    assert f"fp32 {measured['attention']} (measured)" in next(s for s in lines if s.startswith("vitlab:"))
    # the cache now says the other kernel; the resumed run keeps the one it trained with
    cached = _flip_cached_attention(cache)
    sdpa_calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))
    lines.clear()
    resumed = train(resume=tmp_path / "a", progress=False, log=lines.append)
    assert f"fp32 {measured['attention']} (resumed)" in next(s for s in lines if s.startswith("vitlab:"))
    assert bool(sdpa_calls) == (measured["attention"] == "sdpa")
    assert json.loads((resumed.run_dir / "results.json").read_text())["kernels"]["attention"] == measured["attention"]
    # a new run honours the cached choice
    sdpa_calls.clear()
    lines.clear()
    train(cfg.replace(name="b"), progress=False, log=lines.append)
    assert f"fp32 {cached} (cached)" in next(s for s in lines if s.startswith("vitlab:"))
    assert bool(sdpa_calls) == (cached == "sdpa")
