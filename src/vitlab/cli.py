"""The ``vitlab`` command. Every TrainConfig field is a kebab-case flag of ``train``,
generated from the dataclass, so the CLI and the config can never drift apart."""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from .config import DEFAULT_PRESET, TrainConfig, check_resume_changes, load_preset, preset_names, read_preset
from .errors import TrainingInterrupted, VitlabError, out_of_memory
from .fileio import printable
from .options import flag


def _field_type(f: dataclasses.Field) -> Any:
    """The click type of a TrainConfig field (bools are flags, handled by the callers)."""
    ann = str(f.type)
    if "choices" in f.metadata:
        return click.Choice(f.metadata["choices"])
    if ann.startswith("tuple"):
        return (float, float)
    return int if ann.startswith("int") else float if ann.startswith("float") else str


def _field_option(name: str, **extra):
    """A click option for a command other than train, from the TrainConfig field of that name
    (its type, default and help), so the same flag means the same thing in every command."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return click.option(flag(name), type=_field_type(f), default=f.default, show_default=True,
                        help=f.metadata["help"], **extra)


def _fail(message: str, code: int = 1) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def _said_elsewhere(e: BaseException) -> bool:
    """An error another process of a torchrun job has already printed (a rank other than 0
    repeats rank 0's errors and interruptions to stop alike; one line per job is enough)."""
    return getattr(e, "from_main", False) or (isinstance(e, TrainingInterrupted) and os.environ.get("RANK", "0") != "0")


def friendly_errors(fn):
    """Turn user-caused errors into one line on stderr (tracebacks with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.pop("debug", False)
        try:
            return fn(*args, **kwargs)
        except TrainingInterrupted as e:
            if not _said_elsewhere(e):
                click.secho(f"interrupted: {e}", fg="yellow", err=True)
            sys.exit(130)
        except VitlabError as e:
            if debug:
                traceback.print_exc()
            if _said_elsewhere(e):
                sys.exit(1)
            _fail(str(e))
        except OSError as e:
            if debug:
                traceback.print_exc()
            where = f" ({printable(e.filename)})" if getattr(e, "filename", None) else ""
            hint = ""
            if e.errno == errno.ENOSPC:  # only a run has something to resume
                hint = " — the disk is full; free space and " + ("resume with --resume" if fn.__name__ == "train"
                                                                  else "run the command again")
            _fail(f"{e.strerror or e}{where}{hint}")
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            if debug:
                traceback.print_exc()
            _fail(f"out of memory on the device ({str(e).splitlines()[0][:200]}): lower --batch-size or "
                  f"--eval-batch-size (a run continues from its last checkpoint with --resume)")

    return click.option("--debug", is_flag=True, help="show full tracebacks for errors")(wrapper)


def _default(f: dataclasses.Field) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return list(default) if isinstance(default, tuple) else default


def _launch(nproc: int, preset: str | None, resume: Path | None, overwrite: bool, quiet: bool,
            given: dict[str, Any]) -> int:
    """``train --nproc N``: the whole config checked here, before any process starts (a bad
    value, or a global batch the N processes cannot share, is one line at once); then the
    same command, without --nproc and with the run folder's name fixed, in N ranks."""
    from .checkpoint import CONFIG
    from .distributed import launch
    from .rundir import open_existing

    if resume is not None:
        check_resume_changes(given, preset=bool(preset))
        open_existing(resume).release()  # a clear error for what is not a run, or a live one
        cfg = TrainConfig.load_yaml(resume / CONFIG).replace(**given).validate()
        run_dir = resume
    else:
        cfg = load_preset(preset or DEFAULT_PRESET).replace(**given).validate()
        if cfg.name is None:  # chosen here, so that this process can name the run in what it says
            from datetime import datetime

            given["name"] = cfg.name = f"{cfg.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(cfg.out).expanduser() / cfg.name
    if cfg.batch_size % nproc:
        raise VitlabError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the {nproc} "
                          f"processes; choose a multiple of {nproc}")
    args = ["train", *(["--preset", preset] if preset else []), *(["--resume", str(resume)] if resume else []),
            *(["--overwrite"] if overwrite else []), *(["--quiet"] if quiet else [])]
    for key, value in given.items():  # the same command, without --nproc, in each process
        if isinstance(value, bool):
            args.append(flag(key) if value else "--no-" + flag(key)[2:])
        elif isinstance(value, tuple):
            args += [flag(key), *map(str, value)]
        else:
            args += [flag(key), str(value)]
    return launch(nproc, args, printable(run_dir))


