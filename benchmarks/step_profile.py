"""Where a training step's time goes, on the workers of a real run: py-spy on every Ray Train
worker during steady state, the CPU each process of the local Ray takes over the same window, and
the model's own step measured alone and in N processes at once (what the cores give N workers
before any of our code runs).

    python benchmarks/step_profile.py                           # DenseNet-BC-100 k=12, 32 px PNGs, 1 and 2 workers
    python benchmarks/step_profile.py --row bc40 --workers 2 --after-s 40 --window-s 60
    python benchmarks/step_profile.py --neighbour 0.25     # the step alone and beside a process busy 25% of a core

Needs py-spy (`pip install py-spy`; spy.py: it reads the workers' stacks from outside, with --idle so
that waiting shows). The wall time of each worker's training thread is split by what train_one_epoch
was doing: waiting for the next batch (Ray Data's iterator), the model's forward (under DDP: its
buffer broadcast too), backward (under DDP: the gradient all-reduce that gloo overlaps with it and
waits for at the end), the optimizer, Prepare (normalisation), and our bookkeeping (counts,
progress meter, checkpoint position). The CPU table says who else ran on the cores meanwhile.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import spy  # noqa: E402
from sample_data import make_images, to_shards  # noqa: E402
import train_overhead as T  # noqa: E402

# What the training thread was doing: the first frame below train_one_epoch's that names one of these.
PARTS = (("next batch: Ray Data's iterator", ("__next__", "next", "iter_torch_batches", "batches", "_create_iterator")),
         ("forward", ("_call_impl", "_wrapped_call_impl", "forward", "autocast", "__enter__", "__exit__",
                      "cross_entropy")),
         ("backward (+ DDP all-reduce)", ("backward",)),
         ("optimizer", ("step", "update", "zero_grad", "wrapper", "scale")),
         ("Prepare (normalise)", ("__call__",)),
         ("bookkeeping (counts, meter, position)", ("_add", "add", "due", "line", "on_report")))


def classify(stack: list[str]) -> str | None:
    """The PARTS name of one sampled stack of the training thread (root first), None when it is not
    inside train_one_epoch."""
    for i, frame in enumerate(stack):
        if frame.startswith("train_one_epoch "):
            if i + 1 == len(stack):
                return "bookkeeping (counts, meter, position)"   # the loop's own lines
            callee = stack[i + 1].split(" (")[0].split(".")[-1]   # py-spy: "Class.method (file:line)"
            if "progress.py" in stack[i + 1] or "position.py" in stack[i + 1] or "publisher.py" in stack[i + 1]:
                return "bookkeeping (counts, meter, position)"
            for name, callees in PARTS:
                if callee in callees:
                    if name.startswith("next batch"):   # idle in a queue or lock: the batch was not ready
                        idle = any(f.startswith(("Queue.get", "Condition.wait", "Event.wait")) for f in stack[i + 1:])
                        return name + (", waiting" if idle else ", working on this thread")
                    return name
            return f"other ({stack[i + 1]})"
    return None


def breakdown(raw: str) -> dict[str, tuple[float, list[str]]]:
    """Share of the training thread's samples by PARTS, each with its three commonest innermost frames
    (py-spy raw: 'thread;frame;frame;... count' lines)."""
    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    leaves: dict[str, dict[str, collections.Counter]] = collections.defaultdict(lambda: collections.defaultdict(
        collections.Counter))
    for thread, frames, count in spy.stacks(raw):
        if part := classify(frames):
            threads[thread][part] += count
            leaves[thread][part][frames[-1]] += count
    if not threads:
        return {}
    main = max(threads, key=lambda t: sum(threads[t].values()))
    total = sum(threads[main].values())
    return {k: (v / total, [leaf for leaf, _ in leaves[main][k].most_common(3)]) for k, v in threads[main].most_common()}


def ray_processes(driver_pid: int) -> list:
    import psutil

    root = psutil.Process(driver_pid)
    return [root, *root.children(recursive=True)]


def role(p, driver_pid: int) -> str:
    if p.name() == "py-spy":
        return "py-spy (this profiler)"
    if p.pid == driver_pid:
        return "driver (console, MLflow)"
    title = " ".join(p.cmdline()[:2])
    if "RayTrainWorker" in title:
        return f"training worker {p.pid}"
    if "SplitCoordinator" in title:
        return "Ray Data coordinator"
    if "TrainController" in title or "_Lines" in title or "Counter" in title or "Watch" in title:
        return "Ray Train controller, our actors"
    if title.startswith("ray::") or "default_worker.py" in title or "setup_worker.py" in title:
        return "Ray Data tasks"
    return "Ray daemons (raylet, GCS, dashboard)"


def cpu_by_role(driver_pid: int) -> dict[str, float]:
    import psutil

    out: dict[str, float] = collections.defaultdict(float)
    for p in ray_processes(driver_pid):
        try:
            t = p.cpu_times()
            out[f"{p.pid}\t{role(p, driver_pid)}"] += t.user + t.system
        except psutil.Error:
            pass
    return out


def workers_of(driver_pid: int) -> list[int]:
    import psutil

    found = []
    for p in ray_processes(driver_pid):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()[:2]):
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


def watch(workers: int, after_s: float, window_s: float, tmp: str, result: dict) -> None:
    """In a thread while the run trains: find its workers, wait `after_s`, then profile them and take
    every process's CPU for `window_s`."""
    me = os.getpid()
    deadline = time.time() + 600
    while len(pids := workers_of(me)) < workers and time.time() < deadline:
        time.sleep(1)
    time.sleep(after_s)
    pids = workers_of(me)
    spies = {pid: (spy.record(pid, window_s, os.path.join(tmp, f"spy-{pid}.txt"), idle=True),
                   os.path.join(tmp, f"spy-{pid}.txt")) for pid in pids}
    c0, t0, result["start"] = cpu_by_role(me), time.perf_counter(), time.time()
    time.sleep(window_s)
    c1, wall, result["end"] = cpu_by_role(me), time.perf_counter() - t0, time.time()
    cores: dict[str, float] = collections.defaultdict(float)
    for key in c1.keys() & c0.keys():
        cores[key.split("\t")[1]] += (c1[key] - c0[key]) / wall
    result["cores"] = dict(cores)
    result["wall"] = wall
    for pid, (proc, out) in spies.items():
        _, err = proc.communicate()
        result.setdefault("profiles", {})[pid] = breakdown(out) if os.path.exists(out) else {"py-spy failed": (1.0, [])}
        if not os.path.exists(out):
            print(err.decode()[-400:], flush=True)


