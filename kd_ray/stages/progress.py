"""Progress a user sees without ``--verbose``: one line per finished unit of work (k of N, what
it was, its result, elapsed, an ETA) and a heartbeat line while work runs long with nothing
finishing. :class:`Progress` is a Tune callback for sweeps; :class:`Heartbeat` serves any stage
that waits on Ray (teachers, soft-target passes).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from ray import tune

HEARTBEAT_S = 60.0  # a line at least this often while work runs and nothing finishes


def _print(line: str) -> None:
    print(line, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Heartbeat:
    """Counts finished units and prints ``[kd_ray] <stage>: k/N <what> ...; elapsed, ETA``.

    ``beat()`` prints a reminder when nothing was printed for ``every`` seconds; ``start()`` runs
    it on a daemon thread until ``stop()`` (for stages that block in ``ray.wait``/``ray.get``).
    """

    def __init__(self, stage: str, total: int, already: int = 0, every: float = HEARTBEAT_S,
                 printer: Callable[[str], None] | None = None):
        self.stage, self.total, self.done, self.already = stage, total, already, already
        self.every, self.t0, self.last = every, time.time(), time.time()
        self.running: dict[str, str] = {}  # what runs now -> its latest news
        self.printer = printer or _print
        self._stop: threading.Event | None = None  # set by start() (a Tune callback must pickle)

    def eta(self) -> str:
        new = self.done - self.already
        if new == 0 or self.done >= self.total:
            return ""
        per = (time.time() - self.t0) / new
        return f", ETA {_clock(per * (self.total - self.done))}"

    def finished(self, what: str, result: str = "") -> None:
        self.done += 1
        self.running.pop(what, None)
        self.say(f"{self.done}/{self.total} {what}" + (f": {result}" if result else "")
                 + f"; elapsed {_clock(time.time() - self.t0)}{self.eta()}")

    def say(self, text: str) -> None:
        self.last = time.time()
        self.printer(f"[kd_ray] {self.stage} {text}")

    def beat(self) -> None:
        if time.time() - self.last < self.every:
            return
        news = "; ".join(f"{k} ({v})" if v else k for k, v in list(self.running.items())[:3])
        self.say(f"still running: {self.done}/{self.total} done after {_clock(time.time() - self.t0)}"
                 + (f"; now {news}" if news else ""))

    def start(self) -> "Heartbeat":
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(min(5.0, self.every)):
                self.beat()
        threading.Thread(target=loop, daemon=True, name=f"kd_ray-heartbeat-{self.stage}").start()
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()


class Progress(tune.Callback):
    """A sweep's progress: a line per finished (or failed) trial and a heartbeat for long ones."""

    def __init__(self, total: int, already: int, describe: Callable[[dict], str], metric: str,
                 every: float = HEARTBEAT_S):
        self.heart = Heartbeat("sweep", total, already, every)
        self.describe, self.metric = describe, metric

    def on_trial_start(self, iteration, trials, trial, **info):
        self.heart.running[self.describe(trial.config)] = "started"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" in result and not result.get("final"):
            self.heart.running[self.describe(trial.config)] = (
                f"epoch {result['epoch']}, {self.metric} {result.get(self.metric, float('nan')):.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        m = trial.last_result or {}
        value = m.get(self.metric)
        result = f"{self.metric} {value:.4f}" if isinstance(value, float) else "done"
        if m.get("wall_s") is not None:
            result += f" in {_clock(m['wall_s'])}"
        self.heart.finished(self.describe(trial.config), result)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.heart.finished(self.describe(trial.config), "FAILED (see results.csv)")

    def on_step_end(self, iteration, trials, **info):
        self.heart.beat()
