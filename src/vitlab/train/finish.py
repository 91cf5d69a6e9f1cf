"""Stage 8, the finish: the run's best checkpoint (raw or EMA weights, whichever won) evaluated
on every split, and the report: results.md and results.json, the figures, TensorBoard's
summary, the tidy-up, and one line saying how it went."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import metrics, report, rundir
from ..budget import format_duration
from ..checkpoint import CONFIG, load_weights, read_meta
from ..data import DatasetSplits
from ..devices import precision_name
from ..explain_figures import explain_images, plot_grid
from ..fileio import printable
from ..inference import Predictor, loss_and_accuracy
from .compute import Compute
from .folder import RunFolder, final_checkpoint
from .setup import Setup
from .state import TrainState
from .timebudget import TimeBudget


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, tuple[float, float]]  # split -> (loss, accuracy)
    epochs: int
    seconds: float


def finish_run(folder: RunFolder, setup: Setup, data: DatasetSplits, compute: Compute, state: TrainState,
               budget: TimeBudget, train_seconds: float, session_seconds: float,
               log: Callable[[str], None]) -> RunResult:
    """Evaluate the best checkpoint on every split and write results.md and the plots;
    then remove the crash-safety copies (best.prev/, last.prev/)."""
    cfg, model = folder.cfg, setup.model

    def choose() -> tuple:
        chosen = final_checkpoint(folder, log)
        load_weights(chosen, model)
        return chosen, {k: v.cpu() for k, v in model.state_dict().items()}, read_meta(chosen, verify=False).extra

    chosen, weights, extra = compute.by_main(choose)  # raw or EMA weights, whichever won
    model.load_state_dict(weights)
    model.eval()
    ev = dict(normalize=setup.normalize, batch_size=cfg.eval_batch_size, tta_flip=cfg.tta_flip)
    # Test logits are computed once: for the table and for the predictions grid below.
    test_logits = compute.logits(model, data.test.images, **ev)
    test = loss_and_accuracy(test_logits, data.test.labels)
    results = {
        "Train": compute.evaluate(model, data.train, **ev),
        "Val": test if data.val_is_test else compute.evaluate(model, data.val, **ev),
        "Test": test,
    }
    if compute.main:
        write_report(folder, setup, data, compute, state, budget, results, test_logits, chosen, extra, train_seconds,
                     session_seconds, log)
        log("\n" + report.results_table(results))
        used = (f", time budget {cfg.time_budget}: {format_duration(time.perf_counter() - budget.origin)} used"
                if cfg.time_budget else "")
        log(f"done: best epoch {extra.get('epoch', 0)} (val accuracy {float(extra.get('val_acc') or 0):.4f}), test "
            f"accuracy {results['Test'][1]:.4f}, {format_duration(train_seconds)} of training{used}; report: "
            f"{printable(folder.dir / rundir.RESULTS_MD)}")
    return RunResult(folder.dir, results, len(state.rows), train_seconds)


def write_figures(folder: RunFolder, setup: Setup, data: DatasetSplits, compute: Compute, state: TrainState,
                  probs: torch.Tensor, preds: torch.Tensor, confusion: torch.Tensor, title: str,
                  explain: bool) -> None:
    """loss_curve.png, predictions.png, confusion.png and (``explain``) attention.png."""
    if state.rows:
        report.plot_curves(state.rows, folder.dir / "loss_curve.png", title)
    # The grid: the first test images, then the first mistakes among the rest (up to 8).
    first = torch.arange(min(24, len(data.test)))
    wrong = (preds != data.test.labels).nonzero().flatten()
    show = torch.cat([first, wrong[wrong >= len(first)][:32 - len(first)]])
    report.plot_predictions(data.test.images[show], data.test.labels[show], preds[show], probs[show],
                            data.classes, folder.dir / "predictions.png", title)
    report.plot_confusion(confusion, data.classes, folder.dir / "confusion.png", title)
    if explain:
        predictor = Predictor(setup.meta, setup.model, setup.normalize, compute.device, compute.amp_dtype)
        explained = explain_images(predictor, data.test.images[show], "gradient")
        plot_grid(explained, range(len(show)), data.classes, data.test.labels[show], folder.dir / "attention.png",
                  f"{title}: where it looks (gradient-weighted attention)")


def explanations(folder: RunFolder, budget: TimeBudget, log: Callable[[str], None]) -> tuple[bool, str]:
    """Whether attention.png is drawn (a time budget may have no room left for it), and what
    results.md says in its place where it is not."""
    skipped = (f"no room left in the time budget; `vitlab explain {printable(folder.dir / 'best')} --split test` "
               "explains test images later")
    if budget.explanations_fit():
        return True, skipped
    log(f"time budget: attention.png left out ({skipped})")
    return False, skipped


def write_report(folder: RunFolder, setup: Setup, data: DatasetSplits, compute: Compute, state: TrainState,
                 budget: TimeBudget, results: dict, test_logits: torch.Tensor, chosen: Path, extra: dict,
                 train_seconds: float, session_seconds: float, log: Callable[[str], None]) -> None:
    """results.md (+ results.json), loss_curve.png, predictions.png, attention.png (left out
    where a time budget has no room left for it) and confusion.png, the TensorBoard summary;
    then the tidy-up."""
    cfg, model = folder.cfg, setup.model
    explain, skipped = explanations(folder, budget, log)
    title = f"{cfg.dataset}: ViT {cfg.depth}x{cfg.dim}, patch {model.cfg.patch_size}"
    probs, preds = test_logits.softmax(1).max(1)
    confusion = metrics.confusion_matrix(preds, data.test.labels, len(data.classes))
    images_per_second = len(data.train) * len(state.rows) / max(train_seconds, 1e-9)
    code = report.code_version()  # read from .git once, for results.md and results.json
    choice = compute.choice
    facts = {
        "epochs": f"{len(state.rows)} (best val accuracy at epoch {extra.get('epoch', 0)}, "
                  f"{extra.get('weights', 'raw')} weights; the table uses {chosen.name}/)",
        "training time": f"{train_seconds:.1f} s" + (f" (this session {session_seconds:.1f} s)"
                                                      if session_seconds < train_seconds else ""),
        "throughput": f"{images_per_second:,.0f} training images/s",
        "validation": "the test set" if data.val_is_test else f"{len(data.val)} images held out of train (fixed seed)",
        "model": f"{model.num_params():,} parameters, {model.cfg.num_patches} patches of {model.cfg.patch_size}x{model.cfg.patch_size}",
        "device": f"{compute.describe()} attention" + (f" ({precision_name(compute.amp_dtype)} autocast)" if compute.amp_dtype else "") + (
            "; timed: " + ", ".join(f"{k} {v:.1f} ms" for k, v in choice.ms.items()) if choice and choice.ms else ""),
        "code": code,
        "config": CONFIG,
        "figures": "[loss_curve.png](loss_curve.png), [predictions.png](predictions.png), " + (
            "[attention.png](attention.png) (where it looks: gradient-weighted attention of the same images), "
            if explain else f"no attention.png ({skipped}), ") + "[confusion.png](confusion.png)",
    }
    recall, balanced = metrics.per_class_recall(confusion), metrics.balanced_accuracy(confusion)
    facts["balanced accuracy (test)"] = f"{balanced:.4f} (the mean of the per-class recalls below)"
    if setup.origin:
        facts["started from"] = (f"the {setup.origin['kind']} weights of {setup.origin['folder']} "
                                 f"(model.safetensors sha256 {setup.origin['sha256'][:16]}...)")
    budget_record, budget_line = budget.report(cfg, state.step)
    if budget_line:
        facts["time budget"] = budget_line
    report.write_results(folder.dir / rundir.RESULTS_MD, title, results, facts,
                         {"Per-class accuracy (test)": report.per_class_table(confusion, data.classes)})
    best, seconds, rate = (f.column for f in metrics.RESULTS)  # what `vitlab compare` reads
    report.write_json(folder.dir / rundir.RESULTS_JSON, {
        "results": {k: {"loss": v[0], "accuracy": v[1]} for k, v in results.items()},
        "best_epoch": extra.get("epoch", 0), best: extra.get("val_acc"), "epochs": len(state.rows),
        "planned_epochs": cfg.epochs, seconds: train_seconds, rate: images_per_second,
        "classes": list(data.classes), "confusion": confusion.tolist(), "time_budget": budget_record,
        "kernels": choice.to_dict() if choice else None, "code": code, "balanced_test_acc": balanced,
        "per_class_recall": recall.tolist(), "init_from": setup.origin or None})
    write_figures(folder, setup, data, compute, state, probs, preds, confusion, title, explain)
    if folder.board is not None:
        figures = ("predictions", "attention", "confusion") if explain else ("predictions", "confusion")
        folder.board.report({name: folder.dir / f"{name}.png" for name in figures},
                            cfg.to_dict(), {metrics.RESULTS[0].column: float(extra.get("val_acc") or 0.0),
                                            metrics.TEST_ACC.column: results["Test"][1],
                                            metrics.TEST_LOSS.column: results["Test"][0]}, state.step)
        folder.board.close()
    rundir.tidy(folder.dir)
