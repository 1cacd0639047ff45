"""Deployment (issue 15): export parity, the torch-free runtime against the torch path, and `anomaly serve`.

Three parts, all on a patchcore model of the category (fitted with `anomaly fit` unless --model is given):

* parity: `anomaly export` to ONNX (and OpenVINO when installed); in one worker process the torch
  ``Detector.predict`` and the runtime's ``ExportedDetector.predict`` score every test image:
  image scores within 1e-4 relative, maps within 1e-3 absolute, identical verdicts.
* runtime vs torch, alternating processes: a latency worker (start of the process to the first
  prediction, then each test image scored alone as a service would, with its map) and the
  `anomaly score` CLI over the test folder (default outputs). Targets: runtime peak RSS <= 450 MiB,
  start to first prediction <= 1.5 s, per-image latency no worse than torch (ratio <= 1).
* serve: `anomaly serve` (real uvicorn) on the export and on the model directory; 200 requests
  from 8 concurrent clients, 5 % of them corrupt: good images must get the `anomaly score` score,
  corrupt ones 400, no 5xx, /health still 200. p50/p99 latency.

    python benchmarks/runtime.py [--repeats 3] [--model MODEL_DIR] [--json results/runtime.json]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BOTTLE,
    _status_kib,
    add_common_args,
    anomaly_cli,
    images_under,
    machine_info,
    median,
    print_machine,
    run_process,
    save_json,
    table,
    verdict,
)

RSS_TARGET_MIB = 450
FIRST_TARGET_S = 1.5
N_REQUESTS, N_CLIENTS, CORRUPT_SHARE = 200, 8, 0.05


# ------------------------------------------------------------------------------------------ workers
def _process_age() -> float:
    """Seconds since this process started (from /proc: interpreter start-up included)."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start


def latency_worker(model: str, folder: str) -> None:
    """Load ``model`` (model or export directory), score one image, then each test image alone."""
    if (Path(model) / "manifest.json").is_file():
        from anomaly.runtime import ExportedDetector

        predictor: Any = ExportedDetector(model)
    else:
        from anomaly import Detector

        predictor = Detector.load(model)
    paths = images_under(Path(folder))
    predictor.predict(paths[0])
    first = _process_age()
    latencies = []
    for path in paths:
        t = time.perf_counter()
        predictor.predict(path)
        latencies.append(time.perf_counter() - t)
    imported = sorted(m for m in ("torch", "timm") if m in sys.modules)
    print(json.dumps({"first_s": first, "latencies": latencies, "imported": imported}))


