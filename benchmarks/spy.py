"""py-spy from outside, for the benchmarks that profile a live run (step_profile.py, input_ceiling.py --spy).

    proc = record(pid, seconds, "/tmp/out.txt", idle=True)   # start; proc.wait() when the window ends
    for thread, frames, count in stacks("/tmp/out.txt"): ...  # frames root first, "Class.function (file:line)"

py-spy (`pip install py-spy`) reads a process's Python stacks without stopping it (--nonblocking:
stopping it 50 times a second slowed a training step by a third here); its own CPU is its own
process's, which the benchmarks show apart.
"""

from __future__ import annotations

import os
import subprocess
import sys


def record(pid: int, seconds: float, out: str, idle: bool, rate: int = 25) -> subprocess.Popen:
    """py-spy record of `pid` for `seconds` into `out` (raw: one 'thread;frame;...;frame count' line a
    stack). idle: also the samples of threads that were waiting (wall time, not CPU time)."""
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return subprocess.Popen([exe, "record", *(["--idle"] if idle else []), "--threads", "--nonblocking", "--format",
                             "raw", "--rate", str(rate), "-d", str(max(1, int(seconds))), "-p", str(pid), "-o", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stacks(raw: str):
    """(thread, frames root first, samples) of each line of a raw py-spy record; nothing when py-spy
    wrote no file (the process ended, or py-spy could not attach)."""
    if not os.path.exists(raw):
        return
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            thread, *frames = stack.split(";")
            yield thread, frames, int(count)
