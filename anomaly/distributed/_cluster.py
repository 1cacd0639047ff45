"""Connecting to Ray: an existing cluster (``address``) or a local instance sized to this machine."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import anomaly
from anomaly._runtime import usable_cpus
from anomaly.errors import DataError

__all__ = ["Workers", "cluster", "require_ray", "usable_cpus", "use_driver_cwd", "use_reserved_cpus", "workers"]

_CONNECT_TIMEOUT_S = 10  # a cluster's head answers a TCP connection at once; a busy network may take seconds
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # and an empty SETTINGS


def require_ray() -> ModuleType:
    """The ``ray`` module, or a DataError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is part of the extra)
    except ImportError as exc:
        raise DataError(f'--ray needs Ray with Ray Data: pip install "anomaly[ray]" ({exc.name} missing)') from None
    return ray


@contextlib.contextmanager
def cluster(address: str | None) -> Iterator[ModuleType]:
    """Connect to ``address`` (``auto``, ``ray://host:10001``, ``host:6379``; without one, to ``RAY_ADDRESS`` as
    ``ray.init`` does) or start a local instance.

    A Ray session already initialised by the caller is used as it is and left running; one started
    here is shut down on exit. Workers import this copy of ``anomaly`` when it is not an installed
    package (a source checkout), so a local instance always runs the driver's code.
    """
    if address is not None and not address.strip():  # `--ray-address "$HEAD"` with HEAD unset: not a local run
        raise DataError("--ray-address is empty: give auto, HOST:PORT or ray://HOST:10001 (--ray alone starts a local "
                        "Ray instance)")  # fmt: skip
    ray = require_ray()
    quiet = logging.ERROR if logging.getLogger().getEffectiveLevel() > logging.DEBUG else logging.INFO
    # Ray Data logs progress lines and the tracebacks of errors we re-raise as one line: quiet unless debugging
    logging.getLogger("ray.data").setLevel(logging.CRITICAL if quiet > logging.INFO else logging.INFO)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": quiet,
        "runtime_env": {"env_vars": _worker_env()},
    }
    where = f"--ray-address {address}" if address else "local Ray instance"
    if not address and os.environ.get("RAY_ADDRESS"):  # Ray's own variable (`ray job submit` sets it): ray.init
        address = os.environ["RAY_ADDRESS"]  # joins that cluster, and refuses the local instance's num_cpus
        where = f"RAY_ADDRESS {address}"
    if address:
        _check_reachable(address, where)
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(address="local", num_cpus=usable_cpus(), **options)  # not the last `ray start` cluster
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise DataError(f"{where}: cannot start or connect ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    finally:  # ray.init installs a SIGTERM handler that prints a stack dump and exits 15: the CLI's comes back
        if on_term is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)  # (clean-up, "terminated", exit 143)
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str, where: str) -> None:
    """DataError when nothing answers at a ``host:port`` address, or something that is not Ray's gRPC (the
    dashboard's HTTP port): ``ray.init`` retries either for minutes, printing connection warnings, before it gives
    up (``auto`` finds a running cluster or fails at once itself)."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return  # not host:port: Ray reads it (and says what is wrong with it)
    try:
        conn = socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S)
    except OSError as exc:
        raise DataError(f"{where}: nothing answers there ({exc.strerror or exc})") from None
    with conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS handshake comes first: Ray checks the rest
        reply = b""
        try:
            conn.sendall(_HTTP2_PREFACE)
            while len(reply) < 4 and (chunk := conn.recv(9 - len(reply))):  # a frame may arrive in pieces
                reply += chunk
        except OSError:  # silent, or closed on us
            pass
    if reply[3:4] != b"\x04":  # a gRPC server's first frame is its SETTINGS (HTTP/2 frame type 4)
        raise DataError(f"{where}: answers, but not as Ray does (gRPC): give the head's GCS port (6379 by default) or "
                        "ray://HOST:10001, not the dashboard's 8265")  # fmt: skip


def _worker_env() -> dict[str, str]:
    # Idle OpenMP threads sleep: spinning ones stall the other actors on shared cores (see anomaly.cli.main).
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    root = Path(anomaly.__file__).resolve().parent.parent
    if root.name not in ("site-packages", "dist-packages"):  # a source checkout: workers import it too
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return env


def use_driver_cwd(cwd: str) -> None:
    """Read relative paths (inputs, model, output folder) as the driver does: a worker runs in the folder its node's
    Ray was started in (``ray start``), where a relative OUT_DIR's maps would be written and never found. A node
    without the driver's folder keeps its own, with a warning: absolute paths work there."""
    try:
        os.chdir(cwd)
    except OSError as exc:
        logging.getLogger(__name__).warning(
            "%s: not on this node (%s): relative paths are read and written in %s", cwd, exc.strerror, os.getcwd()
        )


def use_reserved_cpus() -> None:
    """Run this actor's or task's torch, FAISS and exported-network threads on the CPUs Ray reserved for it: an
    OMP_NUM_THREADS set for the driver is inherited by every worker and would oversubscribe the node (and sum
    convolutions in another order than the 1-CPU actors a local Ray gets when it is unset). Set in the environment
    for the libraries loaded later, which read it then (an export's actor never loads torch: 700 MiB less each)."""
    import ray

    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    if cpus > 0:
        os.environ["OMP_NUM_THREADS"] = str(cpus)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(cpus)
        if "faiss" in sys.modules:
            sys.modules["faiss"].omp_set_num_threads(cpus)


@dataclass(frozen=True)
class Workers:
    """How many model-holding actors to start and what each one reserves."""

    count: int
    num_cpus: int
    num_gpus: int


def workers(ray: ModuleType, cpus_per_actor: int = 1, device: str | None = None) -> Workers:
    """One actor per GPU when the cluster has GPUs (with its share of the CPUs), else one per ``cpus_per_actor``.
    With ``device`` "cpu" the GPUs are left alone: each actor would hold one it never uses, and as few actors."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if gpus and device != "cpu":
        return Workers(gpus, max(1, cpus // gpus), 1)
    return Workers(max(1, cpus // cpus_per_actor), cpus_per_actor, 0)