def _model_alone(args) -> tuple[float, float]:
    row, threads, batch, classes = args
    cpu, wall = time.process_time(), time.perf_counter()
    ms = T.model_step_ms(row, threads, batch, classes)
    return ms, (time.process_time() - cpu) / (time.perf_counter() - wall)


def model_alone(row: str, processes: int, threads: int, batch: int, classes: int) -> tuple[float, float]:
    """(median step ms, cores used) of the model alone, in `processes` processes at once (each `threads`
    threads; the means over the processes)."""
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        ms, cores = zip(*pool.map(_model_alone, [(row, threads, batch, classes)] * processes))
    return float(np.mean(ms)), float(np.mean(cores))


def _all_reduce(rank: int, world: int, port: int, numel: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    grads, times = torch.randn(numel), []
    for _ in range(25):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(grads)
        times.append(time.perf_counter() - t)
    dist.destroy_process_group()
    if rank == 0:
        out.put(1000 * float(np.median(times[5:])))


def all_reduce_ms(numel: int, world: int) -> float:
    """Median ms of one gloo all_reduce of `numel` floats (a step's gradients, as DDP sends them in
    buckets) between `world` single-threaded processes on this machine, each step's only traffic."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_all_reduce, args=(r, world, port, numel, out)) for r in range(world)]
    for p in procs:
        p.start()
    ms = out.get(timeout=300)
    for p in procs:
        p.join()
    return ms


def window_rates(tracking_uri: str, start: float, end: float) -> tuple[float | None, float | None]:
    """Mean step_images_per_s the run reported (every --progress-s) inside [start, end] and after it."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("densenet_ray")
    run = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    inside, after = [], []
    for m in client.get_metric_history(run.info.run_id, "step_images_per_s"):
        t = m.timestamp / 1000
        (inside if start + 5 <= t <= end else after if t > end + 5 else []).append(m.value)
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    return mean(inside), mean(after)


def _burn(share: float, stop) -> None:
    """Take `share` of one core until `stop` is set: busy 10*share ms of every 10 ms."""
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < 0.01 * share:
            pass
        time.sleep(0.01 * (1 - share))


def neighbour(row: str, classes: int, share: float, rounds: int) -> None:
    """The model's step in this process at every core's threads and at one thread, alone and beside
    another process busy `share` of a core (as Ray's daemons are), in alternating rounds: images/s
    and CPU ms per image. A parallel region waits for its slowest thread, so a process using every
    core loses more than the share taken, and its waiting threads burn CPU meanwhile."""
    import torch

    cpus, batch = os.cpu_count() or 1, T.ROWS[row][4]
    print(f"\nthe model's step (batch {batch}) alone and beside a process busy {share:.0%} of a core:", flush=True)
    for threads in sorted({cpus, 1}, reverse=True):
        figures: dict = collections.defaultdict(list)
        for _ in range(rounds):
            for beside in (False, True):
                stop = multiprocessing.get_context("spawn").Event()
                burner = multiprocessing.get_context("spawn").Process(target=_burn, args=(share, stop)) \
                    if beside else None
                if burner:
                    burner.start()
                    time.sleep(1)
                cpu, wall = time.process_time(), time.perf_counter()
                ms = T.model_step_ms(row, threads, batch, classes, steps=8)
                cores = (time.process_time() - cpu) / (time.perf_counter() - wall)
                if burner:
                    stop.set()
                    burner.join()
                figures[beside].append((1000 * batch / ms, ms * cores / batch))
        torch.set_num_threads(cpus)
        for beside in (False, True):
            rate, cpu_ms = (float(np.mean(v)) for v in zip(*figures[beside]))
            print(f"  {threads} thread(s), {'beside it' if beside else 'alone    '}: {rate:6.1f} img/s, "
                  f"{cpu_ms:6.1f} CPU ms/img", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--row", default="bc100", choices=[r for r in T.ROWS if T.ROWS[r][5] == "png"])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--after-s", type=float, default=50, help="after the workers start: past start-up")
    parser.add_argument("--window-s", type=float, default=90)
    parser.add_argument("--neighbour", type=float, default=0, metavar="SHARE",
                        help="instead: the model's step alone and beside a process busy SHARE of a core (e.g. 0.25), "
                             "all threads and one, in alternating rounds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.neighbour:
        neighbour(args.row, 10, args.neighbour, args.rounds)
        return
    import ray
    from densenet_ray import config as C
    from densenet_ray import data, train

    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = to_shards(make_images(os.path.join(tmp, "src"), "png", args.images), os.path.join(tmp, "png"),
                         holdout=args.images // 10)
        classes = data.load_manifest(root).num_classes
        ray.shutdown()
        train.connect(C.PRESETS["digits"].replace(workers=1, cpus_per_worker=cpus))
        _, _, _, _, batch, _ = T.ROWS[args.row]
        cpu, wall = time.process_time(), time.perf_counter()
        plain = T.plain_loop(args.row, root, 1)
        plain_cores = (time.process_time() - cpu) / (time.perf_counter() - wall)
        print(f"plain loop (pre-decoded, {cpus} threads, batch {T.ROWS[args.row][4]}): {plain:.1f} img/s, "
              f"{plain_cores:.2f} cores", flush=True)
        rows = [{"plain_img_s": plain, "plain_cores": plain_cores}]
        for workers in [int(w) for w in args.workers.split(",")]:
            threads, per = max(1, cpus // workers), batch // workers
            alone, alone_cores = model_alone(args.row, 1, threads, per, classes)
            together, _ = model_alone(args.row, workers, threads, per, classes) if workers > 1 else (alone, 0)
            numel = sum(p.numel() for p in T.network(args.row, classes).parameters())
            reduce_ms = all_reduce_ms(numel, workers) if workers > 1 else 0.0
            result: dict = {}
            watcher = threading.Thread(target=watch, args=(workers, args.after_s, args.window_s, tmp, result))
            watcher.start()
            T.ray_run(args.row, root, 1, workers, tmp, "--progress-s", "10")
            watcher.join()
            inside, after = window_rates(f"sqlite:///{tmp}/mlflow.db", result["start"], result["end"])
            step = 1000 * batch / inside
            print(f"\n{T.ROWS[args.row][0]}, {workers} worker(s) x {threads} thread(s), {per} images a step each: "
                  f"{inside:.1f} img/s in the profiled window (after it: {after or float('nan'):.1f}), step {step:.0f} "
                  f"ms; the model alone {alone:.0f} ms in one process using {alone_cores:.2f} cores"
                  + (f", {together:.0f} ms in {workers} at once; a gloo all_reduce of its {numel:,} gradients "
                     f"alone: {reduce_ms:.1f} ms" if workers > 1 else ""), flush=True)
            print(f"  {inside / plain:.2f}x the plain loop", flush=True)
            print(f"  cores used over {result.get('wall', 0):.0f} s of steady state:")
            for who, c in sorted(result.get("cores", {}).items(), key=lambda kv: -kv[1]):
                print(f"    {who:<44}{c:6.2f}")
            for pid, parts in result.get("profiles", {}).items():
                print(f"  worker {pid}'s training thread (wall time, py-spy --idle):")
                for part, (share, inner) in parts.items():
                    print(f"    {part:<60}{share:6.1%}  {share * step:7.0f} ms")
                    if share > 0.03:
                        print("        innermost: " + " | ".join(inner))
            rows.append({"workers": workers, "step_ms": step, "window_img_s": inside, "after_img_s": after,
                         "alone_ms": alone, "alone_cores": alone_cores, "together_ms": together, "all_reduce_ms": reduce_ms, **result})
        print("\n" + json.dumps(rows, default=str))


if __name__ == "__main__":
    main()
