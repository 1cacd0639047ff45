"""Scoring, fitting and benchmarks on Ray (the ``ray`` extra): ``anomaly score|fit|benchmark --ray``.

Inputs, model and output folders must be on storage every Ray node sees at the same paths
(a shared file system); see the README's "Scaling out with Ray" section. Imports are lazy so that
scoring an export stays torch-free.
"""

from __future__ import annotations

from typing import Any

__all__ = ["fit", "run_jobs", "score"]


def __getattr__(name: str) -> Any:
    if name == "fit":
        from anomaly.distributed.fitting import fit

        return fit
    if name == "score":
        from anomaly.distributed.scoring import score

        return score
    if name == "run_jobs":
        from anomaly.distributed.jobs import run_jobs

        return run_jobs
    raise AttributeError(f"module 'anomaly.distributed' has no attribute {name!r}")
