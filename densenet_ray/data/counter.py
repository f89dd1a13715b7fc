"""A Ray actor that sums numbers sent from tasks: conversion progress, rows skipped at decode (with
the reasons, for people).

    c = Counter.remote()                                   # or .options(name=..., get_if_exists=True)
    c.add.remote(64); ray.get(c.get.remote())
    c.add.remote(1, ["train: key r3: label 999 outside 0..9"]); ray.get(c.notes.remote())
"""

import ray

# Reasons kept: the first ones say what is wrong; a damaged split read every epoch would send the
# same ones again and again, and a million of them would only cost memory.
MAX_NOTES = 100


@ray.remote(num_cpus=0)
class Counter:
    def __init__(self):
        self.total = 0
        self._notes = {}   # insertion-ordered set: the same bad row skipped every epoch is one note

    def add(self, n, notes=()):
        self.total += n
        for note in notes:
            if len(self._notes) >= MAX_NOTES:
                break
            self._notes[note] = None

    def get(self):
        return self.total

    def notes(self):
        return list(self._notes)
