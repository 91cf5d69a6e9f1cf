"""Looking at runs and deciding the next one: TensorBoard, vitlab compare, per-class results,
training to a time budget, progress that tells the truth."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vitlab import budget as budgets
from vitlab.budget import format_duration, parse_duration
from vitlab.cli import cli
from vitlab.config import default_config
from vitlab.errors import ConfigError, TrainingInterrupted
from vitlab.report import per_class_table, read_metrics
from vitlab.train import train

from .datafiles import write_idx_dataset

TINY = dict(depth=1, dim=32, heads=2, mlp_dim=32, log_every=4)
QUIET = dict(progress=False, log=lambda s: None)


# ------------------------------------------------------------ TensorBoard

def _events(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}, acc.Tags()


def test_tensorboard_events_equal_metrics_and_survive_a_resume(tmp_path):
    cfg = default_config().replace(out=str(tmp_path), epochs=3, **TINY)
    straight = train(cfg.replace(name="straight"), **QUIET).run_dir
    with pytest.raises(TrainingInterrupted):
        train(cfg.replace(name="resumed"), stop_when=lambda s: s.step >= 27, **QUIET)  # mid-epoch 2, after a log
    resumed = train(resume=tmp_path / "resumed", **QUIET).run_dir
    a, tags = _events(straight)
    b, _ = _events(resumed)
    rows = read_metrics(straight / "metrics.csv")
    for row in rows:  # every per-epoch scalar is metrics.csv's value, at the epoch's last step
        for key, tag in (("train_loss", "train/loss"), ("train_acc", "train/accuracy"), ("val_loss", "val/loss"),
                         ("val_acc", "val/accuracy"), ("lr", "train/epoch_lr")):
            assert a[tag][row["step"]] == pytest.approx(row[key], rel=1e-6), (tag, row)
    steps = rows[-1]["step"]
    assert sorted(a["train/step_loss"]) == list(range(1, steps + 1)) and len(a["train/lr"]) == steps
    for tag in ("train/step_loss", "train/lr", "train/loss", "val/accuracy", "val/loss"):  # the resumed curves are the same
        assert b[tag] == pytest.approx(a[tag], rel=1e-6), tag
    assert {"predictions", "attention", "confusion"} <= set(tags["images"])
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    plugins = EventAccumulator(str(straight / "tb"))
    plugins.Reload()
    assert "_hparams_/session_start_info" in plugins.PluginTagToContent("hparams")  # the HParams view
    results = json.loads((straight / "results.json").read_text())["results"]
    assert a["hparam/test_acc"][rows[-1]["step"]] == pytest.approx(results["Test"]["accuracy"], rel=1e-6)


def test_no_tensorboard_writes_no_events(tmp_path):
    run = train(default_config().replace(out=str(tmp_path), epochs=1, tensorboard=False, **TINY), **QUIET).run_dir
    assert not (run / "tb").exists()


# ----------------------------------------------------------------- compare

def test_compare_real_run_folders(tmp_path):
    base = default_config().replace(out=str(tmp_path / "runs"), epochs=2, **TINY)
    train(base.replace(name="lr-high", lr=3e-3), **QUIET)
    train(base.replace(name="lr-low", lr=1e-3), **QUIET)
    with pytest.raises(TrainingInterrupted):
        train(base.replace(name="stopped", epochs=3), stop_when=lambda s: s.step >= 20, **QUIET)
    write_idx_dataset(tmp_path / "d" / "mnist", n_train=40, n_test=20)
    train(base.replace(name="other", dataset="mnist", data_dir=str(tmp_path / "d"), val_size=10, patch_size=7,
                       epochs=1, batch_size=10), **QUIET)
    (tmp_path / "runs" / "notes").mkdir()
    out = tmp_path / "cmp"
    result = CliRunner().invoke(cli, ["compare", str(tmp_path / "runs" / "*"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "comparison.md").read_text()
    header = md.splitlines()[2]
    assert "lr" in header and "epochs" in header and "best val acc" in header and "images/s" in header
    assert "| lr-high | digits | finished | " in md and "| lr-low |" in md
    assert "unfinished (1 of 3 epochs)" in md and "mnist (other dataset)" in md
    assert "not vitlab runs" in result.output and "notes" in result.output
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    lines = [line for line in md.splitlines() if line.startswith("| lr-")]
    assert len(lines) == 2 and all(re.search(r"\| 0\.\d{4} \| 0\.\d{4} \| 2/2 \| \d+ s \| [\d,]+ \|$", line) for line in lines)


# --------------------------------------------------------------- per class

def test_results_have_per_class_accuracy_and_a_confusion_matrix(digits_run):
    results = json.loads((digits_run / "results.json").read_text())
    confusion = torch.tensor(results["confusion"])
    assert confusion.shape == (10, 10) and int(confusion.sum()) == 359  # the test set
    assert float(confusion.diag().sum()) / 359 == pytest.approx(results["results"]["Test"]["accuracy"], abs=1e-9)
    md = (digits_run / "results.md").read_text()
    section = md.split("## Per-class accuracy (test)")[1]
    assert len([line for line in section.splitlines() if re.match(r"\| \d \| \d+ \| [01]\.\d{4} \|", line)]) == 10
    assert (digits_run / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    printed = CliRunner().invoke(cli, ["evaluate", str(digits_run / "best"), "--device", "cpu"]).output
    assert "Per-class accuracy (test)" in printed and printed.count("\n| ") >= 14


def test_many_classes_are_listed_worst_first():
    g = torch.Generator().manual_seed(0)
    confusion = torch.randint(0, 5, (30, 30), generator=g) + torch.diag(torch.randint(0, 60, (30,), generator=g))
    lines = per_class_table(confusion, [f"c{i}" for i in range(30)]).splitlines()[2:]
    accs = [float(line.split(" | ")[2]) for line in lines]
    assert len(accs) == 30 and accs == sorted(accs)


# ------------------------------------------------------------- time budget

@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("bad", ["soon", "-5m", "0s", "3d", ""])
def test_bad_durations_are_one_line(bad):
    with pytest.raises(ConfigError, match="--time-budget"):
        parse_duration(bad)


@pytest.mark.parametrize("budget, steps", [(100.0, 811), (12.0, 46)])
def test_a_budget_plan_fills_the_time_left_with_whole_epochs_then_a_partial_one(budget, steps, monkeypatch):
    monkeypatch.setattr(budgets, "REPORT_SECONDS", 5.0)  # the report's fixed part, as the arithmetic below counts it
    # 0.1 s a step, 100 steps an epoch, 1 s of validation after each, 5.832 s of final report:
    # 8 whole epochs (88 s) and 11 steps of a ninth in 96 s; in 11.52 s, 46 steps of the first
    plan = budgets.plan(budget, 0.1, 1e-3, 100, 1000, 0, 1, 1, max_steps=10**9, since=time.perf_counter())
    assert plan.steps == steps and plan.epochs == -(-steps // 100)
    assert budget * budgets.SAFETY - 0.1 < plan.predicted <= budget * budgets.SAFETY
    assert f"{steps} steps fit" in plan.describe()
    assert budgets.plan(budget, 0.1, 1e-3, 100, 1000, 0, 1, 1, max_steps=40, since=time.perf_counter()).steps == 40


def test_a_budget_is_replanned_whenever_the_pace_the_run_keeps_moves_its_end(monkeypatch):
    monkeypatch.setattr(budgets, "REPORT_SECONDS", 5.0)  # the report's fixed part, as the arithmetic below counts it
    # as planned: 0.1 s a step, 100 steps an epoch, 1 s per epoch end, 5.832 s of report; 811 steps end at 96 s
    plan = budgets.plan(100.0, 0.1, 1e-3, 100, 1000, 0, 1, 1, max_steps=10**9, since=time.perf_counter())
    assert plan.steps == 811
    assert plan.replan(90, 0, 0.1, None, 9.0) is None  # on pace: nothing to do
    # at step 90, 30 s in, the machine is shared and a step takes 0.2 s: the epoch ends and the report are
    # taken to be twice as slow too (2 s, 11.664 s). 321 steps (4 epoch ends) end at 95.864 s; 322 at 96.064 s
    assert plan.replan(90, 0, 0.2, None, 30.0) == 321
    assert plan.replan(95, 0, 0.2, None, 31.0) is None  # the new plan holds
    # faster again (0.05 s a step, epoch ends measured at 0.5 s) and 10 s after the last re-plan: longer.
    # 1161 steps: 40 + 961 * 0.05 + (12 - 2) * 0.5 + 2.916 = 95.966 s; one more step passes 96 s
    assert plan.replan(200, 2, 0.05, 0.5, 40.0) == 1161
    assert plan.replan(210, 2, 0.01, 0.5, 42.0) is None  # earlier than the aim, but re-planned 2 s ago
    assert plan.replan(1100, 11, 0.3, 0.5, 95.0) == 1100  # out of time: the run ends where it is
    assert "811 steps fit" in plan.describe() and plan.describe().count("re-planned at step") == 3


def test_the_report_is_taken_to_slow_down_as_one_thread_among_the_processes_beside_it(monkeypatch):
    monkeypatch.setattr(budgets, "REPORT_SECONDS", 5.0)  # the report's fixed part, as the arithmetic below counts it
    plan = budgets.plan(100.0, 0.1, 1e-3, 100, 1000, 0, 1, 1, max_steps=10**9, since=time.perf_counter())
    assert plan.replan(90, 0, 0.1, None, 9.0, report_slowdown=1.0) is None  # on pace, nobody beside it
    # the steps keep their pace on the thread left free, but the report's one thread shares the cores with the
    # others: its fixed part twice as slow, its evaluation as fast as the steps (0.832 + 10 s). 771 steps (8 epoch
    # ends) end at 9 + 68.1 + 8 + 10.832 = 95.932 s; 772 at 96.032 s
    assert plan.replan(90, 0, 0.1, None, 9.0, report_slowdown=2.0) == 771
    share = budgets.CoreShare()
    share.cores = 2
    for busy, queued, slowdown in ((0.0, 0, 1.0), (1.0, 0, 1.0), (3.0, 0, 2.0), (1.8, 5, 3.0), (0.0, 3, 2.0)):
        share.busy = busy  # cores' worth of busy time, which cannot pass the cores: the run queue tells more
        assert share.one_thread_slowdown(queued) == slowdown


def test_the_run_queue_counts_the_threads_of_other_processes(tmp_path):
    if budgets.CoreShare.runnable() is None:
        pytest.skip("reads /proc/stat")
    share = budgets.CoreShare()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(share.cores + 2)]
    try:
        time.sleep(1.0)
        share.read_queue(own=1, readings=5)
        queued = share.queued()
    finally:
        for p in busy:
            p.kill()
            p.wait()
    # more than busy time can show (at most the cores); the other test worker may add to it
    assert queued >= share.cores + 1, queued
    assert share.one_thread_slowdown(queued) >= (share.cores + 2) / share.cores


def test_a_budget_run_chooses_its_threads_before_timing_its_steps(tmp_path, monkeypatch):
    """Other processes busy since the start, as the `vitlab` command's CoreShare has seen them from
    the process start: the steps are timed, and trained, on the cores they leave free (timed on
    threads that wait for busy cores, a plan came out ten times too short)."""
    def busy(share):
        share.busy = 1.6
        return share.busy

    monkeypatch.setattr(budgets.CoreShare, "others", busy)
    monkeypatch.setattr(budgets, "_cli_share", budgets.CoreShare())
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run = train(default_config().replace(out=str(tmp_path), name="t", time_budget="10s", **TINY), **QUIET).run_dir
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    cores = budgets.CoreShare().cores
    if cores == 2:
        assert "before the calibration: other processes kept 1.6 of 2 cores busy, so 1 thread(s) instead of 2" in (
            run / "config.yaml").read_text()
    assert used == max(1, min(2, int(cores - 1.6 + 0.5)))


def test_a_budget_with_no_room_left_for_the_attention_figure_leaves_it_out(tmp_path, monkeypatch):
    """Fifty cores' worth of other processes, as /proc/stat would show them: the run re-plans to end
    where it is, and the report draws what it must (the table, the curves, the predictions) but
    not attention.png, and says so."""
    def crowded(share):
        share.busy = 50.0
        return share.busy

    monkeypatch.setattr(budgets.CoreShare, "others", crowded)
    lines = []
    cfg = default_config().replace(out=str(tmp_path), name="c", time_budget="20s", **TINY)
    t = time.monotonic()
    run = train(cfg, progress=False, log=lines.append).run_dir
    assert time.monotonic() - t < 20
    assert "re-planned at step" in (run / "config.yaml").read_text()
    assert {"loss_curve.png", "predictions.png", "confusion.png"} <= {p.name for p in run.iterdir()}
    assert not (run / "attention.png").exists()
    assert "no attention.png (no room left in the time budget; `vitlab explain" in (run / "results.md").read_text()
    assert any(line.startswith("time budget: attention.png left out") for line in lines), lines


def test_the_pace_leaves_epoch_ends_out_and_forgets_old_steps():
    pace = budgets.Pace(window=10.0, min_span=2.0)
    pace.mark(0.0, 0)
    pace.mark(1.0, 10)
    assert pace.seconds_per_step() is None  # a span of 1 s is not trusted yet
    pace.epoch_end(5.0)  # 5 s of validation and checkpoints, not training
    pace.mark(8.0, 30)
    assert pace.seconds_per_step() == pytest.approx(3.0 / 30) and pace.epoch_end_seconds() == 5.0
    for t in range(9, 40):  # a slower machine: 0.5 s a step from here
        pace.mark(t, 30 + 2 * (t - 8))
    assert pace.seconds_per_step() == pytest.approx(0.5)  # the window holds only recent steps
    pace.restart()  # another thread count from now: nothing before it counts, the last mark neither
    pace.mark(40.0, 70)
    assert pace.seconds_per_step() is None
    pace.mark(42.0, 90)
    assert pace.seconds_per_step() == pytest.approx(0.1)


def test_other_processes_on_the_cores_are_seen_and_leave_one_thread(tmp_path):
    if not Path("/proc/stat").is_file():
        pytest.skip("reads /proc/stat")
    share = budgets.CoreShare()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(share.cores)]
    try:
        time.sleep(budgets.SHARE_SECONDS + 1.0)
        others = share.others()
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert others is not None and others >= 0.6 * share.cores, others
    share.others = lambda: float(share.cores)  # every core busy: one thread
    assert share.threads(share.cores) == 1
    share.others = lambda: 0.0  # none: all of them
    assert share.threads(share.cores) == share.cores


def test_a_budget_holds_beside_processes_that_keep_every_core_busy(tmp_path):
    """The issue's case at a smaller scale: the run measures its speed with the cores free, then
    competitors start. It must notice, re-plan, and end within its budget."""
    budget = 20.0
    cmd = [sys.executable, "-m", "vitlab", "train", "--out", str(tmp_path), "--name", "b", "--time-budget", "20s",
           "--depth", "2", "--dim", "64", "--heads", "4", "--mlp-dim", "128", "--batch-size", "32", "--log-every", "5"]
    t = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    while not (tmp_path / "b" / "config.yaml").exists():  # the plan is made: the cores fill up
        assert proc.poll() is None and time.monotonic() - t < 60
        time.sleep(0.05)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    wall = time.monotonic() - t
    assert proc.returncode == 0, out
    # (67ba085's code: 42.7 s for 24 s. Here three processes share two cores with this one, the other test
    # worker among them, and the final report slows with them: a margin for that)
    assert wall <= 1.15 * budget, (wall, out[-3000:])
    assert "time budget 20s: measured" in out and "done: best epoch" in out


def test_a_run_fits_its_time_budget_and_resumes_with_its_decision(tmp_path):
    budget = 20.0
    cmd = [sys.executable, "-m", "vitlab", "train", "--out", str(tmp_path), "--name", "b", "--time-budget", "20s",
           "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--quiet"]
    t = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ})
    wall = time.monotonic() - t
    assert done.returncode == 0, done.stderr
    # most of it used and not much over: 10% on an idle machine (benchmarks/time_budget.py records it); here the
    # other test worker's subprocesses come and go after vitlab has measured its speed, hence the wider bound
    assert 0.6 * budget <= wall <= 1.25 * budget, (wall, done.stdout + done.stderr)
    config = (tmp_path / "b" / "config.yaml").read_text()
    assert config.startswith("# time budget 20s: measured") and "steps fit" in config
    epochs = int(re.search(r"^epochs: (\d+)$", config, re.M).group(1))
    assert epochs > 3 and len(read_metrics(tmp_path / "b" / "metrics.csv")) == epochs
    assert "time budget" in (tmp_path / "b" / "results.md").read_text()
    assert "done: best epoch" in done.stdout + done.stderr
    # interrupted and resumed, a budget run continues with the epochs it chose
    cfg = default_config().replace(out=str(tmp_path), name="r", time_budget="10s", **TINY)
    with pytest.raises(TrainingInterrupted):
        train(cfg, stop_when=lambda s: s.step >= 30, **QUIET)
    chosen = default_config().load_yaml(tmp_path / "r" / "config.yaml").epochs
    resumed = train(resume=tmp_path / "r", **QUIET)
    assert resumed.epochs == chosen


def test_a_budget_too_short_is_refused_before_a_folder_exists(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--out", str(tmp_path), "--time-budget", "2s", "--quiet"])
    assert result.exit_code == 1 and "--time-budget 2s is too short here" in result.output and "give at least" in result.output
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- progress

def test_progress_shows_the_runs_eta_and_ends_with_a_summary(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vitlab", "train", "--out", str(tmp_path), "--name", "p", "--epochs", "2",
                          "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--log-every", "5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "run ETA" in text and "MFU" in text and "img/s" in text
    summary = [line for line in text.splitlines() if line.startswith("done: ")]
    assert len(summary) == 1 and "test accuracy 0." in summary[0] and str(tmp_path / "p" / "results.md") in summary[0]
