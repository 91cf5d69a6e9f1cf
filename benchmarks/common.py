"""Shared pieces of the benchmarks: peer ViTs built to the same shape, timing, the
machine description, and appending results to RESULTS.md."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).with_name("RESULTS.md")  # the current page: curated, and generated from the history
HISTORY = Path(__file__).with_name("HISTORY.md")  # every run, appended
CURRENT_BEGIN = "<!-- current:begin (generated from HISTORY.md by benchmarks/common.py; do not edit by hand) -->"
CURRENT_END = "<!-- current:end -->"

CONFIGS = {
    # the reference design, and a small one that trains in minutes on a CPU
    "reference": dict(image_size=32, channels=3, num_classes=10, patch_size=4, depth=12, heads=8, dim=256, mlp_dim=512),
    "small": dict(image_size=32, channels=3, num_classes=10, patch_size=4, depth=6, heads=4, dim=128, mlp_dim=256),
    # the scripts' rehearsal on a CPU (benchmarks/gpu.sh --rehearse): every path, at no size
    "tiny": dict(image_size=32, channels=3, num_classes=10, patch_size=8, depth=1, heads=2, dim=32, mlp_dim=64),
}
VITLAB_CONFIGS = {  # the above, and shapes only vitlab builds
    **CONFIGS,
    # fast-fashion-mnist's model: the CCT tokenizer (3x3 conv + max-pool stages)
    "conv-pool": dict(image_size=28, channels=1, num_classes=10, patch_size=4, patch_embed="conv-pool", depth=6,
                      heads=4, dim=128, mlp_dim=256),
}


class TutorialViT(nn.Module):
    """A ViT the way tutorials write it: nn.MultiheadAttention called with its defaults
    (so it also computes the head-averaged attention weights)."""

    def __init__(self, image_size, channels, num_classes, patch_size, depth, heads, dim, mlp_dim):
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(channels, dim, patch_size, patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.norms1 = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.attns = nn.ModuleList([nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(depth)])
        self.norms2 = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
                                   for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        for n1, attn, n2, mlp in zip(self.norms1, self.attns, self.norms2, self.mlps):
            h = n1(x)
            x = x + attn(h, h, h)[0]
            x = x + mlp(n2(x))
        return self.head(self.norm(x)[:, 0])


def build_peer(name: str, cfg: dict) -> nn.Module:
    c = cfg
    if name == "tutorial":
        return TutorialViT(**c)
    if name == "timm":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=c["image_size"], patch_size=c["patch_size"], in_chans=c["channels"],
                                 num_classes=c["num_classes"], embed_dim=c["dim"], depth=c["depth"],
                                 num_heads=c["heads"], mlp_ratio=c["mlp_dim"] / c["dim"], qkv_bias=True,
                                 class_token=True, global_pool="token")
    if name == "vit-pytorch":
        from vit_pytorch import ViT as LucidViT

        return LucidViT(image_size=c["image_size"], patch_size=c["patch_size"], num_classes=c["num_classes"],
                        dim=c["dim"], depth=c["depth"], heads=c["heads"], mlp_dim=c["mlp_dim"],
                        dim_head=c["dim"] // c["heads"], channels=c["channels"])
    raise ValueError(name)


def median(xs):
    return statistics.median(xs)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls (CPU work: no device sync)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> str:
    """The machine kind a number belongs to: CPU model (with its family and model numbers,
    since a virtual machine may name only the vendor), vector ISA torch uses, native bf16."""
    from vitlab.autotune import cpu_model
    from vitlab.devices import native_bf16

    cpu, ids = cpu_model(), {}
    try:
        for line in open("/proc/cpuinfo"):
            key = line.split(":", 1)[0].strip()
            if key in ("cpu family", "model") and key not in ids:
                ids[key] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    if ids:
        cpu += f" (family {ids.get('cpu family', '?')} model {ids.get('model', '?')})"
    isa = torch.backends.cpu.get_cpu_capability()
    desc = (f"{cpu}, {isa}, native bf16 {'yes' if native_bf16(torch.device('cpu')) else 'no'}, "
            f"{torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        desc = f"{torch.cuda.get_device_name()} (host: {desc})"
    return desc


HISTORY_ENV = "BENCH_HISTORY"  # another file to append to (the GPU machine's results travel back in $OUT)


def append_results(title: str, command: str, body: str) -> None:
    """Append a run to HISTORY.md and bring RESULTS.md's current part up to date (or, with
    $BENCH_HISTORY set, append to that file only: ``merge`` brings it in later)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"\n## {title}\n\n- command: `{command}`\n- machine: {machine()}\n"
            f"- torch {torch.__version__}, python {platform.python_version()}, date {stamp}\n\n{body}\n")
    elsewhere = os.environ.get(HISTORY_ENV)
    with open(elsewhere or HISTORY, "a") as f:
        f.write(text)
    if not elsewhere:
        write_current()


def publish(title: str, body: str, record: bool = True) -> None:
    """Print a result with the machine it ran on, and append it to the history unless told not to."""
    print(f"machine: {machine()}\n{body}")
    if record:
        append_results(title, command_line(), body)


def merge(path: Path) -> int:
    """Append the runs another machine recorded in ``path`` (a $BENCH_HISTORY file) to
    HISTORY.md and rebuild RESULTS.md; the number of runs merged."""
    runs = history_entries(Path(path).read_text())
    with open(HISTORY, "a") as f:
        for run in runs:
            f.write("\n" + run["text"])
    write_current()
    return len(runs)


def history_entries(text: str) -> list[dict]:
    """The runs of HISTORY.md that name their command and machine: title, command, machine, text."""
    entries = []
    for chunk in ("\n" + text).split("\n## ")[1:]:
        title = chunk.splitlines()[0].strip()
        fields = {k: v for k, v in (line[2:].split(": ", 1) for line in chunk.splitlines()
                                    if line.startswith(("- command: ", "- machine: ")))}
        if "command" in fields and "machine" in fields:
            entries.append({"title": title, "command": fields["command"], "machine": fields["machine"],
                            "text": "## " + chunk.strip() + "\n"})
    return entries


def current_page(history: str) -> str:
    """The newest run of each benchmark command on each machine kind, grouped by benchmark."""
    newest: dict[tuple[str, str, str], dict] = {}
    for e in history_entries(history):  # oldest first: a later run replaces an earlier one
        script = e["title"].rsplit("(", 1)[-1].rstrip(")") if e["title"].endswith(".py)") else e["title"]
        newest[(script, e["command"], e["machine"])] = e
    order = sorted(newest.items(), key=lambda kv: kv[0])
    return "\n".join("#" + e["text"] for _, e in order)  # one level down, under RESULTS.md's heading


def write_current() -> None:
    """RESULTS.md with its generated part rebuilt from HISTORY.md."""
    text = RESULTS.read_text()
    head, rest = text.split(CURRENT_BEGIN)
    _, tail = rest.split(CURRENT_END)
    RESULTS.write_text(f"{head}{CURRENT_BEGIN}\n\n{current_page(HISTORY.read_text())}\n{CURRENT_END}{tail}")


def command_line() -> str:
    return "python " + " ".join([Path(sys.argv[0]).as_posix().split("/work/main/")[-1], *sys.argv[1:]])


if __name__ == "__main__":  # python benchmarks/common.py merge FILE
    if len(sys.argv) != 3 or sys.argv[1] != "merge":
        sys.exit("usage: python benchmarks/common.py merge HISTORY-FILE   (runs recorded with $BENCH_HISTORY)")
    print(f"merged {merge(Path(sys.argv[2]))} run(s) into {HISTORY.name} and {RESULTS.name}")
