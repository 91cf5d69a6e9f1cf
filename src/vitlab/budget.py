"""Training to a wall-clock budget (``--time-budget 30m``): from this machine's measured speed,
the number of epochs that lets the whole run, final evaluation and report included, end
within the budget. For the ``vitlab`` command the clock starts when the process starts
(imports included); for ``vitlab.train.train()`` from Python, when it is called.

A budget is a wall-clock promise, and a machine shared with other work changes speed while
a run trains. So the plan made at the start is a first guess: :class:`Keeper` watches the
pace the run keeps (seconds per step over a recent window, epoch ends measured apart) at
every log interval, predicts the end from it (the final report slowed by as much as the
steps are, or as the run queue says one thread is), and re-plans the step count whenever
the prediction leaves the budget. Where other processes keep cores busy (Linux: /proc/stat
against this process's own CPU time), it also trains on the cores that are free: a step
whose threads wait for a busy core runs slower on two threads than on one
(benchmarks/busy_machine.py).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field

from .errors import ConfigError

SAFETY = 0.96  # aim at 96% of the budget: the measured speed drifts by a few per cent on a shared machine
LATE = 0.01  # re-plan at once when the predicted end passes the aim by this share of the budget
EARLY = 0.04  # ... or falls this share short of it (not more often than every GAP of the budget)
GAP = 0.05
WINDOW = 0.15  # the pace is measured over this share of the budget
MIN_SPAN = 0.03  # ... and trusted once it spans this share of it (at least MIN_SECONDS): early steps are noisy
MIN_SECONDS = 2.0
SHARE_SECONDS = 1.0  # the cores' use by others is measured over at least this
QUEUE_READINGS = 16  # readings of the run queue (one a log interval, five before the report) whose median counts
# drawing the figures, results.md, the last checkpoint: the part that does not scale with the model
# (measured 2.0-2.9 s in a fresh process, digits, 2-core Intel Xeon)
REPORT_SECONDS = 3.0
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
_cli_share: "CoreShare | None" = None  # the cores' use, read from the start of this `vitlab` process


def start_at_process_start() -> None:
    """Called by the `vitlab` command: budgets count from the start of the process, and the
    cores' use by others is measured from here, so that a budget run can choose its threads
    before it times its steps."""
    global _cli_origin, _cli_share
    _cli_origin = time.perf_counter() - process_age()
    _cli_share = CoreShare()


def early_share() -> "CoreShare | None":
    """The CoreShare that has watched the cores since the `vitlab` process started (None from Python)."""
    return _cli_share


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
    replanned_at: float = -1e18  # seconds into the budget of the last re-plan

    @property
    def epochs(self) -> int:
        return epochs_for(self.steps, self.steps_per_epoch)

    @property
    def epoch_seconds(self) -> float:
        return self.steps_per_epoch * self.step_seconds + self.epoch_end_seconds

    @property
    def predicted(self) -> float:
        return self.started + self.steps * self.step_seconds + self.epochs * self.epoch_end_seconds + self.final_seconds

    def replan(self, step: int, epochs_done: int, seconds_per_step: float, epoch_end: float | None,
               elapsed: float, report_slowdown: float = 0.0) -> int | None:
        """The step count that the pace the run keeps (``seconds_per_step``, epoch ends apart;
        ``epoch_end``: their measured mean, None before the first) fits into what is left of the
        budget after ``elapsed`` seconds, when the end it predicts has left the budget (later by
        LATE of it, or earlier by EARLY); else None. The final report is taken to slow down as
        much as the steps have against the calibration; its fixed part (REPORT_SECONDS), or as
        ``report_slowdown`` says where that is more (0: unknown): the figures are one thread of
        Python, which other processes slow down more than steps on the threads they leave free."""
        slowdown = min(20.0, max(0.5, seconds_per_step / max(self.step_seconds, 1e-9)))
        end = epoch_end if epoch_end is not None else self.epoch_end_seconds * slowdown
        fixed = min(REPORT_SECONDS, self.final_seconds)  # the figures' thread; the rest evaluates on all of them
        final = (self.final_seconds - fixed) * slowdown + fixed * min(20.0, max(slowdown, report_slowdown))
        current = self.latest or self.steps
        aim = self.budget * SAFETY

        def predicted(total: int) -> float:  # the end of a run of ``total`` steps, at this pace
            ends = max(1, epochs_for(total, self.steps_per_epoch) - epochs_done)  # this epoch's end included
            return elapsed + (total - step) * seconds_per_step + ends * end + final

        late = predicted(current) - aim
        if late <= LATE * self.budget and (late >= -EARLY * self.budget or step >= 0.9 * current
                                           or elapsed - self.replanned_at < GAP * self.budget):
            return None
        low, high = step, step + max(0, math.floor((aim - elapsed) / max(seconds_per_step, 1e-9)))
        while low < high:  # the longest run that ends by the aim (at least where it is)
            mid = (low + high + 1) // 2
            low, high = (mid, high) if predicted(mid) <= aim else (low, mid - 1)
        steps = low
        if steps == current:
            return None
        predicted_then = predicted(current)
        self.revisions.append(f"at step {step} ({format_duration(elapsed)} in): {1e3 * seconds_per_step:.1f} ms per "
                              f"step and {end:.1f} s per epoch end predicted the end at "
                              f"{format_duration(predicted_then)}, so {steps} steps instead of {current}")
        self.latest, self.replanned_at = steps, elapsed
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
         checkpoint_seconds: float = 0.0, compile_seconds: float = 0.0) -> Plan:
    """How many steps fit in budget x SAFETY after start-up and the final report: whole epochs,
    then the steps of a partial one that its own validation and checkpoints leave room for.
    ``since``: the time.perf_counter() the budget counts from; ``compile_seconds``: start-up
    still to come (torch.compile of the run's model, measured on the calibration's copy)."""
    started = time.perf_counter() - since + compile_seconds
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


class Pace:
    """The pace a run keeps: seconds per training step over the last ``window`` seconds of
    training (the epoch ends, whose durations are added up apart, excluded), and the mean
    duration of an epoch's end."""

    def __init__(self, window: float, min_span: float):
        self.window, self.min_span = window, min_span
        self.marks: deque[tuple[float, int]] = deque()  # (training seconds, step)
        self.end_seconds = 0.0
        self.ends = 0

    def mark(self, now: float, step: int) -> None:
        self.marks.append((now - self.end_seconds, step))
        while len(self.marks) > 2 and self.marks[-1][0] - self.marks[1][0] >= self.window:
            self.marks.popleft()

    def restart(self) -> None:
        """Forget the steps so far, the last mark too (the machine's speed changes now, on
        purpose: another thread count). The next mark starts the new pace: a span that began
        before the change would carry the old speed into the first re-plan after it (beside two
        busy loops, 2-thread steps of 160 ms cut a 60-s run to 54 steps that then ran at 25 ms)."""
        self.marks.clear()

    def epoch_end(self, seconds: float) -> None:
        self.end_seconds += seconds
        self.ends += 1

    def seconds_per_step(self) -> float | None:
        if len(self.marks) < 2:
            return None
        (t0, s0), (t1, s1) = self.marks[0], self.marks[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 and t1 - t0 >= self.min_span else None

    def epoch_end_seconds(self) -> float | None:
        return self.end_seconds / self.ends if self.ends else None


class CoreShare:
    """How many cores other processes keep busy: the machine's busy time (/proc/stat) less this
    process's own CPU time, per second of wall time since the last reading. Linux only; None
    elsewhere, or before two readings."""

    def __init__(self):
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._read()
        self.busy = 0.0  # the cores others kept busy at the last reading
        self.queue: deque[int] = deque(maxlen=QUEUE_READINGS)  # others' threads in the run queue, recently

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", "rb") as f:
                fields = f.readline().split()
            busy = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))  # user nice system irq softirq steal
        except (OSError, ValueError, IndexError):
            return None
        own = os.times()
        return time.monotonic(), busy, own.user + own.system

    def others(self) -> float | None:
        now = self._read()
        last, self.last = self.last, now
        if now is None or last is None or now[0] - last[0] < SHARE_SECONDS:
            self.last = last if now is not None and last is not None else now
            return None
        wall = now[0] - last[0]
        self.busy = max(0.0, ((now[1] - last[1]) / self.hz - (now[2] - last[2])) / wall)
        return self.busy

    @staticmethod
    def runnable() -> int | None:
        """Threads running or ready to run on the whole machine now (/proc/stat's procs_running)."""
        try:
            with open("/proc/stat", "rb") as f:
                for line in f:
                    if line.startswith(b"procs_running "):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def read_queue(self, own: int, readings: int = 1) -> None:
        """Note ``readings`` (2 ms apart) of the threads of other processes in the run queue: all
        of it less this process's ``own`` threads. Busy time cannot see them: two cores are at
        most two cores busy, however many threads wait for them."""
        for i in range(readings):
            n = self.runnable()
            if n is None:
                return
            self.queue.append(max(0, n - own))
            if i + 1 < readings:
                time.sleep(0.002)

    def queued(self) -> float:
        """Threads of other processes that want a core: the median of the recent readings (a
        process that starts for a moment moves it little), 0 before any."""
        return float(sorted(self.queue)[len(self.queue) // 2]) if self.queue else 0.0

    def one_thread_slowdown(self, queued: float = 0.0) -> float:
        """How much slower one thread of work (the report's figures) runs than on a free core,
        beside the cores others kept busy at the last reading or the ``queued`` threads of
        others: the scheduler shares the cores evenly among everything that wants one."""
        return max(1.0, (max(self.busy, queued) + 1.0) / self.cores)

    def threads(self, most: int) -> int | None:
        """The threads that the cores others leave free can run (1 to ``most``), or None when unknown."""
        others = self.others()
        if others is None:
            return None
        return max(1, min(most, math.floor(self.cores - others + 0.5)))


class Keeper:
    """A --time-budget run's watch on its own pace: re-plans its length, and its thread count."""

    def __init__(self, plan: Plan, origin: float, threads: int | None, share: CoreShare | None = None,
                 threads_now: int | None = None):
        self.plan = plan
        self.origin = origin  # the time.perf_counter() the budget counts from
        self.pace = Pace(max(MIN_SECONDS, WINDOW * plan.budget), max(MIN_SECONDS, MIN_SPAN * plan.budget))
        self.most_threads = threads  # None: the thread count is the user's (--threads) or the job's
        self.cores = (share or CoreShare()) if threads else None
        self.threads_now = threads_now or threads  # fewer where chosen before the calibration

    def start(self, now: float, step: int) -> None:
        self.pace.mark(now, step)

    def threads(self) -> int | None:
        """A new thread count for the cores free now, or None to keep the current one."""
        if self.cores is None:
            return None
        best = self.cores.threads(self.most_threads)
        if best is None or best == self.threads_now:
            return None
        self.threads_now = best
        self.pace.restart()
        return best

    def check(self, step: int, epochs_done: int, now: float) -> int | None:
        """At a log interval: a new step count for the run, or None."""
        self.pace.mark(now, step)
        if self.cores is not None:
            self.cores.read_queue(self.threads_now or 1)
        pace = self.pace.seconds_per_step()
        if pace is None:
            return None
        return self.plan.replan(step, epochs_done, pace, self.pace.epoch_end_seconds(), now - self.origin,
                                self.report_slowdown(fresh=False))

    def report_slowdown(self, fresh: bool = True) -> float:
        """How much other processes slow the report down (1.0 where that cannot be read); ``fresh``:
        read the cores' busy time now, where the last reading is old enough to measure over."""
        if self.cores is None:
            return 1.0
        if fresh:
            self.cores.others()
            self.cores.read_queue(self.threads_now or 1, readings=5)
        return self.cores.one_thread_slowdown(self.cores.queued())
