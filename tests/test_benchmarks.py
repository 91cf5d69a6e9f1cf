"""The GPU measurement scripts, rehearsed on the CPU: GPU time is scarce (one short session,
calls of at most 10 minutes, 8 files back), so every step of them runs here first, at tiny
sizes, on synthetic CIFAR files."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from tests.datafiles import write_cifar10

REPO = Path(__file__).resolve().parents[1]
STEPS = ("step", "pipeline", "epoch", "reference", "compile")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("cifar")
    write_cifar10(data, per_batch=40)  # 200 training images
    return data


def test_gpu_script_rehearses_every_step_on_the_cpu_and_keeps_each_result_as_it_goes(cifar, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "REHEARSE_DATA": str(cifar), "OMP_NUM_THREADS": "1"}
    env.pop("BENCH_HISTORY", None)
    history = (REPO / "benchmarks" / "HISTORY.md").read_bytes()
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--rehearse"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=500)
    log = (out / "log.txt").read_text()
    assert done.returncode == 0, done.stdout + log[-3000:]
    for step in STEPS:
        assert f"== {step}: exit 0" in log
    runs = _module("common").history_entries((out / "HISTORY-gpu.md").read_text())
    assert [r["title"].split(" (")[0] for r in runs] == [
        "Training step throughput", "Data pipeline throughput", "One CIFAR-10 epoch, end to end",
        "One reference-cifar10 epoch", "Training step throughput"]
    assert all("--device cpu" in r["command"] for r in runs)
    assert "One epoch of the 45000 training images" in log  # projected to CIFAR-10's split, not the subset's
    assert len(list(out.iterdir())) <= 8  # what the device tool sends back
    assert (REPO / "benchmarks" / "HISTORY.md").read_bytes() == history  # the repository's record untouched


def test_a_failed_step_is_reported_and_an_unknown_one_refused(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "REHEARSE_DATA": str(tmp_path / "missing"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--rehearse", "pipeline"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "a step failed: see log.txt" in done.stdout and "0 result(s)" in done.stdout
    assert "== pipeline: exit 1" in (out / "log.txt").read_text()
    bad = subprocess.run(["bash", "benchmarks/gpu.sh", "warp"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown step: warp" in bad.stdout


@pytest.mark.parametrize("dataset, val_size, val_is_test, full", [("cifar10", 0.1, False, 45_000),
                                                                  ("cifar10", 5000, False, 45_000),
                                                                  ("cifar100", 0, True, 50_000)])
def test_reference_epoch_projects_the_full_training_split(dataset, val_size, val_is_test, full):
    assert _module("reference_epoch").full_train_images(dataset, val_size, val_is_test) == full


def test_gpu_accuracy_script_trains_to_its_budget_and_sends_back_at_most_8_files(cifar, tmp_path):
    halves = _module("cifar_halves")
    parts = tmp_path / "parts"
    halves.pack(cifar, "cifar10", parts / ".gpudata-a", parts / ".gpudata-b")
    out, machine = tmp_path / "out", tmp_path / "machine"
    env = {**os.environ, "OUT": str(out), "DATA": str(machine), "OMP_NUM_THREADS": "1", "BUDGET": "15s"}
    for call in (["stage"], ["train", "fast-cifar10-gpu", "--device", "cpu", "--depth", "1", "--dim", "32", "--heads",
                             "2", "--mlp-dim", "32", "--batch-size", "32", "--eval-batch-size", "64", "--val-size", "20"]):
        done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_accuracy.sh"), *call], cwd=parts, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    sent = sorted(p.name for p in out.iterdir() if p.name != "stage.txt")
    assert sent == sorted(["gpu.txt", "train.log", "HISTORY-gpu.md", "results.md", "results.json", "metrics.csv",
                           "loss_curve.png"])
    [run] = _module("common").history_entries((out / "HISTORY-gpu.md").read_text())  # what `merge` brings in
    assert run["command"].strip("`").startswith("BUDGET=15s bash benchmarks/gpu_accuracy.sh train fast-cifar10-gpu")
    assert "| Test |" in run["text"] and "time budget" in run["text"]


def test_speedrun_times_each_target_per_seed_and_summarises_them(tmp_path):
    """benchmarks/speedrun.py on the embedded digits: real runs, each seed's curve from its
    metrics.csv clock, the time to each target, mean and spread, the plot; a second call reads
    the finished seeds instead of training them again."""
    import json
    import sys

    cmd = [sys.executable, "benchmarks/speedrun.py", "digits", "--data-dir", str(tmp_path), "--seeds", "0", "1",
           "--targets", "0.3", "0.999", "--set", "epochs=6", "--set", "depth=1", "--set", "tta_flip=true",
           "--set", "optimizer=muon", "--set", "ema_decay=0.9",
           "--label", "t", "--runs", str(tmp_path), "--no-record"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [line for line in first.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| seed | epochs | test acc | best val acc | s to val 0.3 | s to val 0.999 |")
    assert rows[1].startswith("| 0 | 6 |") and rows[2].startswith("| 1 | 6 |")
    assert "(2/2) | - (0/2) |" in rows[3]  # 0.3 reached by both seeds, 0.999 by none
    record = json.loads((tmp_path / "digits-t" / "seed0" / "speedrun.json").read_text())
    assert [round(a, 6) for _, a in record["curve"]] and all(s > 0 for s, _ in record["curve"])
    assert "--tta-flip" in record["command"] and (tmp_path / "digits-t.png").stat().st_size > 10_000
    import csv
    import statistics

    best = {k: [max(float(r[k]) for r in csv.DictReader((tmp_path / "digits-t" / f"seed{s}" / "metrics.csv").read_text().splitlines()))
                for s in (0, 1)] for k in ("val_acc", "val_ema_acc")}
    assert (f"best validation accuracy {statistics.mean(best['val_acc']):.4f} ± {statistics.stdev(best['val_acc']):.4f} raw, "
            f"{statistics.mean(best['val_ema_acc']):.4f} ± {statistics.stdev(best['val_ema_acc']):.4f} EMA") in first.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert "seed0: " in first.stdout and "seed0: " not in again.stdout and rows == [r for r in again.stdout.splitlines() if r.startswith("| ")]
    # time to the same accuracy against another series (here seed 0 against both seeds), from the records
    one = [*cmd[:cmd.index("--seeds") + 1], "0", *cmd[cmd.index("--seeds") + 3:]]
    side = subprocess.run([*one, "--against", "digits-t"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env)
    assert side.returncode == 0 and "seed0: " not in side.stdout, side.stderr[-3000:]
    runs = [json.loads((tmp_path / "digits-t" / f"seed{s}" / "speedrun.json").read_text()) for s in (0, 1)]
    reach = [next(t for t, a in r["curve"] if a >= 0.3) for r in runs]
    assert (f"| 0.3000 | {reach[0]:.1f} ± 0.0 | {statistics.mean(reach):.1f} ± {statistics.stdev(reach):.1f} | "
            f"{reach[0] / statistics.mean(reach):.2f} |") in side.stdout
    common = min(max(a for _, a in r["curve"]) for r in runs)
    assert f"| {common:.4f} (the highest all reached) |" in side.stdout and "| 0.9990 |" not in side.stdout
    missing = subprocess.run([*one, "--against", "nothing-here"], cwd=REPO, capture_output=True, text=True,
                             timeout=120, env=env)
    assert missing.returncode == 2 and "--against nothing-here: no finished runs" in missing.stderr


def test_pretrained_series_compares_scratch_with_fine_tuned_and_balancing(tmp_path):
    """benchmarks/pretrained.py at tiny sizes on synthetic CIFAR: the CIFAR-100 run whose best/
    the fine-tuned arms start from (their manifests say so), the few-shot and full arms, the
    10:1 folder it writes (and its arms with and without balancing), one table per part, the
    plot; a second call reads every finished run instead of training it again."""
    import json
    import sys

    from tests.datafiles import write_cifar100

    data = tmp_path / "data"
    written = write_cifar10(data, per_batch=40, seed=3)  # every class in its 40 test images
    write_cifar100(data, n=60)
    labels = [y for i in range(1, 6) for y in written[f"data_batch_{i}"][1]]
    runs = tmp_path / "series"
    cmd = [sys.executable, "benchmarks/pretrained.py", "--data-dir", str(data), "--runs", str(runs), "--seeds", "0",
           "--imbalance-seeds", "0", "--pretrain-epochs", "1", "--fewshot-epochs", "2", "--full-epochs", "1", "--imbalance-epochs", "1",
           "--major", "20", "--no-record", "--extra", "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32",
           "--val-size", "0.2", "--batch-size", "16", "--no-tta-flip"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    heads = [line for line in first.stdout.splitlines() if line.startswith("| arm |")]
    assert len(heads) == 3 and "rare-class recall" in heads[2]
    for arm in ("scratch", "fine-tuned"):
        assert sum(line.startswith(f"| {arm} | 1 |") for line in first.stdout.splitlines()) == 2
    tuned = json.loads((runs / "fewshot-fine-tuned-s0" / "results.json").read_text())["init_from"]
    assert tuned["folder"].endswith("pretrain-cifar100/best") and tuned["kind"] == "vitlab"
    assert json.loads((runs / "fewshot-scratch-s0" / "results.json").read_text())["init_from"] is None
    folder = runs / "imbalanced-cifar10-20"
    counts = {d.name: len(list(d.iterdir())) for d in (folder / "train").iterdir()}
    assert counts == {f"class{c}": min(labels.count(c), 20 if c < 5 else 2) for c in range(10)}
    assert (folder / "rare.txt").read_text().split() == [f"class{c}" for c in range(5, 10)]
    balanced = (runs / "imbalance-balanced-s0" / "config.yaml").read_text()
    assert "class_weights: balanced" in balanced
    assert runs.with_suffix(".png").stat().st_size > 10_000
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and "vitlab.cli train" not in again.stdout
    assert [r for r in again.stdout.splitlines() if r.startswith("| ")] == [
        r for r in first.stdout.splitlines() if r.startswith("| ")]


def test_tta_series_flips_only_the_unsure_images_and_matches_vitlab_at_both_ends(tmp_path):
    """benchmarks/tta.py on two real (tiny) digits runs: at t = 0 the accuracy of plain evaluation,
    at t = 1 that of --tta-flip, the share flipped rising with t, one row per checkpoint and a mean."""
    import sys

    from vitlab.config import default_config
    from vitlab.evaluate import evaluate_checkpoint
    from vitlab.train import train

    runs = []
    for seed in (0, 1):
        cfg = default_config().replace(out=str(tmp_path), name=f"s{seed}", seed=seed, epochs=3, depth=1,
                                       tensorboard=False, precision="fp32")
        runs.append(train(cfg, progress=False, log=lambda s: None).run_dir / "best")
    cmd = [sys.executable, "benchmarks/tta.py", *map(str, runs), "--precision", "fp32", "--no-record"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith((f"| {tmp_path.name}/", "| mean"))]
    assert [r[0] for r in rows] == [f"| {tmp_path.name}/s0", f"| {tmp_path.name}/s1", "| mean (n=2)"]
    for run, row in zip(runs, rows):
        never, always = float(row[1].split()[0]), float(row[7].split()[0])
        assert never == pytest.approx(evaluate_checkpoint(run, tta_flip=False, precision="fp32")["Test"][1], abs=1e-4)
        assert always == pytest.approx(evaluate_checkpoint(run, tta_flip=True, precision="fp32")["Test"][1], abs=1e-4)
        shares = [float(cell.split("(")[1].rstrip("%)")) for cell in row[1:8]]
        assert shares[0] == 0 and shares[-1] == 100 and shares == sorted(shares)
