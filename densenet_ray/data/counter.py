"""A Ray actor that sums numbers sent from tasks: conversion progress, rows skipped at decode.

    c = Counter.remote()                                   # or .options(name=..., get_if_exists=True)
    c.add.remote(64); ray.get(c.get.remote())
"""

import ray


@ray.remote(num_cpus=0)
class Counter:
    def __init__(self):
        self.total = 0

    def add(self, n):
        self.total += n

    def get(self):
        return self.total
