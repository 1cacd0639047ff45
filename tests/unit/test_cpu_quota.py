"""A container's CPU quota caps the threads OpenMP (torch, FAISS) would start per host core."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from anomaly import _runtime


@pytest.fixture
def eight_cpus_two_allowed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    (tmp_path / "cpu.max").write_text("200000 100000\n")  # docker run --cpus 2
    monkeypatch.setattr(_runtime, "_CGROUP_CPU_MAX", tmp_path / "cpu.max")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.usefixtures("eight_cpus_two_allowed")
def test_a_quota_below_the_affinity_becomes_omp_num_threads() -> None:
    _runtime.cap_threads_to_quota()
    assert os.environ["OMP_NUM_THREADS"] == "2"


@pytest.mark.usefixtures("eight_cpus_two_allowed")
def test_a_users_omp_num_threads_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    _runtime.cap_threads_to_quota()
    assert os.environ["OMP_NUM_THREADS"] == "6"


def test_without_a_quota_nothing_is_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(_runtime, "_CGROUP_CPU_MAX", tmp_path / "missing")
    monkeypatch.setattr(_runtime, "_CGROUP_V1_CPU", tmp_path / "missing")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    _runtime.cap_threads_to_quota()
    assert "OMP_NUM_THREADS" not in os.environ
