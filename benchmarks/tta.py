"""Test-time flips everywhere, nowhere, or only where the model is unsure (issue 29).

For each trained checkpoint: the test set's logits (that pass timed), and those of its mirror
images; then for each confidence threshold t, the accuracy when only the images whose top
softmax probability is below t get the mirror's logits averaged in, and the share of images
that needs the second pass (what it would cost). t = 0 is no flipping, t = 1 flipping every
image (vitlab's --tta-flip, whose own evaluation the script checks it equals). Exact for the
accuracy: what a run that flips only the unsure images would compute.

    python benchmarks/tta.py benchmarks/speedruns/fast-cifar10-muon-15ep/seed{0,1,3}/best --data-dir /work/data
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish  # noqa: E402

import torch  # noqa: E402

from vitlab.inference import checkpoint_data, load_predictor  # noqa: E402

THRESHOLDS = (0.0, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0)


def measure(checkpoint: Path, data_dir: str | None, batch: int, precision: str = "auto") -> dict:
    """Accuracy and share flipped at each threshold, and one pass's seconds, for one checkpoint."""
    predictor = load_predictor(checkpoint, precision=precision)
    _, data = checkpoint_data(checkpoint, predictor.meta, data_dir)
    images, labels = data.test.images, data.test.labels
    predictor.logits(images[:batch], batch)  # warm-up: the first batch pays for allocations
    t0 = time.perf_counter()
    plain = predictor.logits(images, batch)
    one_pass = time.perf_counter() - t0
    mirrored = predictor.logits(images.flip(-1), batch)
    vitlab_tta = predictor.logits(images, batch, tta_flip=True)  # the --tta-flip path, for the check below
    confidence = plain.softmax(1).amax(1)
    rows = {}
    for t in THRESHOLDS:  # (t = 1 flips every image, those whose probability rounds to 1.0 included)
        flip = confidence < t if t < 1 else torch.ones_like(confidence, dtype=torch.bool)
        logits = torch.where(flip.unsqueeze(1), (plain + mirrored) / 2, plain)
        rows[t] = ((logits.argmax(1) == labels).float().mean().item(), flip.float().mean().item())
    everywhere = (vitlab_tta.argmax(1) == labels).float().mean().item()
    if abs(everywhere - rows[1.0][0]) > 2 / len(labels):  # a tie or two may break the other way in bf16
        raise SystemExit(f"{checkpoint}: flipping every image gives {rows[1.0][0]:.4f}, vitlab's --tta-flip "
                         f"{everywhere:.4f}: the script does not measure what vitlab computes")
    return {"rows": rows, "plain_s": one_pass, "images": len(labels)}


def table(names: list[str], results: list[dict]) -> str:
    head = "| checkpoint | " + " | ".join(f"t = {t:g}: acc (share flipped)" for t in THRESHOLDS) + \
           " | one pass s | images |"
    lines = [head, "|" + "---|" * (len(THRESHOLDS) + 3)]
    for name, r in zip(names, results):
        cells = [f"{acc:.4f} ({share:.0%})" for acc, share in (r["rows"][t] for t in THRESHOLDS)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['plain_s']:.1f} | {r['images']:,} |")
    if len(results) > 1:
        means = []
        for t in THRESHOLDS:
            accs = [r["rows"][t][0] for r in results]
            gain = [r["rows"][t][0] - r["rows"][0.0][0] for r in results]
            means.append(f"{statistics.mean(accs):.4f} ({statistics.mean(gain) * 100:+.2f} ± "
                         f"{statistics.stdev(gain) * 100:.2f} pt, {statistics.mean(r['rows'][t][1] for r in results):.0%})")
        lines.append(f"| mean (n={len(results)}) | " + " | ".join(means) +
                     f" | {statistics.mean(r['plain_s'] for r in results):.1f} | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--data-dir", default=None, help="where the checkpoints' dataset is (default: their config's)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--precision", default="auto", help="as vitlab evaluate's (auto: the faster, measured)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    results = [measure(c, args.data_dir, args.batch, args.precision) for c in args.checkpoints]
    names = [f"{c.parent.parent.name}/{c.parent.name}" for c in args.checkpoints]
    body = (f"test split, each image's top softmax probability against t: below it, the mirror image's logits are "
            f"averaged in (t = 0: never, t = 1: always, = --tta-flip)\n\n{table(names, results)}")
    publish("Test-time flips where the model is unsure (benchmarks/tta.py)", body, record=not args.no_record)


if __name__ == "__main__":
    main()
