"""Independent jobs as Ray tasks: ``anomaly benchmark --ray`` runs one category per task."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from anomaly.distributed._cluster import cluster, use_driver_cwd, use_reserved_cpus, workers
from anomaly.errors import AnomalyError

__all__ = ["run_jobs"]

T = TypeVar("T")


def run_jobs(jobs: list[Callable[[], T]], *, address: str | None = None) -> list[T]:
    """Run zero-argument callables as Ray tasks (one model-sized slot each); results in job order."""
    with cluster(address) as ray:
        plan = workers(ray)
        task = ray.remote(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_retries=2)(_call)
        try:
            return ray.get([task.remote(job, os.getcwd()) for job in jobs])
        except AnomalyError as exc:  # Ray re-raises a subclass whose text holds the remote traceback
            cause: Any = getattr(exc, "cause", exc)
            raise type(cause)(str(cause)) from None


def _call(job: Callable[[], T], cwd: str) -> T:
    use_reserved_cpus()
    use_driver_cwd(cwd)  # a relative --root or --out
    return job()
