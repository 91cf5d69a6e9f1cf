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


def module_names() -> dict[str, Path]:
    """Every module of the package by its dotted name below ``vitlab`` ('train' for the
    package train/, 'train.loop' for train/loop.py), with its file."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and parts != ["__main__"]:
            names[".".join(parts)] = path
    return names


def module_graph() -> dict[str, set[str]]:
    """Which vitlab module imports which (relative imports, at any depth in the file)."""
    names = module_names()
    graph = {}
    for name, path in names.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = package[: len(package) - (node.level - 1)]
                targets = [".".join(base + node.module.split("."))] if node.module else \
                    [".".join(base + [a.name]) for a in node.names]
                for target in targets:  # the module itself, or the package whose attribute it imports
                    while target and target not in names:
                        target = target.rpartition(".")[0]
                    deps.add(target)
        graph[name] = deps - {name, ""}
    return graph


def depends_on(graph: dict[str, set[str]], name: str) -> set[str]:
    """Every module ``name`` imports, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


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
    assert not {m for m in depends_on(graph, "inference") | depends_on(graph, "predict") | depends_on(graph, "evaluate")
                | depends_on(graph, "checkpoint")
                if m.startswith("train")}
    assert graph["errors"] == set() and graph["options"] == {"errors"}


def test_the_training_loop_is_arithmetic_only():
    """The hot loop knows nothing of the run folder, the report or TensorBoard, not even through
    the modules it imports: what it does at log intervals and checkpoints is its caller's."""
    graph = module_graph()
    assert {"train.setup", "train.state", "train.compute"} <= graph["train.loop"]
    assert not depends_on(graph, "train.loop") & {"rundir", "report", "tblog", "train.folder", "train.epochs",
                                                  "train.finish", "explain_figures", "compare", "cli"}


# A newcomer reads a module in one sitting and a function in one screen.
MAX_MODULE_LINES = 650
MAX_FUNCTION_LINES = 60


def test_no_module_or_function_outgrows_a_reading():
    too_long = []
    for name, path in module_names().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long
    train_story = ast.parse((PACKAGE / "train" / "__init__.py").read_text())
    (story,) = [n for n in train_story.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    assert story.end_lineno - story.lineno + 1 <= 50  # train() tells the story of a run in one screen


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
    names = sorted(module_names())
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
    from vitlab.evaluate import evaluate_checkpoint

    sizes = []
    real = inference.predict_logits
    monkeypatch.setattr(inference, "predict_logits", lambda *a, **k: sizes.append(a[3] if len(a) > 3 else k["batch_size"]) or real(*a, **k))
    evaluate_checkpoint(digits_run / "best", device="cpu")
    assert TrainConfig().eval_batch_size == DEFAULT_EVAL_BATCH and set(sizes) == {DEFAULT_EVAL_BATCH}


def test_results_page_shows_the_newest_run_of_each_benchmark():
    """benchmarks/RESULTS.md is a current page: its generated part is the newest run of each benchmark
    command per machine kind in HISTORY.md, where the scripts append (no benchmark repeats on it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_common", REPO / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    page = common.RESULTS.read_text()
    block = page.split(common.CURRENT_BEGIN)[1].split(common.CURRENT_END)[0]
    assert block.strip() == common.current_page(common.HISTORY.read_text()).strip(), \
        "RESULTS.md is stale: run `python -c 'import common; common.write_current()'` in benchmarks/"
    keys = [(e["title"], e["command"], e["machine"]) for e in common.history_entries(block.replace("\n### ", "\n## "))]
    assert keys and len(keys) == len(set(keys))
