"""How faithful and how fast vitlab's explanations are, on a trained checkpoint's test images.

Faithfulness: Chefer et al.'s perturbation test at patch granularity (remove patches,
replacing them with the dataset mean, in 10% steps: most relevant first, "positive",
lower AUC is better; least relevant first, "negative", higher is better) and Petsiuk et
al.'s deletion / insertion AUC of the predicted class's probability. Methods side by
side: random order, raw attention, rollout (mean and max fusion), gradient-weighted.

Speed: rollout and gradient-weighted maps of the test images against one evaluation
pass over them with the explicit attention kernel (medians of repeats).

    python benchmarks/explain.py runs/<run>/best --images 500
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, append_results, command_line, machine  # noqa: E402

from vitlab import Kernels, explain  # noqa: E402
from vitlab.inference import load_predictor  # noqa: E402
from vitlab.inference import checkpoint_data  # noqa: E402

METHODS = {
    "random order": None,
    "raw attention (last layer)": dict(method="attention"),
    "rollout, mean fusion": dict(method="rollout", head_fusion="mean"),
    "rollout, max fusion": dict(method="rollout", head_fusion="max"),
    "gradient-weighted (Chefer et al.)": dict(method="gradient"),
}


def relevance(model, x: torch.Tensor, options: dict | None, seed: int, batch: int = 100) -> torch.Tensor:
    if options is None:
        return torch.rand(len(x), model.cfg.num_patches, generator=torch.Generator().manual_seed(seed))
    return torch.cat([explain.tokens(model, x[i: i + batch], **options) for i in range(0, len(x), batch)])



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data-dir")
    p.add_argument("--images", type=int, default=500, help="test images for the faithfulness table")
    p.add_argument("--speed-images", type=int, default=1000, help="test images for the speed table")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    predictor = load_predictor(args.checkpoint, "cpu", precision="fp32")
    model = predictor.model.with_kernels(Kernels(attention="explicit"))
    _, data = checkpoint_data(args.checkpoint, predictor.meta, args.data_dir)
    x = predictor.normalize(data.test.images[: args.images])
    y = data.test.labels[: args.images]
    with torch.inference_mode():
        acc = float((model(x).argmax(1) == y).float().mean())
    print(f"machine: {machine()}\n{args.checkpoint}: {predictor.meta.dataset}, test accuracy on these {len(x)} images "
          f"{acc:.4f}", flush=True)
    lines = ["| method | positive perturbation AUC (lower is better) | negative perturbation AUC (higher is better) | "
             "deletion AUC (lower is better) | insertion AUC (higher is better) |", "|---|---|---|---|---|"]
    for name, options in METHODS.items():
        rel = relevance(model, x, options, seed=0)
        aucs = explain.perturbation_curves(model, x, y, rel).aucs()
        lines.append(f"| {name} | {aucs['positive']:.3f} | {aucs['negative']:.3f} | {aucs['deletion']:.3f} | "
                     f"{aucs['insertion']:.3f} |")
        print(lines[-1], flush=True)

    xs = predictor.normalize(data.test.images[: args.speed_images])

    def eval_pass():
        with torch.inference_mode():
            for i in range(0, len(xs), 250):
                model(xs[i: i + 250])

    base = median_seconds(eval_pass, args.repeats)
    speed = ["| what | seconds | vs one evaluation pass |", "|---|---|---|",
             f"| evaluation pass (explicit attention, class-token shortcut) | {base:.2f} | 1.00x |"]
    for name, options in (("rollout (mean fusion)", dict(method="rollout")), ("gradient-weighted", dict(method="gradient")),
                          ("raw attention", dict(method="attention"))):
        t = median_seconds(lambda: relevance(model, xs, options, 0, batch=250), args.repeats)
        speed.append(f"| {name} | {t:.2f} | {t / base:.2f}x |")
        print(speed[-1], flush=True)
    body = (f"`{args.checkpoint}` ({predictor.meta.dataset}, ViT {model.cfg.depth}x{model.cfg.dim}, patch "
            f"{model.cfg.patch_size}, {model.cfg.patch_embed}); faithfulness on the first {len(x)} test images "
            f"(accuracy {acc:.4f}), patches replaced by the dataset mean in 10% steps\n\n" + "\n".join(lines) +
            f"\n\nSpeed on the first {len(xs)} test images, CPU fp32, batches of 250, median of {args.repeats}:\n\n" +
            "\n".join(speed))
    print(body)
    if not args.no_record:
        append_results("Explanations: faithfulness and speed (benchmarks/explain.py)", command_line(), body)


if __name__ == "__main__":
    main()