def _config_options(fn):
    """One click option per TrainConfig field; None means 'not given' so presets apply."""
    for f in reversed(dataclasses.fields(TrainConfig)):
        name = flag(f.name)
        help_text = f.metadata.get("help", "") + f"  [default: {_default(f)}]"
        if str(f.type).startswith("bool"):
            opt = click.option(f"{name}/--no-{name[2:]}", f.name, default=None, help=help_text)
        else:
            pair = str(f.type).startswith("tuple")
            opt = click.option(name, f.name, type=_field_type(f), default=None, metavar="MIN MAX" if pair else None,
                               help=help_text)
        fn = opt(fn)
    return fn


def flag_table() -> str:
    """The Markdown table of every training flag, its default and help: README's copy is
    generated from this (``vitlab flags``), so the two cannot drift apart."""
    lines = ["| flag | default | what it does |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        name = flag(f.name) + ("/--no-" + f.name.replace("_", "-") if str(f.type).startswith("bool") else "")
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        lines.append(f"| `{name}` | `{_default(f)}` | {help_text} |")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="vitlab")
def cli() -> None:
    """Train, evaluate and explain Vision Transformers on small image datasets.

    \b
    vitlab train                                   # the embedded digits dataset, ~30 s on 2 CPU cores
    vitlab train --preset quick-mnist --data-dir ~/data
    vitlab train --dataset mnist --epochs 5 --depth 6 --dim 128
    vitlab evaluate runs/<run>/best
    vitlab predict runs/<run>/best cat.png ship.jpg
    vitlab explain runs/<run>/best cat.png
    vitlab presets
    """


@cli.command()
@click.option("--preset", help=f"start from a named preset (see `vitlab presets`): {', '.join(preset_names())}")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), help="continue the run in this folder from its last checkpoint")
@click.option("--overwrite", is_flag=True, help="replace an existing run folder of the same --name")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.option("--nproc", type=click.IntRange(min=1), help="train data-parallel in N processes on this machine (vitlab "
              "starts torchrun's launcher; --batch-size stays the global batch)")
@_config_options
@friendly_errors
def train(preset: str | None, resume: Path | None, overwrite: bool, quiet: bool, nproc: int | None,
          **overrides: Any) -> None:
    """Train a ViT; with no options, the embedded digits preset.

    A preset plus any field overrides describes the run; the run folder
    <out>/<dataset>-<timestamp>/ receives checkpoints (best/, last/), metrics.csv,
    results.md, loss_curve.png and predictions.png.
    """
    from .train import train as run_training

    given = {k: v for k, v in overrides.items() if v is not None}
    if nproc is not None and nproc > 1:
        sys.exit(_launch(nproc, preset, resume, overwrite, quiet, given))
    if resume is not None:
        check_resume_changes(given, preset=bool(preset))
        # rank 0 reads the run folder (under torchrun the others may not have it: vitlab.train.Run.initial_config)
        run_training(resume=resume, changes=given, progress=not quiet)
        return
    cfg = load_preset(preset or DEFAULT_PRESET).replace(**given).validate()
    run_training(cfg, overwrite=overwrite, progress=not quiet)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data-dir", help="where the dataset is (default: as in the run's config)")
@click.option("--download/--no-download", default=None, help="download the dataset into --data-dir if missing")
@_field_option("device")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="evaluation batch size [default: the run's]")
@_field_option("precision")
@_field_option("attention")
@friendly_errors
def evaluate(checkpoint: Path, data_dir: str | None, download: bool | None, device: str, batch_size: int | None,
             precision: str, attention: str) -> None:
    """Loss and accuracy of a checkpoint on the train, val and test splits.

    The data is read from where the run trained (its config.yaml) or from --data-dir;
    vitlab downloads a missing dataset only into a --data-dir you name, with --download.
    In bf16 the attention kernels round differently: the --precision and --attention of the
    run's results.md ("device") reproduce its table to the last digit."""
    from .evaluate import evaluation
    from .report import per_class_table, results_table

    ev = evaluation(checkpoint, data_dir=data_dir, download=download, device=device, batch_size=batch_size,
                    precision=precision, attention=attention)
    click.echo(f"computed on {ev.computed}\n\n" + results_table(ev.results) + "\n\nPer-class accuracy (test):\n\n"
               + per_class_table(ev.confusion, ev.classes))


