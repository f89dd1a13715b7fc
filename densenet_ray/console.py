"""What the person who started a training run sees: our lines, printed by the driver.

    console = Console.open()                 # driver: before the TorchTrainer starts
    ... train_loop_config={"console": console.handle, ...}
    say(handle, "epoch   1/15 ...")           # rank 0, in the workers
    say(handle, "epoch 1 step 40/110 ...", progress=True)
    console.close()

Rank 0 sends its lines (progress, epoch, resume, test, registered) to a queue actor that the driver
drains and prints without Ray's "(RayTrainWorker pid=...)" prefix; on a terminal a progress line is
one line redrawn in place (a progress bar), in logs (`ray job logs`, files, CI) it is a plain line.
The libraries' own chatter is turned down at its source instead (`quiet_libraries`): Ray Train's
per-report and checkpoint lines (its RunConfig log level), Ray Data's progress bars, MLflow's info
lines. Their warnings and errors still reach the console; `--verbose` brings their info back.
Without a console (Tune trials, tests driving the loop directly) lines go to the `densenet_ray`
logger, as any worker log line does.
"""

from __future__ import annotations

import logging
import sys
import threading

log = logging.getLogger("densenet_ray")


def say(handle, line: str, *, progress: bool = False) -> None:
    """Send `line` to the driver's console (fire and forget: a step never waits for the driver); without
    one, log it."""
    if handle is None:
        if not progress:
            log.info(line)
        return
    handle.put.remote("progress" if progress else "line", line)


def quiet_libraries(verbose: bool) -> None:
    """This process's library loggers: MLflow's and Ray Data's info lines off unless `verbose`, and
    Ray Train's "Reporting training result N: TrainingReport(...)" dump of every report on every
    worker: its module logs under its file path (logging.getLogger(__file__)), so the ray.train
    level set through RunConfig(logging_config=...) does not reach it (Ray 2.60)."""
    level = logging.INFO if verbose else logging.WARNING
    names = ["mlflow", "ray.data"]
    try:
        from ray.train.v2._internal.execution import context

        names.append(context.__file__)
    except ImportError:
        pass
    for name in names:
        logging.getLogger(name).setLevel(level)


class _Lines:
    """The queue between rank 0 and the driver: a plain (not async) actor, so that lines are kept in the
    order one worker sent them."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def put(self, kind: str, line: str) -> None:
        self.lines.append((kind, line))

    def take(self) -> list[tuple[str, str]]:
        lines, self.lines = self.lines, []
        return lines


class Console:
    """The driver's end: the queue actor (no CPU) and a thread printing what arrives."""

    def __init__(self, actor, out=None, poll_s: float = 0.25) -> None:
        self.handle, self.out, self.poll_s = actor, out or sys.stdout, poll_s
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self._drawn = False  # a progress line is on the screen, without its newline
        self._stop, self._lock = threading.Event(), threading.Lock()   # one taker at a time: lines stay in order
        self._thread = threading.Thread(target=self._drain, name="densenet_ray-console", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls) -> "Console":
        import ray

        return cls(ray.remote(num_cpus=0)(_Lines).remote())

    def _take(self) -> list:
        import ray

        return ray.get(self.handle.take.remote(), timeout=30)

    def _drain(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.flush()
            except Exception:  # the actor is gone (Ray shut down): nothing more will come
                return

    def flush(self) -> None:
        """Print what is queued now (the driver about to exit on SIGTERM: rank 0's last lines)."""
        with self._lock:
            for kind, line in self._take():
                self.show(kind, line)

    def show(self, kind: str, line: str) -> None:
        if self.tty and kind == "progress":
            self.out.write("\r\x1b[K" + line)
            self._drawn = True
        else:
            self.out.write(("\r\x1b[K" if self._drawn else "") + line + "\n")
            self._drawn = False
        self.out.flush()

    def close(self) -> None:
        """Print what is still queued, end the redrawn line, stop the thread and the actor."""
        import ray

        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self.flush()
        except Exception:
            pass
        if self._drawn:
            self.out.write("\n")
            self._drawn = False
        try:
            ray.kill(self.handle)
        except Exception:
            pass
