"""Scaling out (issue 17): `anomaly score --ray` against the single-process `anomaly score`.

Generates N images (256 px PNG, seeded textures with a few blobs), fits a patchcore model on a
synthetic category, then scores the N images with the CLI, alternating the two paths:

* ``anomaly score --model M --out O --maps IMAGES`` (single process) and
* ``anomaly score --ray --model M --out O --maps IMAGES`` (local Ray instance sized to the machine,
  one actor per core).

Reported per path: wall seconds (whole process: imports, Ray start, model loads, writing), images/s,
and for Ray the peak RSS of every actor (``VmHWM`` of each ``ray::`` process, polled). Outputs are
compared: same rows, scores equal. A separate in-process run on a sample splits one image's time
into read (decode + resize), extract (backbone), search (k-NN in the bank), maps (smoothing and
resizing to the original size) and write (.npy + overlay PNG): what spreads over more nodes.

    python benchmarks/ray_scaling.py [--n 10000] [--repeats 1] [--json results/ray_scaling.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    _descendants,
    _status_kib,
    add_common_args,
    anomaly_cli,
    machine_info,
    print_machine,
    run_process,
)


def make_images(folder: Path, n: int, size: int = 256, seed: int = 0) -> None:
    """``n`` distinct PNG images: smooth random texture plus a few dark blobs."""
    import cv2
    import numpy as np

    if folder.is_dir() and len(list(folder.rglob("*.png"))) == n:
        return
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"{i // 1000:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        base = cv2.resize(
            rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC
        )
        noise = rng.normal(0, 6, (size, size, 3))
        image = np.clip(base.astype(np.float64) * 0.5 + 80 + noise, 0, 255).astype(np.uint8)
        for _ in range(int(rng.integers(0, 3))):
            cx, cy = (int(v) for v in rng.integers(20, size - 20, 2))
            r = int(rng.integers(3, 12))
            cv2.circle(image, (cx, cy), r, (20, 20, 20), -1)
        cv2.imwrite(str(sub / f"{i:05d}.png"), image)


class ActorPeaks:
    """Peak RSS (VmHWM, MiB) of every ``ray::`` process below ``pid``, polled every 0.2 s."""

    def __init__(self) -> None:
        self.peaks: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for pid in _descendants(me):
                try:
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue
                if name.startswith("ray::") and "IDLE" not in name:
                    hwm = _status_kib(pid, "VmHWM") / 1024
                    self.peaks[pid] = (name, max(hwm, self.peaks.get(pid, ("", 0.0))[1]))
            self._stop.wait(0.2)


def stage_times(model: Path, images: list[str], out: Path) -> dict[str, float]:
    """Milliseconds per image for read, extract, search, maps, write (in this process, single thread pool)."""
    from anomaly.data.loader import iter_batches
    from anomaly.detector import Detector
    from anomaly.outputs import relative_names, write_result

    det = Detector.load(model)
    names = relative_names([Path(p) for p in images])
    totals = dict.fromkeys(("read", "extract", "search", "maps", "write"), 0.0)
    batches = iter_batches(images, det.extractor.image_size, det.config.batch_size, keep_images=True)
    k = 0
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        t1 = time.perf_counter()
        if batch is None:
            break
        feats = det.extractor(batch.images)
        t2 = time.perf_counter()
        scored = det.scorer.score(feats.layers)
        t3 = time.perf_counter()
        results = det.finish(scored, batch.items, det.decision_, maps=True)
        t4 = time.perf_counter()
        for result, item in zip(results, batch.items):
            write_result(out, result, names[k], item.original, maps=True, overlays=True)
            k += 1
        t5 = time.perf_counter()
        for key, (a, b) in zip(totals, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))):
            totals[key] += b - a
    return {key: 1000 * value / len(images) for key, value in totals.items()}


MODES = ("local", "ray")


def measure(
    cli: list[str], env: dict[str, str], model: Path, images: Path, n: int, mode: str, out: Path
) -> dict[str, Any]:
    """One whole `anomaly score` process over ``images``; for Ray also each actor's peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*cli, "--quiet", "score", "--model", str(model), "--out", str(out), "--maps", str(images)]
    if mode == "ray":
        cmd.insert(cmd.index("score") + 1, "--ray")
    peaks = ActorPeaks()
    peaks.start()
    result = run_process(cmd, env=env).check()
    peaks.stop()
    return {
        "mode": mode,
        "n": n,
        "seconds": result.seconds,
        "images_per_s": n / result.seconds,
        "largest_process_rss_mib": result.peak_rss_mib,
        "actor_peak_rss_mib": sorted(v for name, v in peaks.peaks.values() if "ScoreWorker" in name),
        "loadavg": os.getloadavg()[0],
    }


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "scores.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--n",
        type=int,
        nargs="+",
        default=[10000],
        help="generated images to score (several: "
        "the fixed cost and the per-image rate come from the smallest and the largest)",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/anomaly-ray-scaling"))
    parser.add_argument("--stage-sample", type=int, default=256, help="images timed stage by stage")
    parser.add_argument("--stages-only", action="store_true", help=argparse.SUPPRESS)
    add_common_args(parser)
    args = parser.parse_args()
    work: Path = args.work
    model = work / "model"
    if args.stages_only:
        images = work / f"images-{args.n[-1]}"  # the worker process of the stage split
        paths = sorted(str(p) for p in images.rglob("*.png"))[: args.stage_sample]
        shutil.rmtree(work / "stages", ignore_errors=True)
        print(json.dumps(stage_times(model, paths, work / "stages")))
        return

    info = machine_info()
    print_machine(info)
    env = {**os.environ, **dict(kv.split("=", 1) for kv in args.env)}
    cli = anomaly_cli()
    work.mkdir(parents=True, exist_ok=True)
    if not (model / "meta.json").is_file():
        from anomaly.data.synthetic import make_synthetic_category

        data = make_synthetic_category(work / "data", "widget", n_train=30, n_test_good=1, n_test_defect=1, size=256)
        run_process([*cli, "fit", "--out", str(model), str(data)], env=env).check()
    runs: list[dict[str, Any]] = []
    for n in args.n:
        images = work / f"images-{n}"
        t = time.perf_counter()
        make_images(images, n)
        print(f"{n} images in {images} ({time.perf_counter() - t:.0f} s to generate)")
        for _ in range(args.repeats):
            for mode in ("local", "ray"):
                runs.append(measure(cli, env, model, images, n, mode, work / f"out-{mode}"))
                print(json.dumps(runs[-1]))
    local, ray = _rows(work / "out-local"), _rows(work / "out-ray")
    same_rows = [r["path"] for r in local] == [r["path"] for r in ray]
    max_diff = max(abs(float(a["score"]) - float(b["score"])) for a, b in zip(local, ray))
    stages = json.loads(
        run_process(
            [
                sys.executable,
                __file__,
                "--stages-only",
                "--n",
                str(args.n[-1]),
                "--work",
                str(work),
                "--stage-sample",
                str(args.stage_sample),
            ],
            env=env,
        )
        .check()
        .stdout.strip()
        .splitlines()[-1]
    )

    best = {(m, n): min(r["seconds"] for r in runs if r["mode"] == m and r["n"] == n) for m in MODES for n in args.n}
    print()
    print("| path | images | best wall (s) | images/s | actor peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for (m, n), seconds in best.items():
        actor = max((r["actor_peak_rss_mib"] for r in runs if r["mode"] == m and r["n"] == n), key=len)
        actor_txt = ", ".join(f"{v:.0f}" for v in actor) if actor else "-"
        print(f"| {m} | {n} | {seconds:.1f} | {n / seconds:.2f} | {actor_txt} |")
    lo, hi = min(args.n), max(args.n)
    summary: dict[str, Any] = {}
    for m in MODES:
        rate = (hi - lo) / (best[m, hi] - best[m, lo]) if hi > lo else hi / best[m, hi]
        fixed = best[m, hi] - hi / rate
        summary[m] = {"images_per_s": rate, "fixed_s": fixed, "seconds_at_10000": fixed + 10000 / rate}
        print(
            f"{m}: {rate:.2f} images/s beyond the fixed cost of {fixed:.1f} s; 10,000 images: "
            f"{summary[m]['seconds_at_10000']:.0f} s"
        )
    ratio = summary["local"]["seconds_at_10000"] / summary["ray"]["seconds_at_10000"]
    verdict = "PASS" if ratio >= 0.85 else "FAIL"
    print(f"\nRay / single-process throughput at 10,000 images: {ratio:.3f} (target >= 0.85: {verdict})")
    print(f"same rows in the same order: {same_rows}; largest score difference: {max_diff:.3g}")
    total = sum(stages.values())
    print("\n| stage | ms / image | share |")
    print("|---|---|---|")
    for key, value in stages.items():
        print(f"| {key} | {value:.2f} | {value / total:.0%} |")
    print(f"| total | {total:.2f} | |")
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "runs": runs,
                    "stages_ms": stages,
                    "same_rows": same_rows,
                    "max_score_diff": max_diff,
                    "summary": summary,
                    "ratio": ratio,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
