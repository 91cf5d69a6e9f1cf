"""What starting from other weights and balancing buy (issue 31, point 4), as real ``vitlab
train`` runs, each in its own process, resumable like the speedrun series:

1. pretrain: the ``fast-cifar100`` model on CIFAR-100 (``--optimizer muon``, a few epochs);
2. few-shot: CIFAR-10 with 100 images per class, from scratch and fine-tuned from (1), the
   same model, epochs and data, hence the same wall time (both measured and shown);
3. full: all of CIFAR-10, from scratch and fine-tuned, the same epochs;
4. imbalance: a folder of CIFAR-10 images written with a 10:1 imbalance (classes 0-4 keep
   ``--major`` training images, 5-9 a tenth of that; a balanced test/ split), trained with
   and without ``--class-weights balanced``; accuracy, balanced accuracy, and the mean recall
   of the rare and the common classes.

    python benchmarks/pretrained.py --data-dir /work/data --parts pretrain fewshot full imbalance

Fine-tuning uses ``--lr --finetune-lr --layer-decay 0.75 --warmup-epochs 1`` (BEiT's recipe);
scratch runs keep the preset's. A table per part is printed and appended to HISTORY.md, and one
plot (validation accuracy against training minutes, scratch against fine-tuned) is drawn.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish  # noqa: E402
from speedrun import best_acc, mean_std, save_plot, shown, train_and_record  # noqa: E402

RUNS = Path(__file__).with_name("speedruns") / "pretrained"
PARTS = ("pretrain", "fewshot", "full", "imbalance")


def pretrain(args: argparse.Namespace) -> dict:
    return train_and_record(["--preset", "fast-cifar100", "--optimizer", "muon", "--epochs", str(args.pretrain_epochs),
                             "--data-dir", args.data_dir, "--no-download", "--seed", "0", *args.extra],
                            args.runs / "pretrain-cifar100", args.fresh)


def source(args: argparse.Namespace) -> str:
    return str(args.runs / "pretrain-cifar100" / "best")


def scratch_and_finetuned(args: argparse.Namespace, part: str, flags: list[str], seeds: list[int]) -> dict:
    """Each seed twice, the same flags: from scratch, and from the pretrained weights."""
    tune = ["--init-from", source(args), "--lr", str(args.finetune_lr), "--layer-decay", "0.75", "--warmup-epochs", "1"]
    return {arm: [{**train_and_record([*flags, "--seed", str(s), *(tune if arm == "fine-tuned" else []), *args.extra],
                                      args.runs / f"{part}-{arm}-s{s}", args.fresh), "seed": s} for s in seeds]
            for arm in ("scratch", "fine-tuned")}


# fast-cifar10 as it was when the recorded series ran (AdamW, 2 warmup epochs; the preset trains with Muon since)
AS_RECORDED = ["--optimizer", "adamw", "--warmup-epochs", "2"]


def cifar10(args: argparse.Namespace, epochs: int) -> list[str]:
    return ["--preset", "fast-cifar10", *AS_RECORDED, "--data-dir", args.data_dir, "--no-download", "--epochs", str(epochs)]


def write_imbalanced(args: argparse.Namespace) -> Path:
    """CIFAR-10 as a folder of PNGs, train/ with a 10:1 imbalance and a balanced test/ (once)."""
    import numpy as np
    from PIL import Image

    from vitlab.data import load_cifar10

    root = args.runs / f"imbalanced-cifar10-{args.major}"
    if (root / "done").is_file():
        return root
    train, test, classes = load_cifar10(Path(args.data_dir), download=False)
    root.mkdir(parents=True, exist_ok=True)
    (root / "rare.txt").write_text("\n".join(classes[5:]) + "\n")
    for split, data, count in (("train", train, lambda c: args.major if c < 5 else args.major // 10),
                               ("test", test, lambda c: 500)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            index = (data.labels == c).nonzero().flatten()[:count(c)]
            for i in index.tolist():
                Image.fromarray(np.ascontiguousarray(data.images[i].permute(1, 2, 0).numpy())).save(
                    root / split / name / f"{i:05d}.png")
    (root / "done").write_text("ok\n")
    return root


def rare_classes(args: argparse.Namespace) -> list[str]:
    return (args.runs / f"imbalanced-cifar10-{args.major}" / "rare.txt").read_text().split()


def imbalance(args: argparse.Namespace) -> dict:
    root = write_imbalanced(args)
    flags = ["--preset", "fast-cifar10", *AS_RECORDED, "--dataset", "folder", "--data-dir", str(root), "--val-size", "0.1",
             "--epochs", str(args.imbalance_epochs)]
    return {arm: [{**train_and_record([*flags, "--seed", str(s), "--class-weights", arm, *args.extra],
                                      args.runs / f"imbalance-{arm}-s{s}", args.fresh), "seed": s}
                  for s in args.imbalance_seeds]
            for arm in ("none", "balanced")}


def recall_of(run: dict, names: set[str]) -> float:
    return statistics.mean(r for c, r in zip(run["classes"], run["per_class_recall"]) if c in names)


def arms_table(arms: dict, rare: set[str] | None = None) -> str:
    """Mean ± std over seeds per arm; with ``rare`` (the rare classes' names), the mean recall
    of the rare and of the common classes too."""
    head = ["arm", "n", "test acc", "balanced test acc", *(["rare-class recall", "common-class recall"]
                                                           if rare else []), "best val acc", "epochs", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in arms.items():
        cells = [arm, str(len(runs)), mean_std([r["test_acc"] for r in runs]),
                 mean_std([r["balanced_test_acc"] for r in runs])]
        if rare:
            cells += [mean_std([recall_of(r, rare) for r in runs]),
                      mean_std([recall_of(r, set(r["classes"]) - rare) for r in runs])]
        cells += [mean_std([best_acc(r) for r in runs]), str(runs[0]["epochs"]),
                  mean_std([r["wall_s"] for r in runs], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(parts: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    for ax, (part, arms) in zip(axes[0], parts.items()):
        for (arm, runs), colour in zip(arms.items(), ("tab:grey", "tab:blue")):
            for i, r in enumerate(runs):
                ax.plot([s / 60 for s, _ in r["curve"]], [a for _, a in r["curve"]], color=colour, marker=".",
                        label=arm if i == 0 else None)
        ax.set(title=part, xlabel="training minutes", ylabel="validation accuracy" + (
            " (balanced arm: balanced)" if "balanced" in arms else ""))
    save_plot(fig, axes[0], path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the few-shot arms")
    p.add_argument("--pretrain-epochs", type=int, default=8)
    p.add_argument("--fewshot-epochs", type=int, default=40)
    p.add_argument("--full-epochs", type=int, default=3)
    p.add_argument("--full-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--imbalance-epochs", type=int, default=15)
    p.add_argument("--imbalance-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--major", type=int, default=1000, help="training images of each common class (rare: a tenth)")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags given to every run (tests: tiny sizes)")
    p.add_argument("--runs", type=Path, default=RUNS)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    tables, curves = [], {}
    if {"pretrain", "fewshot", "full"} & set(args.parts):
        base = pretrain(args)
        tables.append(f"pretraining (CIFAR-100, `{base['command']}`): test {base['test_acc']:.4f} after "
                      f"{base['epochs']} epochs, {base['wall_s']:.0f} s")
    if "fewshot" in args.parts:
        curves["CIFAR-10, 100 images per class"] = arms = scratch_and_finetuned(
            args, "fewshot", [*cifar10(args, args.fewshot_epochs), "--train-per-class", "100", "--val-size", "1000"],
            args.seeds)
        tables.append(f"CIFAR-10 with 100 training images per class, {args.fewshot_epochs} epochs:\n\n{arms_table(arms)}")
    if "full" in args.parts:
        curves["CIFAR-10, all 45,000 images"] = arms = scratch_and_finetuned(
            args, "full", cifar10(args, args.full_epochs), args.full_seeds)
        tables.append(f"CIFAR-10, the full training split, {args.full_epochs} epochs:\n\n{arms_table(arms)}")
    if "imbalance" in args.parts:
        curves["10:1 imbalanced folder"] = arms = imbalance(args)
        tables.append(f"a CIFAR-10 folder with a 10:1 imbalance ({args.major} training images in each of classes "
                      f"0-4, {args.major // 10} in 5-9; 500 test images each), {args.imbalance_epochs} epochs, "
                      f"--class-weights none against balanced:\n\n{arms_table(arms, rare=set(rare_classes(args)))}")
    picture = args.runs.with_suffix(".png")  # beside the (git-ignored) run folders
    if curves:
        plot(curves, picture)
    publish("Pretrained weights and class balance", "\n\n".join(tables) + f"\n\nplot: {shown(picture)}",
            record=not args.no_record)


if __name__ == "__main__":
    main()
