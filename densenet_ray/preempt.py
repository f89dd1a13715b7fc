"""SIGTERM as a request to checkpoint: a spot reclaim, `kubectl delete pod`, a node drain, `ray job stop`.

Training workers. Ray's worker processes exit on SIGTERM (a handler that raises SystemExit in the
main thread), and the training loop runs in another thread, where Python cannot install handlers.
`install` runs in every worker process of the job before Ray installs its handler (runtime_env
worker_process_setup_hook, set by runtime.connect) and wraps it: in a process whose training loop
has called `Watch`, the first SIGTERM only marks the request; the loop checkpoints at the next step
boundary (every worker agrees on which, see position.py), then `Watch.handled` hands the signal on
to Ray's handler and stops the loop (Preempted): the worker exits and Ray Train restarts the group
from that checkpoint (or a resubmitted job does). If the loop has not handed it on within GRACE_S
(stuck in a collective with a worker that is gone, say), a timer does. Any other process exits on
SIGTERM as before.

Driver. `on_driver_sigterm(run_name)`, in the driver's main thread: a SIGTERM asks the workers for a
checkpoint through a named actor that rank 0 polls, waits for it (at most GRACE_S; the workers hold
still meanwhile), then ends the driver with the signal's usual exit; the resubmitted job resumes at
that step.

Kubernetes signals only a container's first process (`ray start`): `python -m densenet_ray.preempt`,
the pods' preStop hook, signals the training processes on its machine and waits for them.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

GRACE_S = float(os.environ.get("DENSENET_RAY_SIGTERM_GRACE_S", "60"))  # fits KubeRay's grace period (cluster/)
POLL_S = 1.0    # rank 0 asks the driver's flag at most this often
_requested = threading.Event()   # this process got SIGTERM while a training loop watched
_watching = False
_ray_handler = None


def install() -> None:
    """The worker_process_setup_hook: wrap the SIGTERM handler Ray's worker installs next."""
    import ray._private.utils as ray_utils

    original = ray_utils.set_sigterm_handler
    if getattr(original, "_densenet_ray", False):
        return

    def set_handler(handler):
        global _ray_handler
        _ray_handler = handler
        original(_on_sigterm)

    set_handler._densenet_ray = True
    ray_utils.set_sigterm_handler = set_handler


def _on_sigterm(signum, frame) -> None:
    if _watching and not _requested.is_set():
        _requested.set()
        timer = threading.Timer(GRACE_S, _hand_on)
        timer.daemon = True
        timer.start()
        return
    if _ray_handler is not None:
        _ray_handler(signum, frame)


def _hand_on() -> None:
    global _watching
    _watching = False
    os.kill(os.getpid(), signal.SIGTERM)   # now to Ray's handler: the worker exits


class Preempted(RuntimeError):
    """A training worker was sent SIGTERM and has checkpointed."""


def stop_watching() -> None:
    """The training loop has returned: SIGTERM ends this process again at once."""
    global _watching
    _watching = False


def flag_name(run_name: str) -> str:
    return f"densenet_ray.sigterm.{run_name}"


@ray.remote(num_cpus=0)
class _Flag:
    """The driver's request for a checkpoint, and rank 0's answer."""

    def __init__(self) -> None:
        self.asked, self.written = False, None

    def ask(self) -> None:
        self.asked = True

    def asked_for(self) -> bool:
        return self.asked

    def answer(self, where: str) -> None:
        self.written = where

    def answered(self) -> str | None:
        return self.written