def _note(path: Path, text: str) -> None:
    click.secho(f"{printable(path)}: note: {text}", fg="yellow", err=True)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True, help="classes to show per image")
@_field_option("device")
@_field_option("precision")
@_field_option("attention")
@friendly_errors
def predict(checkpoint: Path, images: tuple[Path, ...], top_k: int, device: str, precision: str,
            attention: str) -> None:
    """Top-k classes with probabilities for each image file (an ONNX file computes in fp32)."""
    from .predict import predict_files

    failures = 0
    for path, outcome in predict_files(checkpoint, images, top_k=top_k, device=device, precision=precision,
                                         attention=attention, note=_note):
        if isinstance(outcome, str):
            failures += 1
            click.secho(f"{printable(path)}: error: {outcome}", fg="red", err=True)
        else:
            click.echo(f"{printable(path)}: " + ", ".join(f"{name} {p:.3f}" for name, p in outcome))
    if failures:
        sys.exit(1)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(["gradient", "rollout", "attention"]), default="gradient", show_default=True,
              help="gradient: gradient-weighted attention (Chefer et al. 2021); rollout: attention rollout "
                   "(Abnar & Zuidema 2020); attention: the last layer's class-token attention")
@click.option("--head-fusion", type=click.Choice(["mean", "max", "min"]), default="mean", show_default=True,
              help="rollout: how each layer's heads are combined")
@click.option("--discard-ratio", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="rollout: share of the lowest attention weights zeroed in each layer")
@click.option("--target", help="the class to explain, by name or index (default: the predicted one)")
@click.option("--per-head", is_flag=True, help="also one map per head of the last layer")
@click.option("--per-layer", is_flag=True, help="also the rollout after each layer")
@click.option("--split", type=click.Choice(["train", "val", "test"]), help="explain images of the run's own dataset")
@click.option("--count", type=int, default=32, show_default=True,
              help="with --split: how many of its first images (at most 1,024; grids of 64 per page)")
@click.option("--data-dir", help="with --split: where the dataset is (default: as in the run's config)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("explanations"),
              show_default=True, help="folder the PNGs are written to")
@_field_option("device")
@friendly_errors
def explain(checkpoint: Path, images: tuple[Path, ...], method: str, head_fusion: str, discard_ratio: float,
            target: str | None, per_head: bool, per_layer: bool, split: str | None, count: int, data_dir: str | None,
            out: Path, device: str) -> None:
    """Show where the model looks: a heatmap per image, with its faithfulness score.

    \b
    vitlab explain runs/<run>/best cat.png ship.jpg            # one PNG per image in ./explanations
    vitlab explain runs/<run>/best --split test --count 32     # correct and mistaken, as two grids
    """
    from .explain_figures import explain_files, explain_split, parse_target
    from .inference import load_predictor

    if bool(images) == bool(split):
        raise VitlabError("give image files or --split, not both (and not neither)")
    predictor = load_predictor(checkpoint, device, precision="fp32")  # explanations compute in fp32: no bf16 timing
    options = dict(head_fusion=head_fusion, discard_ratio=discard_ratio, target=parse_target(target, predictor.classes),
                   per_head=per_head, per_layer=per_layer)
    if split:
        from .inference import checkpoint_data

        _, data = checkpoint_data(checkpoint, predictor.meta, data_dir)
        subset = {"train": data.train, "val": data.val, "test": data.test}[split]
        del options["per_head"], options["per_layer"]
        for key, paths in explain_split(predictor, subset.images, subset.labels, out, split, count, method, **options).items():
            click.echo(f"{key}: {', '.join(printable(p) for p in paths)}")
        return
    failures = 0
    for path, outcome in explain_files(predictor, list(images), out, method, note=_note, **options):
        if isinstance(outcome, str):
            failures += 1
            click.secho(f"{printable(path)}: error: {outcome}", fg="red", err=True)
        else:
            click.echo(f"{printable(path)}: {printable(outcome)}")
    if failures:
        sys.exit(1)


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "timm", "hf"]), required=True,
              help="onnx: one .onnx file (uint8 images in, normalisation inside); timm: a folder timm.create_model "
                   "loads ('local-dir:PATH'); hf: a folder transformers' from_pretrained and pipeline load")
