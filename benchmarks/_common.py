"""Helpers shared by the benchmark scripts: whole-process measurement, machine info, tables.

Not part of the package and not imported by tests. Every benchmark measures the system under test
as a separate process, so that wall time includes imports and model loading and peak RSS is that
process's own.

Peak RSS is read from ``VmHWM`` in /proc/PID/status, polled while the process (and any process it
started, e.g. data-loader workers) runs: the figure is the largest single process of that tree.
``ru_maxrss`` (getrusage / os.wait4) is NOT used for it: on Linux a child inherits the parent's
high-water mark across fork + exec, so a child started by a parent holding 1.5 GB reports at
least 1.5 GB however little it uses. The drivers also keep their own memory small (no torch
import in the parent) so that both figures agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# the tests' convention: ANOMALY_MVTEC_ROOT, else ../shared/datasets/mvtec_ad beside the checkout
BOTTLE = Path(os.environ.get("ANOMALY_MVTEC_ROOT", ROOT.parent / "shared" / "datasets" / "mvtec_ad")) / "bottle"


@dataclass
class ProcResult:
    """One measured process: wall seconds, peak RSS (MiB), exit code and the tail of its output."""

    cmd: list[str]
    seconds: float
    peak_rss_mib: float
    returncode: int
    cpu_seconds: float = 0.0
    stdout: str = field(repr=False, default="")
    stderr: str = field(repr=False, default="")

    def check(self) -> ProcResult:
        if self.returncode != 0:
            tail = "\n".join(self.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"command failed (rc={self.returncode}): {' '.join(self.cmd)}\n{tail}")
        return self


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--env KEY=VALUE (environment of the measured processes) and --json OUT, shared by every script."""
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the measured processes, e.g. OMP_WAIT_POLICY=PASSIVE (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def run_process(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> ProcResult:
    """Run ``cmd`` to completion: wall time from start to reap, CPU time from ``os.wait4``, peak RSS
    from polling VmHWM of the process tree every 20 ms."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        done = threading.Event()
        peak_kib = [0]
        poller = threading.Thread(target=_poll_hwm, args=(proc.pid, done, peak_kib), daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    peak = peak_kib[0] / 1024 if peak_kib[0] else usage.ru_maxrss / 1024
    cpu = usage.ru_utime + usage.ru_stime
    return ProcResult(cmd, seconds, peak, proc.returncode, cpu, stdout, stderr)


def _poll_hwm(pid: int, done: threading.Event, peak_kib: list[int]) -> None:
    while not done.is_set():
        for p in [pid, *_descendants(pid)]:
            peak_kib[0] = max(peak_kib[0], _status_kib(p, "VmHWM"))
        done.wait(0.02)


def _status_kib(pid: int | str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def current_rss_mib() -> float:
    """This process's resident set size now (VmRSS), MiB."""
    return _status_kib("self", "VmRSS") / 1024


def own_peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM, reset by exec, unlike ru_maxrss), MiB."""
    return _status_kib("self", "VmHWM") / 1024


def _descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of ``pid`` (from /proc/*/stat parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def anomaly_cli() -> list[str]:
    """The ``anomaly`` console script of this interpreter's environment (as a user runs it)."""
    script = Path(sys.executable).with_name("anomaly")
    return [str(script)] if script.exists() else [sys.executable, "-m", "anomaly"]


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load and the versions that matter for these numbers."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
        info["cpu"] = models[0] if models else platform.processor()
        info["avx512"] = "avx512f" in flags
    except OSError:
        info["cpu"] = platform.processor()
    info["cores"] = os.cpu_count()
    try:
        mem_kb = int(
            next(
                line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
            ).split()[1]
        )
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    info["loadavg_at_start"] = os.getloadavg()
    # versions from package metadata: importing torch here would make this driver process large
    from importlib.metadata import PackageNotFoundError, version

    for key, dist in (
        ("torch", "torch"),
        ("timm", "timm"),
        ("faiss", "faiss-cpu"),
        ("numpy", "numpy"),
        ("cv2", "opencv-python-headless"),
        ("anomaly", "anomaly"),
        ("anomalib", "anomalib"),
    ):
        try:
            info[key] = version(dist)
        except PackageNotFoundError:
            info[key] = None
    probe = (
        "import json, torch; print(json.dumps([torch.get_num_threads(),"
        " torch.cuda.get_device_name(0) if torch.cuda.is_available() else None]))"
    )
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
        info["torch_threads"], info["cuda"] = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        pass
    return info


def print_machine(info: dict[str, Any]) -> None:
    print(
        f"machine: {info.get('cpu')} | {info.get('cores')} cores | {info.get('memory_gib')} GiB"
        f" | AVX-512 {info.get('avx512')} | GPU {info.get('cuda')}"
    )
    print(
        f"versions: python {info.get('python')}, torch {info.get('torch')} ({info.get('torch_threads')} threads),"
        f" timm {info.get('timm')}, faiss {info.get('faiss')}, numpy {info.get('numpy')}, opencv {info.get('cv2')},"
        f" anomaly {info.get('anomaly')}" + (f", anomalib {info['anomalib']}" if info.get("anomalib") else "")
    )
    if info.get("env"):
        print(f"environment of the measured processes: {' '.join(info['env'])}")
    load = info.get("loadavg_at_start")
    if load:
        print(
            f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
            " (other jobs on a shared machine inflate wall times)"
        )


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Plain fixed-width table."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join([line, sep, *body])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.0f}" if abs(value) >= 1000 else f"{value:.2f}"
    return str(value)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else "PASS" if ok else "MISS"


def save_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=_jsonable))
    print(f"results written to {path}")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        data = asdict(obj)
        data.pop("stdout", None)
        data.pop("stderr", None)
        return data
    return str(obj)


def images_under(folder: Path) -> list[Path]:
    """PNG/JPEG files under ``folder``, sorted (what the CLI lists for a folder of MVTec images).

    Linked sub-folders are followed, as the CLI follows them (the dev suite's imports link their splits).
    """
    found = (Path(root) / name for root, _, names in os.walk(folder, followlinks=True) for name in names)
    return sorted(p for p in found if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
