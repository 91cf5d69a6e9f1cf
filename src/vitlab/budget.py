"""Training to a wall-clock budget (``--time-budget 30m``): from this machine's measured speed,
the number of epochs that lets the whole run, final evaluation and report included, end
within the budget. For the ``vitlab`` command the clock starts when the process starts
(imports included); for ``vitlab.train.train()`` from Python, when it is called."""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field

from .errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600}
SAFETY = 0.96  # aim at 96% of the budget: the measured speed drifts by a few per cent on a shared machine
REPLAN_AT = (0.1, 0.25, 0.5, 0.75)  # shares of the run after which the step count is re-planned from its own pace
REPORT_SECONDS = 5.0  # drawing the figures, results.md, the last checkpoint: the part that does not scale with the model
# attention.png explains 32 test images: a forward and backward pass and 22 forward passes of its deletion
# scores per image, about 26 evaluations of each of them
REPORT_IMAGE_PASSES = 26 * 32


def parse_duration(text: str) -> float:
    """'90s', '30m', '2h', '1h30m' or a number of seconds, as seconds."""
    s = str(text).strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", s)
    if not s or parts is None or not any(parts.groups()):
        raise ConfigError(f"--time-budget must look like 90s, 30m, 2h or 1h30m, got {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if not 1 <= total <= 30 * 86400:
        raise ConfigError(f"--time-budget must be between 1 s and 30 days, got {text!r}")
    return total


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


_cli_origin: float | None = None  # time.perf_counter() at the start of this `vitlab` process


def start_at_process_start() -> None:
    """Called by the `vitlab` command: budgets count from the start of the process."""
    global _cli_origin
    _cli_origin = time.perf_counter() - process_age()


def origin() -> float:
    """The time.perf_counter() a budget counts from: the process start for the command, else now."""
    return _cli_origin if _cli_origin is not None else time.perf_counter()


def process_age() -> float:
    """Seconds since this process started (imports included); 0 where it cannot be read."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def epochs_for(steps: int, steps_per_epoch: int) -> int:
    """Epochs that ``steps`` optimizer steps take, the last one partial when they are not whole."""
    return -(-steps // steps_per_epoch)


@dataclass
class Plan:
    """The decision: measured costs and the optimizer steps that fit."""

    budget: float
    step_seconds: float  # one training step, measured
    eval_seconds_per_image: float  # one image through evaluation, measured
    steps_per_epoch: int
    epoch_end_seconds: float  # what ends each epoch, whole or partial: its validation and checkpoints
    final_seconds: float  # the final evaluation of every split and the report
    started: float  # seconds since the process started when the plan was made
    steps: int  # optimizer steps of the run; the last epoch is partial when they are not whole epochs
    revisions: list[str] = field(default_factory=list)  # what each re-plan saw and decided
    latest: int = 0  # the step count as last re-planned (0: as planned)
    next_check: int = 0  # index into REPLAN_AT of the next re-plan

    @property
    def epochs(self) -> int:
        return epochs_for(self.steps, self.steps_per_epoch)

    @property
    def epoch_seconds(self) -> float:
        return self.steps_per_epoch * self.step_seconds + self.epoch_end_seconds

    @property
    def predicted(self) -> float:
        return self.started + self.steps * self.step_seconds + self.epochs * self.epoch_end_seconds + self.final_seconds

    def replan(self, step: int, seconds_per_step: float, elapsed: float) -> int | None:
        """At the end of an epoch: once the run has passed the next share of REPLAN_AT, the
        step count that the pace measured so far (``seconds_per_step``, epoch ends included)
        fits into what is left of the budget after ``elapsed`` seconds; None between re-plans.
        One timing at the start can be off by 20% on a shared machine; the run's own pace is not."""
        current = self.latest or self.steps
        if self.next_check >= len(REPLAN_AT) or step < REPLAN_AT[self.next_check] * current:
            return None
        while self.next_check < len(REPLAN_AT) and step >= REPLAN_AT[self.next_check] * current:
            self.next_check += 1
        left = self.budget * SAFETY - elapsed - self.final_seconds
        steps = max(step, step + math.floor(left / max(seconds_per_step, 1e-9)))
        self.revisions.append(f"at step {step} ({format_duration(elapsed)} in): {1e3 * seconds_per_step:.1f} ms per "
                              f"step with the epoch ends, so {steps} steps instead of {current}")
        self.latest = steps
        return steps

    def describe(self) -> str:
        whole, rest = divmod(self.steps, self.steps_per_epoch)
        shape = f"{whole} epochs" + (f" and {rest} of the {self.steps_per_epoch} steps of one more" if rest else "")
        return (f"time budget {format_duration(self.budget)}: measured {1e3 * self.step_seconds:.1f} ms per step and "
                f"{1e6 * self.eval_seconds_per_image:.0f} us per evaluated image, so an epoch takes about "
                f"{self.epoch_seconds:.1f} s and the final report {self.final_seconds:.1f} s; after "
                f"{self.started:.1f} s of start-up, {self.steps} steps fit: {shape} (predicted end at "
                f"{format_duration(self.predicted)})" + "".join(f"\nre-planned {r}" for r in self.revisions))


def plan(budget: float, step_seconds: float, eval_seconds_per_image: float, steps_per_epoch: int, val_images: int,
         final_images: int, val_passes: int, final_passes: int, max_steps: int, since: float,
         checkpoint_seconds: float = 0.0) -> Plan:
    """How many steps fit in budget x SAFETY after start-up and the final report: whole epochs,
    then the steps of a partial one that its own validation and checkpoints leave room for.
    ``since``: the time.perf_counter() the budget counts from."""
    started = time.perf_counter() - since
    # each epoch also writes last/ and, when val improves, best/: counted as two checkpoints
    epoch_end = val_passes * val_images * eval_seconds_per_image + 2 * checkpoint_seconds
    epoch = steps_per_epoch * step_seconds + epoch_end
    final = (final_passes * final_images + REPORT_IMAGE_PASSES) * eval_seconds_per_image + REPORT_SECONDS
    room = budget * SAFETY - started - final
    whole = max(0, math.floor(room / max(epoch, 1e-9)))
    partial = math.floor((room - whole * epoch - epoch_end) / max(step_seconds, 1e-9))
    steps = whole * steps_per_epoch + max(0, min(partial, steps_per_epoch - 1))
    if steps < 1:
        need = started + step_seconds + epoch_end + final
        raise ConfigError(f"--time-budget {format_duration(budget)} is too short here: start-up took {started:.0f} s, "
                          f"an epoch takes about {epoch:.0f} s and the final report {final:.0f} s; give at least "
                          f"{format_duration(need / SAFETY + 1)}")
    return Plan(budget, step_seconds, eval_seconds_per_image, steps_per_epoch, epoch_end, final, started,
                min(steps, max_steps))