def parity_worker(model: str, folder: str, exports: list[str]) -> None:
    """Torch Detector.predict against ExportedDetector.predict on every image of ``folder``."""
    import numpy as np

    from anomaly import Detector
    from anomaly.runtime import ExportedDetector

    paths = images_under(Path(folder))
    expected = Detector.load(model).predict(paths)
    out = {}
    for export in exports:
        got = ExportedDetector(export).predict(paths)
        rel = max(abs(b.image_score - a.image_score) / abs(a.image_score) for a, b in zip(expected, got))
        maps = max(float(np.abs(a.anomaly_map - b.anomaly_map).max()) for a, b in zip(expected, got))
        out[export] = {
            "images": len(paths),
            "max_rel_score": rel,
            "max_abs_map": maps,
            "verdict_mismatches": sum(a.is_anomalous != b.is_anomalous for a, b in zip(expected, got)),
            "flagged": sum(b.is_anomalous for b in got),
            "thresholds_equal": all(a.threshold == b.threshold for a, b in zip(expected, got)),
        }
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------- serve
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _corrupt_payloads(good: Path, n: int) -> list[bytes]:
    data = good.read_bytes()
    kinds = [data[: len(data) // 3], os.urandom(4096), b"not an image", data[:16] + os.urandom(2048)]
    return [kinds[i % len(kinds)] for i in range(n)]


def serve_run(model: Path, paths: list[Path], env: dict[str, str]) -> dict[str, Any]:
    """Start `anomaly serve`, send the request mix from N_CLIENTS threads, check answers and health."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [*anomaly_cli(), "-q", "serve", "--model", str(model), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peak = [0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kib(server.pid, "VmHWM"))
            stop.wait(0.05)

    threading.Thread(target=poll, daemon=True).start()
    try:
        t0 = time.perf_counter()
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None or time.perf_counter() - t0 > 120:
                    raise RuntimeError(f"server did not start: {server.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.05)
        ready_s = time.perf_counter() - t0
        n_bad = round(N_REQUESTS * CORRUPT_SHARE)
        good = [(str(paths[i % len(paths)]), paths[i % len(paths)].read_bytes()) for i in range(N_REQUESTS - n_bad)]
        bad = [(None, payload) for payload in _corrupt_payloads(paths[0], n_bad)]
        requests = good + bad
        random.Random(0).shuffle(requests)
        local = threading.local()

        def send(item: tuple[str | None, bytes]) -> tuple[str | None, int, float, dict[str, Any]]:
            client = getattr(local, "client", None) or httpx.Client(timeout=120)
            local.client = client
            t = time.perf_counter()
            response = client.post(f"{url}/predict", files={"file": ("image.png", item[1], "image/png")})
            elapsed = time.perf_counter() - t
            return item[0], response.status_code, elapsed, response.json()

        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=N_CLIENTS) as pool:
            answers = list(pool.map(send, requests))
        wall = time.perf_counter() - t
        health = httpx.get(f"{url}/health").status_code
        metrics = httpx.get(f"{url}/metrics").text
        alive = server.poll() is None
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=30)
    return {
        "answers": answers,
        "wall_s": wall,
        "ready_s": ready_s,
        "health_after": health,
        "alive_after": alive,
        "peak_rss_mib": peak[0] / 1024,
        "metrics_lines": sum(1 for line in metrics.splitlines() if line.startswith("anomaly_")),
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def serve_summary(run: dict[str, Any], reference: dict[str, float]) -> dict[str, Any]:
    good = [a for a in run["answers"] if a[0] is not None]
    bad = [a for a in run["answers"] if a[0] is None]
    rel = [abs(a[3]["score"] - reference[a[0]]) / abs(reference[a[0]]) for a in good if a[1] == 200]
    latencies = [a[2] for a in run["answers"]]
    return {
        "requests": len(run["answers"]),
        "good_200": sum(a[1] == 200 for a in good),
        "good": len(good),
        "corrupt_400": sum(a[1] == 400 for a in bad),
        "corrupt": len(bad),
        "5xx": sum(a[1] >= 500 for a in run["answers"]),
        "max_rel_vs_score": max(rel) if rel else float("nan"),
        "p50_ms": 1e3 * _percentile(latencies, 0.5),
        "p99_ms": 1e3 * _percentile(latencies, 0.99),
        "p50_good_ms": 1e3 * _percentile([a[2] for a in good], 0.5),
        "throughput_rps": len(latencies) / run["wall_s"],
        "health_after": run["health_after"],
        "alive_after": run["alive_after"],
        "ready_s": run["ready_s"],
        "peak_rss_mib": run["peak_rss_mib"],
    }


def _scores(out: Path) -> dict[str, float]:
    with (out / "scores.csv").open() as fh:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(fh)}


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--category", type=Path, default=BOTTLE, help="MVTec-layout category root (default: bottle)")
    parser.add_argument("--model", type=Path, default=None, help="patchcore model directory (default: fit one)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; the median is reported")
    parser.add_argument("--no-serve", action="store_true", help="skip the serve part")
    add_common_args(parser)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        latency_worker(*rest) if kind == "latency" else parity_worker(rest[0], rest[1], rest[2:])
        return

    os.environ.update(dict(item.split("=", 1) for item in args.env))
    env = dict(os.environ)
    info = machine_info()
    info["env"] = args.env
    print_machine(info)
    test = args.category / "test"
    paths = images_under(test)
    cli = anomaly_cli()
    me = [sys.executable, __file__, "--worker"]
    tmp = Path(tempfile.mkdtemp(prefix="anomaly-runtime-"))
    results: dict[str, Any] = {"machine": info, "category": str(args.category), "repeats": args.repeats}
    try:
        model = args.model
        if model is None:
            model = tmp / "model"
            print("anomaly fit --config patchcore ...", flush=True)
            run_process([*cli, "-q", "fit", "--config", "patchcore", "--out", str(model), str(args.category)]).check()
        formats = ["onnx"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
        exports, export_runs = {}, {}
        for fmt in formats:
            exports[fmt] = tmp / f"export-{fmt}"
            print(f"anomaly export --format {fmt} ...", flush=True)
            export_runs[fmt] = run_process(
                [*cli, "-q", "export", "--model", str(model), "--out", str(exports[fmt]), "--format", fmt]
            ).check()

        # ---- parity
        print("parity worker ...", flush=True)
        parity_run = run_process([*me, "parity", str(model), str(test), *map(str, exports.values())]).check()
        parity = json.loads(parity_run.stdout.strip().splitlines()[-1])
        parity = {fmt: parity[str(path)] for fmt, path in exports.items()}
        print()
        print(f"parity on {args.category.name}/test ({len(paths)} images), torch Detector.predict vs runtime")
        rows = []
        for fmt, p in parity.items():
            ok = p["max_rel_score"] <= 1e-4 and p["max_abs_map"] <= 1e-3 and p["verdict_mismatches"] == 0
            rows.append([fmt, p["max_rel_score"], p["max_abs_map"], p["verdict_mismatches"], p["flagged"], verdict(ok)])
        print(table(["format", "max rel score diff", "max abs map diff", "verdict diffs", "flagged", "verdict"], rows))
        results["parity"] = parity
        results["export_seconds"] = {fmt: r.seconds for fmt, r in export_runs.items()}

        # ---- runtime vs torch, alternating
        sides = {"torch": model, "onnx": exports["onnx"]}
        workers: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
        worker_rss: dict[str, list[float]] = {k: [] for k in sides}
        clis: dict[str, list[Any]] = {k: [] for k in sides}
        for rep in range(args.repeats):
            for side, path in sides.items():
                print(f"repeat {rep + 1}/{args.repeats}: {side} latency worker ...", flush=True)
                run = run_process([*me, "latency", str(path), str(test)], env=env).check()
                workers[side].append(json.loads(run.stdout.strip().splitlines()[-1]))
                worker_rss[side].append(run.peak_rss_mib)
                out = tmp / f"scores-{side}"
                shutil.rmtree(out, ignore_errors=True)
                print(f"repeat {rep + 1}/{args.repeats}: {side} anomaly score ...", flush=True)
                clis[side].append(
                    run_process(
                        [*cli, "-q", "score", "--model", str(path), "--out", str(out), str(test)], env=env
                    ).check()
                )
        summary = {}
        for side in sides:
            per_image = [median(w["latencies"]) for w in workers[side]]
            summary[side] = {
                "first_s": median([w["first_s"] for w in workers[side]]),
                "ms_per_image_alone": 1e3 * median(per_image),
                "worker_peak_rss_mib": median(worker_rss[side]),
                "score_cli_s": median([r.seconds for r in clis[side]]),
                "score_cli_peak_rss_mib": median([r.peak_rss_mib for r in clis[side]]),
                "imported": workers[side][0]["imported"],
            }
        s_t, s_o = summary["torch"], summary["onnx"]
        ratio = s_o["ms_per_image_alone"] / s_t["ms_per_image_alone"]
        cli_ratio = s_o["score_cli_s"] / s_t["score_cli_s"]
        print()
        print(f"runtime (onnx) vs torch, median of {args.repeats} alternating run(s)")
        print(
            table(
                [
                    "path",
                    "start->1st pred s",
                    "ms/image (alone)",
                    "worker peak RSS MiB",
                    "`anomaly score` s",
                    "score peak RSS MiB",
                    "torch/timm imported",
                ],
                [
                    [
                        side,
                        s["first_s"],
                        s["ms_per_image_alone"],
                        s["worker_peak_rss_mib"],
                        s["score_cli_s"],
                        s["score_cli_peak_rss_mib"],
                        ",".join(s["imported"]) or "no",
                    ]
                    for side, s in summary.items()
                ],
            )
        )
        rss = max(s_o["worker_peak_rss_mib"], s_o["score_cli_peak_rss_mib"])
        print(
            table(
                ["check", "value", "target", "verdict"],
                [
                    ["runtime peak RSS MiB (max of both)", rss, f"<= {RSS_TARGET_MIB}", verdict(rss <= RSS_TARGET_MIB)],
                    [
                        "runtime start->1st prediction s",
                        s_o["first_s"],
                        f"<= {FIRST_TARGET_S}",
                        verdict(s_o["first_s"] <= FIRST_TARGET_S),
                    ],
                    ["per-image latency onnx/torch", ratio, "<= 1", verdict(ratio <= 1)],
                    ["(info) `anomaly score` wall onnx/torch", cli_ratio, "info", "-"],
                ],
            )
        )
        results["runtime_vs_torch"] = summary
        results["latency_ratio"] = ratio
        results["score_cli_ratio"] = cli_ratio

        # ---- serve
        if not args.no_serve:
            reference = _scores(tmp / "scores-onnx")
            torch_reference = _scores(tmp / "scores-torch")
            serve = {}
            for side, path in sides.items():
                print(f"serve {side}: {N_REQUESTS} requests, {N_CLIENTS} clients ...", flush=True)
                run = serve_run(path, paths, env)
                serve[side] = serve_summary(run, reference if side == "onnx" else torch_reference)
                if side == "onnx":
                    serve[side]["max_rel_vs_torch_score"] = serve_summary(run, torch_reference)["max_rel_vs_score"]
            print()
            print(f"serve: {N_REQUESTS} requests from {N_CLIENTS} concurrent clients, {CORRUPT_SHARE:.0%} corrupt")
            print(
                table(
                    [
                        "served",
                        "good 200",
                        "corrupt 400",
                        "5xx",
                        "max rel vs `anomaly score`",
                        "p50 ms",
                        "p99 ms",
                        "req/s",
                        "health after",
                        "peak RSS MiB",
                        "verdict",
                    ],
                    [
                        [
                            side,
                            f"{s['good_200']}/{s['good']}",
                            f"{s['corrupt_400']}/{s['corrupt']}",
                            s["5xx"],
                            f"{s['max_rel_vs_score']:.1e}",
                            s["p50_ms"],
                            s["p99_ms"],
                            s["throughput_rps"],
                            s["health_after"],
                            s["peak_rss_mib"],
                            verdict(
                                s["good_200"] == s["good"]
                                and s["corrupt_400"] == s["corrupt"]
                                and s["5xx"] == 0
                                and s["max_rel_vs_score"] <= 1e-4
                                and s["health_after"] == 200
                                and s["alive_after"]
                            ),
                        ]
                        for side, s in serve.items()
                    ],
                )
            )
            print(
                f"(served export vs torch `anomaly score`: max rel diff {serve['onnx']['max_rel_vs_torch_score']:.2g})"
            )
            results["serve"] = serve
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    save_json(args.json, results)


if __name__ == "__main__":
    main()