@click.option("--out", type=click.Path(path_type=Path), help="where to write (default: beside the checkpoint: best.onnx, best-timm/, best-hf/)")
@click.option("--float-input", is_flag=True, help="onnx: take already-normalised float32 images instead of uint8")
@click.option("--data-dir", help="where the run's dataset is, for the parity check (default: as in its config)")
@friendly_errors
def export(checkpoint: Path, fmt: str, out: Path | None, float_input: bool, data_dir: str | None) -> None:
    """Export a checkpoint and check the export against vitlab on test images.

    The export's logits are compared with vitlab's in fp32; it is kept only when every
    top-1 prediction agrees and the largest difference is within the format's tolerance.
    """
    from .export import default_out, export as run_export

    report = run_export(checkpoint, fmt, out, float_input=float_input, data_dir=data_dir,
                        log=lambda s: click.echo(s, err=True))
    where = out or default_out(checkpoint, fmt)
    click.echo(f"{printable(where)}: {report['format']} export checked on {report['source']}: top-1 agreement "
               f"{report['top1_agreement']:.4f}, max |logit difference| {report['max_abs_logit_diff']:.2e} "
               f"(tolerance {report['tolerance']:.0e})")


@cli.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("comparison"), show_default=True,
              help="folder for comparison.md and comparison.png")
@friendly_errors
def compare(runs: tuple[str, ...], out: Path) -> None:
    """Runs side by side: the config fields that differ, results, epochs, time, speed, and
    their validation curves in one figure. Globs work: vitlab compare 'runs/*'."""
    from .compare import compare as run_compare

    text, md, png = run_compare(list(runs), out, warn=lambda s: click.echo(s, err=True))
    click.echo(text + f"\n\nsaved: {printable(md)}, {printable(png)}")


@cli.command()
@click.argument("name", required=False)
@friendly_errors
def presets(name: str | None) -> None:
    """List the shipped presets, or show one in full."""
    if name:
        description, overrides = read_preset(name)
        full = load_preset(name).to_dict()
        click.echo(f"# {name}: {description}")
        for key, value in full.items():
            mark = "" if key in overrides else "   # default"
            click.echo(f"{key}: {value}{mark}")
        return
    for n in preset_names():
        description, overrides = read_preset(n)
        click.echo(click.style(n, bold=True) + f"  {description}")
        shown = ", ".join(f"{k}={v}" for k, v in overrides.items() if k != "dataset")
        click.echo(f"    dataset={overrides.get('dataset', TrainConfig.dataset)}: {shown}")


@cli.command()
def flags() -> None:
    """Every training flag with its default and help, as the Markdown table in README.md."""
    click.echo(flag_table())


def main() -> None:
    from .budget import start_at_process_start

    start_at_process_start()  # a --time-budget counts from here: the process start, imports included
    try:
        cli(prog_name="vitlab")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    exit_without_teardown(code)


def exit_without_teardown(code: int) -> None:
    """End the process once the command is done: exit handlers run and output is flushed
    (every file vitlab writes is closed and fsynced by then), but the interpreter's teardown
    of torch and the plotting and logging modules is skipped: after a digits run it took
    1.4 s of the 2-core CPU, and a --time-budget would have had to leave room for it."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
