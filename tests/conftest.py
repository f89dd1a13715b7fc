"""Shared fixtures: one local Ray instance for the whole session (ray.init takes ~2 s and a
busy 2-core machine makes every extra start expensive)."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance shared by every test that needs one; stopped at the end."""
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on a 2-core machine: two 1-CPU training workers must leave room for
        # Ray Data's read/decode tasks, or the pipeline starves and the test hangs.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    yield ray
    ray.shutdown()
