"""The package's shape: an acyclic module graph, modules that import alone, no global
side effects on import, and documentation generated from the code it documents."""

from __future__ import annotations

import ast
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import vitlab
from vitlab import report
from vitlab.cli import flag_table

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "vitlab"


def module_graph() -> dict[str, set[str]]:
    """Which vitlab module imports which (relative imports, at any depth in the file)."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        graph[name] = deps - {name}
    return graph


def test_module_graph_has_no_cycle():
    graph = module_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            visit(dep, path + [node])
        state[node] = 2

    for module in graph:
        visit(module, [])
    # the layering the package is built on
    assert "train" not in graph["inference"] | graph["predict"] | graph["checkpoint"]
    assert graph["errors"] == set() and graph["options"] == {"errors"}


_IMPORT_EACH_ALONE = """
import importlib, sys
names = sys.argv[1:]
for name in names:
    for loaded in [m for m in sys.modules if m == "vitlab" or m.startswith("vitlab.")]:
        del sys.modules[loaded]
    importlib.import_module("vitlab." + name)
print("ok", len(names))
"""


def test_every_module_imports_alone():
    names = [p.stem for p in sorted(PACKAGE.glob("*.py")) if p.stem not in ("__init__", "__main__")]
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH_ALONE, *names], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["ok", str(len(names))], out.stderr


_BACKEND = """
import matplotlib
matplotlib.use("svg")
import torch, vitlab.train, vitlab.report as r
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
r.plot_curves([{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "train_acc": 0.5, "val_acc": 0.4}], __import__("pathlib").Path(__import__("sys").argv[1]), "t")
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
print("kept")
"""


def test_writing_figures_leaves_the_users_matplotlib_backend_alone(tmp_path):
    out = subprocess.run([sys.executable, "-c", _BACKEND, str(tmp_path / "c.png")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "kept", out.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_and_numpy_random_states_are_restored_exactly():
    """Mid-way through a Gaussian pair (Python keeps the second one cached) and mid-way
    through NumPy's key buffer: the restored streams continue exactly."""
    from vitlab.train import rng_state, set_rng_state

    random.seed(3)
    np.random.seed(3)
    random.gauss(0, 1)  # leaves gauss_next set
    np.random.standard_normal()  # leaves a cached Gaussian
    np.random.randint(0, 10, 5)
    saved = rng_state(torch.device("cpu"))
    buf = __import__("io").BytesIO()
    torch.save(saved, buf)  # through state.pt's format and loader
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    expected = ([random.gauss(0, 1) for _ in range(3)], random.random(), np.random.standard_normal(3).tolist(),
                np.random.randint(0, 1000, 4).tolist())
    random.seed(99)
    np.random.seed(99)
    set_rng_state(saved, torch.device("cpu"))
    got = ([random.gauss(0, 1) for _ in range(3)], random.random(), np.random.standard_normal(3).tolist(),
           np.random.randint(0, 1000, 4).tolist())
    assert got == expected


def test_results_record_the_code_that_produced_them(digits_run, tmp_path):
    text = (digits_run / "results.md").read_text()
    assert f"vitlab {vitlab.__version__}" in text
    # the package's own files, so an uncommitted change shows: any edit changes the digest
    assert f"source sha256 {report.source_digest()}" in text
    copy = tmp_path / "vitlab"
    shutil.copytree(Path(vitlab.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert report.source_digest(copy) == report.source_digest()
    (copy / "presets" / "digits.yaml").write_text((copy / "presets" / "digits.yaml").read_text() + "# edited\n")
    assert report.source_digest(copy) != report.source_digest()
    head = (REPO / ".git" / "HEAD")
    if head.is_file():
        commit = re.search(r"git commit ([0-9a-f]{12})", text)
        assert commit, text
        ref = head.read_text().strip()
        if ref.startswith("ref: ") and (REPO / ".git" / ref[5:]).is_file():
            assert (REPO / ".git" / ref[5:]).read_text().startswith(commit.group(1))


def test_readme_flag_table_is_generated_from_the_config():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- flags:begin.*?-->\n(.*?)\n<!-- flags:end -->", readme, re.S)
    assert block, "README.md lacks the generated flag table"
    assert block.group(1).strip() == flag_table().strip(), "README's flag table is stale: paste `vitlab flags` into it"
    for name in ("--patch-embed", "--trivial-augment", "--repeated-augment"):
        assert f"`{name}" in block.group(1)
    assert "conv-pool" in block.group(1)


def test_evaluation_batch_has_one_default(digits_run, monkeypatch):
    """`vitlab evaluate` and evaluate_checkpoint use the run's eval batch, whose default is the config's."""
    import vitlab.inference as inference
    from vitlab.config import DEFAULT_EVAL_BATCH, TrainConfig
    from vitlab.predict import evaluate_checkpoint

    sizes = []
    real = inference.predict_logits
    monkeypatch.setattr(inference, "predict_logits", lambda *a, **k: sizes.append(a[3] if len(a) > 3 else k["batch_size"]) or real(*a, **k))
    evaluate_checkpoint(digits_run / "best", device="cpu")
    assert TrainConfig().eval_batch_size == DEFAULT_EVAL_BATCH and set(sizes) == {DEFAULT_EVAL_BATCH}
