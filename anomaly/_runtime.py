"""Runtime helpers: device choice, OpenMP waiting policy, peak memory."""

from __future__ import annotations

import functools
import logging
import os
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from anomaly.errors import BackendError

if TYPE_CHECKING:
    import torch

__all__ = [
    "cap_threads_to_quota",
    "cpu_threads",
    "omp_threads",
    "passive_openmp",
    "peak_rss_mb",
    "reset_peak_rss",
    "resolve_device",
    "usable_cpus",
]

log = logging.getLogger(__name__)

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")  # cpu,cpuacct on most v1 hosts, linked as cpu


@functools.cache
def _note_cpu() -> None:
    """Said once per process, not at every model built."""
    log.info("no CUDA device: running on CPU")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an explicit ``cuda`` without a GPU raises."""
    import torch  # here, not at the top: the torch-free runtime imports this module (via anomaly.index)

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        _note_cpu()
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise BackendError(f"device: unknown device '{device}' (use auto, cpu or cuda)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device: '{device}' requested but no CUDA GPU is available (use auto or cpu)")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise BackendError(
            f"device: '{device}' requested but torch sees {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1})"
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():  # else a traceback when the model moves
        raise BackendError(f"device: '{device}' requested but this torch has no usable MPS device (use auto or cpu)")
    return resolved


def passive_openmp() -> bool:
    """True when idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE, set by `import anomaly` unless the user set it).

    Short parallel loops are then safe on all cores; with spinning threads they stall badly as
    soon as another process holds a core, so callers fall back to fewer threads.
    """
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (``taskset``, a container's ``--cpuset-cpus``) capped by a
    cgroup CPU quota (a container's ``--cpus``; v2 ``cpu.max``, or v1's CFS quota and period); ``os.cpu_count()``
    counts every CPU of the host."""
    cpus = _affinity()
    quota = _cgroup_quota()
    return cpus if quota is None else min(cpus, max(1, int(quota)))


def _affinity() -> int:
    """The CPUs of this process's affinity mask (every CPU where the system has none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cgroup_quota() -> float | None:
    """CPUs allowed by this process's cgroup quota, or None where there is none (or no cgroup to read)."""
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()
        return int(quota) / int(period)
    except (OSError, ValueError):  # no cgroup v2, or no quota ("max")
        pass
    try:
        quota_us = int((_CGROUP_V1_CPU / "cpu.cfs_quota_us").read_text())
        period_us = int((_CGROUP_V1_CPU / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None  # -1: no quota


def cap_threads_to_quota() -> None:
    """Set OMP_NUM_THREADS to a CPU quota below the CPUs this process may run on (a container's ``--cpus`` 2 on a
    64-core host), unless it is set: OpenMP (torch, FAISS) reads the affinity alone and would start one thread per
    host core, each throttled by the quota. Read when torch loads, so called before that."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    cpus = usable_cpus()
    if cpus < _affinity():
        os.environ["OMP_NUM_THREADS"] = str(cpus)


def omp_threads() -> int | None:
    """OMP_NUM_THREADS as a thread count, or None when it is unset or not a number."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return None


def cpu_threads() -> int:
    """Threads for FAISS's per-call setting and OpenVINO, which read neither OMP_NUM_THREADS nor a container's quota
    by themselves: OMP_NUM_THREADS when set (as torch reads it; a Ray actor sets its reservation there, and
    ``import anomaly`` a quota below the affinity), else :func:`usable_cpus`."""
    threads = omp_threads()
    return usable_cpus() if threads is None else threads


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (VmHWM; ru_maxrss inherits a parent's peak)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> bool:
    """Restart :func:`peak_rss_mb` from the current resident size (Linux 4.0+: ``clear_refs`` mode 5), so that
    one process measures several runs apart; False where the system keeps the process's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
