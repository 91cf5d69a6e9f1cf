"""Pack a small copy of the datasets for a GPU call of the device tool (at most
64 MiB of files travel per call): the four MNIST files and a CIFAR-10 subset in
the official cifar-10-batches-py layout.

    python benchmarks/make_device_data.py --data-dir /work/data --out .devdata --per-batch 2000
"""

from __future__ import annotations

import argparse
import pickle
import shutil
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="holds mnist/ and cifar-10-batches-py/ (see ../shared/data/unpack.py)")
    p.add_argument("--out", default=".devdata")
    p.add_argument("--per-batch", type=int, default=2000, help="images kept from each CIFAR-10 batch file")
    args = p.parse_args()
    src, out = Path(args.data_dir), Path(args.out)
    shutil.copytree(src / "mnist", out / "mnist", dirs_exist_ok=True)
    cifar_out = out / "cifar-10-batches-py"
    cifar_out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "cifar-10-batches-py" / "batches.meta", cifar_out)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(src / "cifar-10-batches-py" / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        k = args.per_batch
        small = {b"batch_label": d[b"batch_label"], b"labels": d[b"labels"][:k], b"data": d[b"data"][:k],
                 b"filenames": d[b"filenames"][:k]}
        with open(cifar_out / name, "wb") as f:
            pickle.dump(small, f, protocol=2)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
