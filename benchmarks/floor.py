"""Physical floor: `anomaly fit` / `anomaly score` against a bare decode + resize + forward pass.

All four are whole processes (imports, weight loading and output writing included):

* bare(train): decode the category's train/good images (cv2, in threads), resize to the config's
  ``backbone.image_size``, run its backbone's forward pass (its layers, input statistics and
  ``layer_scales``, batch 16; on ``--device``, by default ``auto`` as ``anomaly fit`` picks);
* ours(fit):   ``anomaly fit --config patchcore --out TMP CATEGORY``;
* bare(test):  the same as bare(train) on CATEGORY/test;
* ours(score): ``anomaly score --model TMP --out TMP2 CATEGORY/test`` (default outputs: scores.csv
  and overlay PNGs, as a user runs it).

Targets (issue 8): fit <= 1.5x bare(train), score <= 1.3x bare(test). Runs alternate
(bare, ours, bare, ours) and the median of ``--repeats`` is reported.

    python benchmarks/floor.py [--repeats 3] [--json results/floor.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BOTTLE,
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

FIT_TARGET = 1.5
SCORE_TARGET = 1.3


def bare_worker(folder: str, config_name: str, batch_size: int, device: str) -> None:
    """The floor itself: decode + resize + forward, nothing else (runs in its own process)."""
    t0 = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    import cv2
    import numpy as np

    from anomaly.config import load_config
    from anomaly.features import FeatureExtractor

    backbone = load_config(config_name).backbone  # the same backbone, input size and passes as `anomaly fit`
    extractor = FeatureExtractor(
        backbone.name,
        backbone.layers,
        weights="packaged",
        image_size=backbone.image_size,
        mean=backbone.mean,
        std=backbone.std,
        device=device,
        layer_scales=backbone.layer_scales,
    )
    height, width = extractor.image_size
    t_ready = time.perf_counter()
    paths = images_under(Path(folder))

    def load(path: Path) -> np.ndarray:
        image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)

    n_out = 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        images = pool.map(load, paths)  # decoding runs ahead of the forward pass
        batch: list[np.ndarray] = []
        for image in images:
            batch.append(image)
            if len(batch) == batch_size:
                n_out += extractor(np.stack(batch)).layers[0].shape[0]
                batch = []
        if batch:
            n_out += extractor(np.stack(batch)).layers[0].shape[0]
    t_end = time.perf_counter()
    print(json.dumps({"images": n_out, "setup_s": t_ready - t0, "work_s": t_end - t_ready}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--category", type=Path, default=BOTTLE, help="MVTec-layout category root (default: bottle)")
    parser.add_argument("--config", default="patchcore", help="config for `anomaly fit` (default: patchcore)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating repeats; the median is reported")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="device of the bare pass (auto, as `anomaly fit` picks)")
    add_common_args(parser)
    parser.add_argument("--bare-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        bare_worker(args.bare_worker, args.config, args.batch_size, args.device)
        return

    os.environ.update(dict(item.split("=", 1) for item in args.env))
    info = machine_info()
    info["env"] = args.env
    print_machine(info)
    train, test = args.category / "train" / "good", args.category / "test"
    n_train, n_test = len(images_under(train)), len(images_under(test))
    bare = [sys.executable, __file__, "--config", args.config, "--batch-size", str(args.batch_size)]
    bare += ["--device", args.device, "--bare-worker"]
    cli = anomaly_cli()
    tmp = Path(tempfile.mkdtemp(prefix="anomaly-floor-"))
    runs: dict[str, list] = {"bare_train": [], "fit": [], "bare_test": [], "score": []}
    try:
        model, scores = tmp / "model", tmp / "scores"
        for rep in range(args.repeats):
            print(f"repeat {rep + 1}/{args.repeats}: bare(train) ...", flush=True)
            runs["bare_train"].append(run_process([*bare, str(train)]).check())
            print("  anomaly fit ...", flush=True)
            runs["fit"].append(
                run_process(
                    [*cli, "-q", "fit", "--config", args.config, "--out", str(model), str(args.category)]
                ).check()
            )
            print("  bare(test) ...", flush=True)
            runs["bare_test"].append(run_process([*bare, str(test)]).check())
            shutil.rmtree(scores, ignore_errors=True)
            print("  anomaly score ...", flush=True)
            runs["score"].append(
                run_process([*cli, "-q", "score", "--model", str(model), "--out", str(scores), str(test)]).check()
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    sec = {k: median([r.seconds for r in v]) for k, v in runs.items()}
    rss = {k: median([r.peak_rss_mib for r in v]) for k, v in runs.items()}
    cpu = {k: median([r.cpu_seconds for r in v]) for k, v in runs.items()}
    inner = {k: [json.loads(r.stdout.strip().splitlines()[-1]) for r in runs[k]] for k in ("bare_train", "bare_test")}
    fit_ratio, score_ratio = sec["fit"] / sec["bare_train"], sec["score"] / sec["bare_test"]
    best = {k: min(r.seconds for r in v) for k, v in runs.items()}  # least disturbed run of each
    print()
    print(
        f"{args.category.name}: {n_train} train images, {n_test} test images,"
        f" median of {args.repeats} alternating run(s)"
    )
    print(
        table(
            ["process", "images", "wall s", "ms/image", "CPU s", "peak RSS MiB", "runs (wall s)"],
            [
                [name, n, sec[k], 1e3 * sec[k] / n, cpu[k], rss[k], _runs(runs[k])]
                for name, n, k in (
                    ("bare decode+resize+forward (train)", n_train, "bare_train"),
                    (f"anomaly fit --config {args.config}", n_train, "fit"),
                    ("bare decode+resize+forward (test)", n_test, "bare_test"),
                    ("anomaly score (default outputs)", n_test, "score"),
                )
            ],
        )
    )
    setup = median([d["setup_s"] for d in inner["bare_train"] + inner["bare_test"]])
    print(f"(bare process: {setup:.2f} s of imports + weight loading inside each bare run)")
    print()
    print(
        table(
            ["ratio", "value", "target", "verdict"],
            [
                ["fit / bare(train)", fit_ratio, f"<= {FIT_TARGET}", verdict(fit_ratio <= FIT_TARGET)],
                ["score / bare(test)", score_ratio, f"<= {SCORE_TARGET}", verdict(score_ratio <= SCORE_TARGET)],
                ["(fastest runs) fit / bare(train)", best["fit"] / best["bare_train"], "info", "-"],
                ["(fastest runs) score / bare(test)", best["score"] / best["bare_test"], "info", "-"],
                ["(CPU time) fit / bare(train)", cpu["fit"] / cpu["bare_train"], "info", "-"],
                ["(CPU time) score / bare(test)", cpu["score"] / cpu["bare_test"], "info", "-"],
            ],
        )
    )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    save_json(
        args.json,
        {
            "machine": info,
            "category": str(args.category),
            "config": args.config,
            "repeats": args.repeats,
            "seconds": sec,
            "cpu_seconds": cpu,
            "peak_rss_mib": rss,
            "fit_ratio": fit_ratio,
            "best_seconds": best,
            "score_ratio": score_ratio,
            "runs": {
                k: [{"seconds": r.seconds, "cpu_seconds": r.cpu_seconds, "peak_rss_mib": r.peak_rss_mib} for r in v]
                for k, v in runs.items()
            },
            "bare_inner": inner,
        },
    )


def _runs(results: list) -> str:
    return " ".join(f"{r.seconds:.1f}" for r in results)


if __name__ == "__main__":
    main()
