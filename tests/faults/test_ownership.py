"""vitlab writes, truncates or deletes only what it created or what the user named, never
through a link; and the run folder's life cycle knows every file the trainer writes.

Built for real: symbolic and hard links planted in place of every file a run writes, a
folder that only looks like a run, exports pointed at files that are not exports, an
export killed with SIGKILL, a run stopped by a NaN loss before its first checkpoint, and a
finished run resumed. Each case shows that nothing outside what the user named changed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from vitlab import report
from vitlab.cli import cli
from vitlab.config import default_config
from vitlab.errors import ConfigError, NonFiniteLoss
from vitlab.fileio import NotRegularFile, append_synced, owner_tag, sweep_stale, temp_dir
from vitlab.rundir import FIGURES, METRICS, RESULTS_JSON, RESULTS_MD, kind_of
from vitlab.train import train

from .test_hostile_inputs import snapshot

TINY = dict(epochs=2, depth=1, dim=32, heads=2, mlp_dim=32, tensorboard=False)
QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train(default_config().replace(out=str(out), name="r", **TINY), **QUIET).run_dir


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / run.name
    shutil.copytree(run, dst, symlinks=True)
    return dst


def _outside(tmp_path: Path, name: str = "precious.txt") -> Path:
    target = tmp_path / "elsewhere" / name
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(b"years of work\n")
    return target


# ---------------------------------------------------------------- the run lock

@pytest.mark.parametrize("link", ["symbolic", "hard"])
@pytest.mark.parametrize("command", ["resume", "overwrite"])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(finished, tmp_path, link, command):
    run = _copy(finished, tmp_path)
    target = _outside(tmp_path)
    (run / ".lock").unlink()
    (os.symlink if link == "symbolic" else os.link)(target, run / ".lock")
    before = snapshot(tmp_path / "elsewhere")
    args = ["--resume", str(run)] if command == "resume" else ["--out", str(run.parent), "--name", run.name,
                                                                "--overwrite", "--epochs", "1"]
    result = CliRunner().invoke(cli, ["train", *args, "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    kind = "is a symbolic link" if link == "symbolic" else "has another name (a hard link)"
    assert f".lock {kind}" in result.output and "delete" in result.output, result.output
    assert snapshot(tmp_path / "elsewhere") == before  # not truncated, not rewritten
    assert run.is_dir() and (run / "best").is_dir()  # and the run is still there


# ------------------------------------------------------- every other file of a run

def test_links_planted_for_every_file_a_run_writes_are_replaced_never_written_through(finished, tmp_path):
    """A finished run, every file the trainer writes by rename or append swapped for a link to
    a file outside (symbolic ones, and a hard link for the one file appended to): resuming it
    rewrites the report and leaves every target as it was."""
    run = _copy(finished, tmp_path)
    names = [METRICS, RESULTS_MD, RESULTS_JSON, *FIGURES]
    for name in names:  # each link's target holds what the file held: the run reads through them
        target = _outside(tmp_path, name)
        target.write_bytes((run / name).read_bytes())
        (run / name).unlink()
        os.symlink(target, run / name)
    before = snapshot(tmp_path / "elsewhere")
    result = train(resume=run, **QUIET)
    assert result.results["Test"][1] > 0.1
    assert snapshot(tmp_path / "elsewhere") == before
    for name in names:  # each is now a file of the run's own
        assert (run / name).is_file() and not (run / name).is_symlink(), name
    assert report.read_metrics(run / METRICS)


def test_links_planted_where_compare_and_explain_write_are_replaced_never_written_through(finished, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    out.mkdir()
    names = ["comparison.md", "comparison.png", "test-correct-gradient.png", "test-mistaken-gradient.png",
             "x-gradient.png"]
    for name in names:
        os.symlink(_outside(tmp_path, name), out / name)
    before = snapshot(tmp_path / "elsewhere")
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    for args in (["compare", str(finished), "--out", str(out)],
                 ["explain", str(finished / "best"), "--split", "test", "--count", "8", "--out", str(out)],
                 ["explain", str(finished / "best"), str(tmp_path / "x.png"), "--out", str(out)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, (args, result.output)
    assert snapshot(tmp_path / "elsewhere") == before
    assert all((out / n).is_file() and not (out / n).is_symlink() for n in names)


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_appending_to_a_metrics_file_that_is_a_link_rewrites_it_instead(tmp_path, link):
    target = tmp_path / "elsewhere.csv"
    rows = [{"epoch": 1, "step": 5, "lr": 0.1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5}]
    report.write_metrics(target, rows)
    before = target.read_bytes()
    path = tmp_path / "run" / METRICS
    path.parent.mkdir()
    (os.symlink if link == "symbolic" else os.link)(target, path)
    with pytest.raises(NotRegularFile):
        append_synced(path, b"x\n")
    report.append_metrics(path, rows + [{**rows[0], "epoch": 2, "step": 10}])
    assert target.read_bytes() == before
    assert not path.is_symlink() and [r["epoch"] for r in report.read_metrics(path)] == [1, 2]


@pytest.mark.parametrize("plant", ["tb", "last", "config.yaml"])
def test_a_link_where_a_run_keeps_a_folder_or_its_config_is_refused(finished, tmp_path, plant):
    run = _copy(finished, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    if plant == "config.yaml":
        _outside(tmp_path, "config.yaml").write_text((run / "config.yaml").read_text())
        (run / "config.yaml").unlink()
    else:
        shutil.copytree(run / plant, elsewhere / plant) if (run / plant).exists() else (elsewhere / plant).mkdir(parents=True)
        shutil.rmtree(run / plant, ignore_errors=True)
    os.symlink(elsewhere / plant, run / plant)
    before = snapshot(elsewhere)
    result = CliRunner().invoke(cli, ["train", "--resume", str(run), "--quiet"])
    assert result.exit_code == 1 and "not a vitlab run folder" in result.output and "Traceback" not in result.output
    assert snapshot(elsewhere) == before


# -------------------------------------------------------- what counts as a run

@pytest.mark.parametrize("case", ["empty config", "foreign config", "run plus a foreign file"])
def test_overwrite_deletes_only_a_folder_of_nothing_but_vitlabs_files(finished, tmp_path, case):
    victim = tmp_path / "runs" / "r"
    if case == "run plus a foreign file":
        victim = _copy(finished, tmp_path)
        (victim / "notes.txt").write_text("mine")
    else:
        victim.mkdir(parents=True)
        (victim / "config.yaml").write_text("" if case == "empty config" else "title: my thesis\n")
        (victim / "metrics.csv").write_text("anything\n")
    before = snapshot(victim)
    result = CliRunner().invoke(cli, ["train", "--out", str(victim.parent), "--name", "r", "--overwrite", "--quiet",
                                      "--epochs", "1"])
    assert result.exit_code == 1 and "is not a vitlab run folder" in result.output, result.output
    assert ("notes.txt" in result.output) if case == "run plus a foreign file" else "no run config" in result.output
    assert snapshot(victim) == before


def test_a_run_stopped_before_its_first_checkpoint_can_be_resumed_and_replaced(tmp_path):
    """The issue's case: stopped by a NaN loss before any checkpoint, the folder holds
    config.yaml, .lock and tb/ (TensorBoard on): --resume starts it again, and a new run of
    the same name replaces it without --overwrite."""
    cfg = default_config().replace(out=str(tmp_path), name="n", **{**TINY, "tensorboard": True}, lr=1e30,
                                   log_every=1)
    with pytest.raises(NonFiniteLoss):
        train(cfg, **QUIET)
    run = tmp_path / "n"
    assert (run / "tb").is_dir() and not (run / "last").exists() and kind_of(run) == "unstarted"
    said = []
    with pytest.raises(NonFiniteLoss):  # it gets past the folder check, starts again, and meets the NaN again
        train(resume=run, progress=False, log=said.append)
    assert any("starting it again from the beginning" in s for s in said)
    result = train(cfg.replace(lr=1e-3), **QUIET)  # same name, no --overwrite
    assert result.run_dir == run and (run / "best").is_dir()


def test_resuming_a_finished_run_logs_its_report_to_tensorboard_once(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = default_config().replace(out=str(tmp_path), name="t", **{**TINY, "tensorboard": True})
    train(cfg, **QUIET)
    train(resume=tmp_path / "t", **QUIET)  # finished: it only writes its report again

    def counts():
        acc = EventAccumulator(str(tmp_path / "t" / "tb"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
        acc.Reload()
        return ({tag: len(acc.Images(tag)) for tag in acc.Tags()["images"]},
                {tag: len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"]})

    images, scalars = counts()
    assert images == {"predictions": 1, "attention": 1, "confusion": 1}
    assert scalars["hparam/test_acc"] == 1 and scalars["val/accuracy"] == 2  # two epochs, each once
    plugin = [f for f in (tmp_path / "t" / "tb").iterdir() if "tfevents" in f.name]
    assert sum("vitlab-report" in f.name for f in plugin) == 1


# ------------------------------------------------------------------- exports

@pytest.mark.parametrize("fmt", ["onnx", "timm", "hf"])
def test_export_refuses_an_out_that_is_not_an_earlier_export(finished, tmp_path, fmt):
    pytest.importorskip("onnx")
    run = _copy(finished, tmp_path)
    weights = run / "best" / "model.safetensors"
    outside = _outside(tmp_path)
    cases = [weights, run / "best", tmp_path / "link"]
    os.symlink(outside, tmp_path / "link")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "vitlab-export.json").write_text('{"format": "vitlab-%s"}' % fmt)
    (mine / "thesis.tex").write_text("mine")  # an export's report, and a file no export writes
    cases.append(mine)
    for out in cases:
        before = snapshot(tmp_path)
        result = CliRunner().invoke(cli, ["export", str(run / "best"), "--format", fmt, "--out", str(out)])
        assert result.exit_code == 1 and "choose another --out" in result.output, (out, result.output)
        assert "Traceback" not in result.output
        assert snapshot(tmp_path) == before, out


def test_a_killed_export_leaves_a_temporary_that_the_next_export_removes(finished, tmp_path):
    """And an export killed while it replaces an earlier one leaves the earlier one whole, and the next
    one replaces it whole: the model and its description are one file, renamed into place (so two
    exports at once also leave one whole file: the last rename wins)."""
    pytest.importorskip("onnx")
    from vitlab.export import OnnxModel

    run = _copy(finished, tmp_path)
    assert CliRunner().invoke(cli, ["export", str(run / "best"), "--format", "onnx", "--float-input"]).exit_code == 0
    earlier = (run / "best.onnx").read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "export", str(run / "best"), "--format", "onnx"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list(run.glob(".best.onnx.*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, "the export never made its temporary folder"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(run.glob(".best.onnx.*.tmp")), "nothing was left to clean up"
    assert (run / "best.onnx").read_bytes() == earlier and OnnxModel.load(run / "best.onnx").float_input
    result = CliRunner().invoke(cli, ["export", str(run / "best"), "--format", "onnx"])  # a second export, whole
    assert result.exit_code == 0, result.output
    assert not list(run.glob(".*.tmp")) and not OnnxModel.load(run / "best.onnx").float_input


def test_stale_temporaries_are_swept_only_for_dead_processes_of_this_machine(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = owner_tag().split("@")[1]
    made = {"dead": tmp_path / f".x.{dead.pid}@{host}.abc.tmp", "live": tmp_path / f".x.{os.getppid()}@{host}.abc.tmp",
            "other machine": tmp_path / f".x.{dead.pid}@00000000.abc.tmp", "not ours": tmp_path / ".x.abc.tmp",
            "other name": tmp_path / f".y.{dead.pid}@{host}.abc.tmp"}
    for path in made.values():
        path.mkdir()
    target = tmp_path / "outside"
    target.mkdir()
    (target / "keep").write_text("x")
    os.symlink(target, tmp_path / f".x.{dead.pid}@{host}.link.tmp")  # a dead one's link: removed, not followed
    gone = sweep_stale(tmp_path, ".x.", ".tmp")
    assert sorted(p.name for p in gone) == sorted([made["dead"].name, f".x.{dead.pid}@{host}.link.tmp"])
    assert all(p.exists() for k, p in made.items() if k != "dead") and (target / "keep").exists()
    fresh = temp_dir(tmp_path, ".x.")  # a new temporary names its maker
    assert fresh.name.startswith(f".x.{owner_tag()}.")


def test_export_run_inside_the_checkpoint_folder_writes_beside_it(finished, tmp_path, monkeypatch):
    pytest.importorskip("timm")
    run = _copy(finished, tmp_path)
    monkeypatch.chdir(run / "best")
    done = CliRunner().invoke(cli, ["export", ".", "--format", "timm"])
    assert done.exit_code == 0 and "Traceback" not in done.output, done.output
    assert (run / "best-timm").is_dir() and sorted(p.name for p in (run / "best").iterdir()) == \
        ["config.yaml", "model.json", "model.safetensors"]


def test_unknown_keys_make_an_invalid_run_config(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    good = default_config().to_dict()
    (folder / "config.yaml").write_text(yaml.safe_dump({**good, "extra": 1}))
    (folder / "metrics.csv").write_text("x\n")
    assert kind_of(folder) == "other"
    (folder / "config.yaml").write_text(yaml.safe_dump(good))
    assert kind_of(folder) == "run"
    with pytest.raises(ConfigError):
        from vitlab.rundir import RunLock

        (folder / ".lock").symlink_to(tmp_path / "nowhere")
        RunLock(folder).acquire()
    assert not (tmp_path / "nowhere").exists()  # a dangling link is not followed to create its target


@pytest.mark.parametrize("edit", [lambda m: m["model"].update(heads=1), lambda m: m["model"].update(norm_eps=1e-3),
                                  lambda m: m["classes"].reverse()], ids=["heads", "norm-eps", "class-order"])
def test_a_manifest_edited_without_its_checksum_is_refused(finished, tmp_path, edit):
    """Fields that change no weight's shape: every other check passed them, and the checkpoint
    computed another function (or named the classes wrongly)."""
    run = _copy(finished, tmp_path)
    manifest = json.loads((run / "best" / "model.json").read_text())
    edit(manifest)
    (run / "best" / "model.json").write_text(json.dumps(manifest))
    for args in (["evaluate", str(run / "best")], ["export", str(run / "best"), "--format", "timm"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "do not match its own checksum" in result.output, result.output
