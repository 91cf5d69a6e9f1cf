"""Carry a whole CIFAR dataset to the GPU machine in two device calls.

The device tool copies at most 64 MiB per call and CIFAR-10/100 are ~160 MiB as
delivered (their images barely compress with gzip: 92%). Each image plane is
predicted from its left, upper and upper-left neighbours (clip(l + u - ul), as in
lossless image codecs), and the residuals are compressed with LZMA: 66% of the raw
size, so 60,000 images fit in two parts of ~58 MiB.

    python benchmarks/cifar_halves.py pack --data-dir /work/data --dataset cifar10   # writes .gpudata-a/ .gpudata-b/
    python benchmarks/cifar_halves.py unpack PART_A PART_B --out /root/data          # official cifar-10-batches-py/

``unpack`` writes the official layout (the same files, dict keys and dtypes as the
download) and checks every image array against the SHA-256 recorded at packing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import pickle
import sys
from pathlib import Path

import numpy as np

LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "batches.meta"),
    "cifar100": ("cifar-100-python", ["train", "test"], "meta"),
}


def _predict(x: np.ndarray) -> np.ndarray:
    """clip(left + up - upleft) for (N, C, H, W) int16 planes; left/up at the edges, 0 at the corner."""
    p = np.zeros_like(x)
    p[..., 1:, 1:] = x[..., 1:, :-1] + x[..., :-1, 1:] - x[..., :-1, :-1]
    p[..., 0, 1:] = x[..., 0, :-1]
    p[..., 1:, 0] = x[..., :-1, 0]
    return np.clip(p, 0, 255)


def encode(images: np.ndarray) -> bytes:
    """uint8 (N, C, H, W) -> compressed residuals."""
    x = images.astype(np.int16)
    return lzma.compress(((x - _predict(x)) % 256).astype(np.uint8).tobytes(), preset=6)


def decode(blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of ``encode``: rebuild pixels in raster order, all images and channels at once."""
    r = np.frombuffer(lzma.decompress(blob), dtype=np.uint8).reshape(shape).astype(np.int16)
    x = np.zeros(shape, dtype=np.int16)
    _, _, height, width = shape
    for i in range(height):
        for j in range(width):
            if i and j:
                p = np.clip(x[..., i, j - 1] + x[..., i - 1, j] - x[..., i - 1, j - 1], 0, 255)
            elif j:
                p = x[..., i, j - 1]
            elif i:
                p = x[..., i - 1, j]
            else:
                p = 0
            x[..., i, j] = (r[..., i, j] + p) % 256
    return x.astype(np.uint8)


def _jsonable(v):
    if isinstance(v, bytes):
        return {"bytes": v.decode("latin-1")}
    if isinstance(v, list):
        return [_jsonable(e) for e in v]
    return v


def _from_json(v):
    if isinstance(v, dict) and set(v) == {"bytes"}:
        return v["bytes"].encode("latin-1")
    if isinstance(v, list):
        return [_from_json(e) for e in v]
    return v


def pack(data_dir: Path, dataset: str, out_a: Path, out_b: Path) -> tuple[int, int]:
    """Split the dataset's image rows in two halves, everything else into part B."""
    from vitlab.data import _load_pickle  # vitlab's unpickler: plain data and arrays only

    folder, files, meta_name = LAYOUT[dataset]
    entries, arrays = [], []
    for name in files:
        d = _load_pickle(data_dir / folder / name)
        data = np.asarray(d.pop("data"), dtype=np.uint8)
        arrays.append(data)
        entries.append({"file": name, "rows": len(data), "fields": {k: _jsonable(v) for k, v in d.items()}})
    meta = {k: _jsonable(v) for k, v in _load_pickle(data_dir / folder / meta_name).items()}
    images = np.concatenate(arrays).reshape(-1, 3, 32, 32)
    half = len(images) // 2
    sizes = []
    for out, rows, part in ((out_a, slice(0, half), "a"), (out_b, slice(half, None), "b")):
        out.mkdir(parents=True, exist_ok=True)
        chunk = images[rows]
        (out / f"images-{part}.lzma").write_bytes(encode(chunk))
        manifest = {"dataset": dataset, "part": part, "shape": list(chunk.shape),
                    "sha256": hashlib.sha256(chunk.tobytes()).hexdigest()}
        if part == "b":
            manifest.update(folder=folder, files=entries, meta_file=meta_name, meta=meta)
        write_manifest(out, part, manifest)  # LZMA too: 60,000 file names are ~2 MiB of JSON
        sizes.append(sum(f.stat().st_size for f in out.iterdir()))
    return sizes[0], sizes[1]


def read_manifest(folder: Path, part: str) -> dict:
    return json.loads(lzma.decompress((folder / f"manifest-{part}.json.xz").read_bytes()))


def write_manifest(folder: Path, part: str, manifest: dict) -> None:
    (folder / f"manifest-{part}.json.xz").write_bytes(lzma.compress(json.dumps(manifest).encode()))


def unpack(part_a: Path, part_b: Path, out: Path) -> Path:
    """Rebuild the official folder under ``out`` from the two parts."""
    chunks = []
    for folder, part in ((part_a, "a"), (part_b, "b")):
        manifest = read_manifest(folder, part)
        chunk = decode((folder / f"images-{part}.lzma").read_bytes(), tuple(manifest["shape"]))
        if hashlib.sha256(chunk.tobytes()).hexdigest() != manifest["sha256"]:
            raise SystemExit(f"{folder}: images do not match their checksum; pack again")
        chunks.append(chunk)
    images = np.concatenate(chunks).reshape(len(chunks[0]) + len(chunks[1]), -1)
    target = out / manifest["folder"]
    target.mkdir(parents=True, exist_ok=True)
    start = 0
    for entry in manifest["files"]:
        d = {k.encode(): _from_json(v) for k, v in entry["fields"].items()}
        d[b"data"] = images[start: start + entry["rows"]]
        start += entry["rows"]
        with open(target / entry["file"], "wb") as f:
            pickle.dump(d, f, protocol=2)
    with open(target / manifest["meta_file"], "wb") as f:
        pickle.dump({k.encode(): _from_json(v) for k, v in manifest["meta"].items()}, f, protocol=2)
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--data-dir", type=Path, required=True, help="holds the official CIFAR folder (../shared/data/unpack.py)")
    a.add_argument("--dataset", choices=sorted(LAYOUT), default="cifar10")
    a.add_argument("--out-a", type=Path, default=Path(".gpudata-a"))
    a.add_argument("--out-b", type=Path, default=Path(".gpudata-b"))
    u = sub.add_parser("unpack")
    u.add_argument("part_a", type=Path)
    u.add_argument("part_b", type=Path)
    u.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.cmd == "pack":
        size_a, size_b = pack(args.data_dir, args.dataset, args.out_a, args.out_b)
        print(f"{args.out_a}: {size_a / 2**20:.1f} MiB, {args.out_b}: {size_b / 2**20:.1f} MiB")
        if max(size_a, size_b) > 60 * 2**20:
            sys.exit("a part is over 60 MiB: it will not travel in one device call")
    else:
        print(f"wrote {unpack(args.part_a, args.part_b, args.out)}")


if __name__ == "__main__":
    main()
