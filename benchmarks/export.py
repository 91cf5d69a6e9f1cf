"""CPU inference throughput of an exported ONNX model in onnxruntime against vitlab's own
eager inference, on the same images, side by side in one run; and the time to export.

For the small and reference configs (randomly initialised: speed does not depend on the
weights), batch 1 and batch 256, fp32, uint8 images in (vitlab normalises on the way in,
the ONNX graph has the normalisation inside).

    python benchmarks/export.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, CONFIGS, append_results, command_line, machine  # noqa: E402

from vitlab.checkpoint import CheckpointMeta, save_checkpoint  # noqa: E402
from vitlab.config import default_config  # noqa: E402
from vitlab.export import export  # noqa: E402
from vitlab.inference import load_predictor  # noqa: E402
from vitlab.model import ViT, ViTConfig  # noqa: E402



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["small", "reference"], choices=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    import onnxruntime as ort

    print(f"machine: {machine()}; onnxruntime {ort.__version__} with {torch.get_num_threads()} threads for torch")
    lines = ["| config | batch | vitlab eager (img/s) | onnxruntime (img/s) | ratio |", "|---|---|---|---|---|"]
    export_times = []
    with tempfile.TemporaryDirectory() as scratch:  # the checkpoints and ONNX files go with it
        for name in args.configs:
            folder = Path(scratch) / name / "best"
            cfg = ViTConfig(**CONFIGS[name])
            torch.manual_seed(0)
            model = ViT(cfg)
            torch.nn.init.normal_(model.head.weight, std=0.1)
            meta = CheckpointMeta(cfg, [str(i) for i in range(cfg.num_classes)], (0.5,) * 3, (0.25,) * 3, "cifar10")
            run_cfg = default_config().replace(dataset="cifar10", data_dir="/nonexistent")  # random check images
            save_checkpoint(folder, model, meta, run_cfg.to_yaml())
            t = time.perf_counter()
            export(folder, "onnx", log=lambda s: None)
            export_times.append(f"{name} {time.perf_counter() - t:.1f} s")
            session = ort.InferenceSession(str(folder.with_name("best.onnx")), providers=["CPUExecutionProvider"])
            predictor = load_predictor(folder, "cpu", precision="fp32")
            for batch in (1, 256):
                images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
                reps = args.repeats * (20 if batch == 1 else 1)

                def ours():
                    with torch.inference_mode():
                        predictor.model(predictor.normalize(images))

                def theirs():
                    session.run(None, {"images": images.numpy()})

                a, b = median_seconds(ours, reps), median_seconds(theirs, reps)
                lines.append(f"| {name} | {batch} | {batch / a:,.0f} | {batch / b:,.0f} | {a / b:.2f}x |")
                print(lines[-1], flush=True)
    body = ("fp32, uint8 images in; vitlab eager: `load_predictor(...).model` (fastest kernel for the device, class-token "
            "shortcut) with its normalisation; onnxruntime: the `vitlab export --format onnx` graph (explicit attention, "
            "normalisation inside), CPUExecutionProvider; median of repeats\n\n" + "\n".join(lines) +
            f"\n\nExport time (torch.onnx dynamo exporter + the onnxruntime parity check on 512 random images): "
            f"{', '.join(export_times)}")
    print(body)
    if not args.no_record:
        append_results("ONNX export: inference throughput and export time (benchmarks/export.py)", command_line(), body)


if __name__ == "__main__":
    main()