class Watch:
    """A training loop's view: `requested()` is True once (on this rank) when this worker got SIGTERM
    or (rank 0) the driver did; after the checkpoint, `handled(where)` lets them go."""

    def __init__(self, run_name: str, rank: int) -> None:
        global _watching
        _watching = True
        self.flag, self.next_ask, self.reason = None, 0.0, None
        if rank == 0:
            try:
                self.flag = ray.get_actor(flag_name(run_name))
            except ValueError:   # no driver of ours (a Tune trial): SIGTERM to workers only
                self.flag = None

    def requested(self) -> str | None:
        """"worker" (this process got SIGTERM) or "driver" (rank 0: the driver did), once; else None."""
        if self.reason:
            return None
        if _requested.is_set():
            self.reason = "worker"
        elif self.flag is not None and time.monotonic() >= self.next_ask:
            self.next_ask = time.monotonic() + POLL_S
            try:
                if ray.get(self.flag.asked_for.remote(), timeout=30):
                    self.reason = "driver"
            except (ray.exceptions.RayError, TimeoutError):   # the driver's node gone: the job goes with it
                self.flag = None
        return self.reason

    def handled(self, who: str, where: str) -> None:
        """Every rank, after the checkpoint that a SIGTERM to `who` asked for. A worker sent SIGTERM
        stops training here (Preempted: Ray Train restarts the group from that checkpoint) and the
        signal goes on to Ray's handler. For the driver, rank 0 tells it where the checkpoint is
        and every rank waits for it to end the job (at most GRACE_S, then trains on)."""
        if self.reason == "worker":
            _hand_on()
            raise Preempted(f"this worker was sent SIGTERM: checkpoint written{' to ' + where if where else ''}; it "
                            "stops here, and the run resumes from that checkpoint")
        if who == "driver":
            if self.flag is not None:
                try:
                    ray.get(self.flag.answer.remote(where), timeout=30)
                except (ray.exceptions.RayError, TimeoutError):   # the driver is gone already
                    pass
            time.sleep(GRACE_S)


def on_driver_sigterm(run_name: str, say=print, flush=None) -> None:
    """In the driver's main thread, before fit(): SIGTERM checkpoints the run, then ends the driver.
    `flush`: prints the console's queued lines (rank 0's word on the checkpoint) before it exits."""
    if threading.current_thread() is not threading.main_thread():
        return
    # On the driver's node: the flag must outlive any worker node (a flag lost with a node would fail the run).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    flag = _Flag.options(name=flag_name(run_name), get_if_exists=True, scheduling_strategy=here).remote()

    def wait_and_exit() -> None:
        got.wait()
        say(f"[densenet_ray] SIGTERM: asking the workers of run {run_name!r} for a checkpoint at their next step "
            f"(waiting at most {GRACE_S:.0f} s)")
        ray.get(flag.ask.remote())
        deadline = time.monotonic() + GRACE_S
        where = None
        while where is None and time.monotonic() < deadline:
            time.sleep(0.2)
            where = ray.get(flag.answered.remote())
        try:
            if flush:
                flush()
        except Exception:   # the console's actor gone: its lines with it
            pass
        say(f"[densenet_ray] checkpoint written: {where}; the same command resumes at that step" if where else
            f"[densenet_ray] no checkpoint within {GRACE_S:.0f} s; the same command resumes from the newest one")
        leave.set()
        os.kill(os.getpid(), signal.SIGTERM)   # to the handler below, in the main thread: now the default
        time.sleep(5)
        os._exit(128 + signal.SIGTERM)         # the main thread never got to it

    def on_sigterm(signum, frame) -> None:
        if not leave.is_set():
            got.set()
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    got, leave = threading.Event(), threading.Event()
    threading.Thread(target=wait_and_exit, daemon=True, name="densenet_ray-sigterm").start()
    signal.signal(signal.SIGTERM, on_sigterm)


def stop_local(wait_s: float, processes=None) -> list[int]:
    """Kubernetes' preStop hook (cluster/kuberay): SIGTERM to this machine's training workers and
    densenet_ray drivers, then wait until they have gone (at most `wait_s`). Returns their pids."""
    import psutil

    def ours(p) -> bool:
        try:
            line = p.cmdline()
        except psutil.Error:
            return False
        return bool(line) and (line[0].startswith("ray::RayTrainWorker") or "densenet_ray.train" in line)

    found = [p for p in (processes if processes is not None else psutil.process_iter()) if ours(p)]
    for p in found:
        try:
            p.terminate()
        except psutil.Error:
            pass
    psutil.wait_procs(found, timeout=wait_s)
    return [p.pid for p in found]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m densenet_ray.preempt", description=stop_local.__doc__)
    parser.add_argument("--wait-s", type=float, default=GRACE_S + 30, help="seconds to wait for them")
    args = parser.parse_args(argv)
    pids = stop_local(args.wait_s)
    print(f"[densenet_ray] sent SIGTERM to {len(pids)} training process(es) {pids} and waited for them", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
