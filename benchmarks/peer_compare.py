"""Side by side with anomalib 2.7.0 PatchCore on MVTec AD bottle (issue 8), in one run.

Rows, each system in its own processes (so each peak RSS is that system's own), alternating:

* anomalib  Patchcore(tf_efficientnet_lite0, blocks.2 + blocks.4, packaged ImageNet weights,
            coreset_sampling_ratio=0.1, num_neighbors=9), MVTecAD datamodule defaults, 256x256,
            Engine(accelerator="cpu", logger=False): fit and test in one process
            (benchmarks/_peer_worker.py); its own metrics on its 256x256 maps.
* ours 0.1  like-for-like: ``anomaly fit --config patchcore --set scorer.params.coreset_ratio=0.1``
* ours      default config: ``anomaly fit --config patchcore``

Ours: fit and ``anomaly score --maps`` are timed as whole CLI processes (imports, model loading and
overlay/map writing included), then image/pixel AUROC and AUPRO come from scores.csv + maps via
anomaly.evaluation.evaluate_scores (at the original resolution, and at 256x256 like the peer).

``--quick`` caps the peer's greedy k-center loop at ``--quick-picks`` picks, measures picks/s and
EXTRAPOLATES its full-coreset (21,401 picks) time; the rest of its bank is filled with random rows
so that test timing is representative. The full run (no --quick) is the reference (~30+ min).

    pip install -e '.[bench]'          # anomalib==2.7.0 + psutil
    python benchmarks/peer_compare.py --quick
    python benchmarks/peer_compare.py --json results/peer.json          # reference, slow
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BOTTLE,
    ProcResult,
    add_common_args,
    anomaly_cli,
    machine_info,
    median,
    print_machine,
    run_process,
    save_json,
    table,
    verdict,
)

TARGETS = {"fit_default": 50.0, "fit_l4l": 20.0, "score": 3.0, "rss": 0.75, "pixel_auroc": 0.987}
OURS = {
    "l4l": ("ours, coreset 0.1 (like-for-like)", ["--set", "scorer.params.coreset_ratio=0.1"]),
    "default": ("ours, default config", []),
}


def run_peer(python: str, root: Path, category: str, max_picks: int, work: Path) -> dict[str, Any]:
    out = work / "peer.json"
    cmd = [
        python,
        str(Path(__file__).with_name("_peer_worker.py")),
        "--root",
        str(root),
        "--category",
        category,
        "--out",
        str(out),
        "--max-picks",
        str(max_picks),
    ]
    proc = run_process(cmd, cwd=work).check()
    result = json.loads(out.read_text())
    result.update(process_s=proc.seconds, peak_rss_mib=proc.peak_rss_mib, cpu_s=proc.cpu_seconds)
    return result


def score_worker(model: str, test_dir: str, out: str) -> None:
    """What `anomaly score --maps` does, timed inside the process like the peer's Engine.test:
    model loading separately from scoring + writing (imports excluded)."""
    t0 = time.perf_counter()
    from anomaly import Detector
    from anomaly.data.io import list_images
    from anomaly.outputs import ScoreWriter, relative_names

    t1 = time.perf_counter()
    paths, _ = list_images([test_dir])
    detector = Detector.load(model)
    _ = detector.extractor  # backbone built and weights loaded
    t2 = time.perf_counter()
    writer = ScoreWriter(out, maps=True, overlays=True)
    for (result, image), name in zip(
        detector.predict_stream(paths, maps=True, keep_images=True), relative_names(paths)
    ):
        writer.add(result, name, image)
    writer.close()
    t3 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "score_s": t3 - t2, "n": len(paths)}))


def eval_worker(scores: str, category_root: str, model: str) -> None:
    """Metrics + bank size in a separate process: this driver stays small (see _common)."""
    from safetensors import safe_open

    from anomaly.evaluation import evaluate_scores

    metrics = evaluate_scores(scores, category_root)
    at256 = evaluate_scores(scores, category_root, eval_size=(256, 256))
    with safe_open(str(Path(model) / "state.safetensors"), "np") as fh:
        bank_rows = fh.get_slice("bank").get_shape()[0]
    metrics["pixel_auroc_256"] = at256["pixel_auroc"]
    metrics["bank_rows"] = bank_rows
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}))


def run_ours(key: str, config: str, category_root: Path, work: Path) -> dict[str, Any]:
    cli = anomaly_cli()
    model, scores = work / f"model-{key}", work / f"scores-{key}"
    shutil.rmtree(model, ignore_errors=True)
    shutil.rmtree(scores, ignore_errors=True)
    fit: ProcResult = run_process(
        [*cli, "-q", "fit", "--config", config, *OURS[key][1], "--out", str(model), str(category_root)]
    ).check()
    score = run_process(
        [*cli, "-q", "score", "--model", str(model), "--out", str(scores), "--maps", str(category_root / "test")]
    ).check()
    shutil.rmtree(scores, ignore_errors=True)
    inner = run_process(
        [sys.executable, __file__, "--score-worker", str(model), str(category_root / "test"), str(scores)]
    )
    timing = json.loads(inner.check().stdout.strip().splitlines()[-1])
    evaluated = run_process([sys.executable, __file__, "--eval-worker", str(scores), str(category_root), str(model)])
    metrics = json.loads(evaluated.check().stdout.strip().splitlines()[-1])
    bank_rows = metrics["bank_rows"]
    n_test = metrics["n_images"]
    result = {
        "fit_s": fit.seconds,
        "fit_cpu_s": fit.cpu_seconds,
        "fit_rss_mib": fit.peak_rss_mib,
        "score_s": score.seconds,
        "score_cpu_s": score.cpu_seconds,
        "score_rss_mib": score.peak_rss_mib,
        "score_ms_per_image": 1e3 * score.seconds / n_test,
        "score_inproc_ms_per_image": 1e3 * timing["score_s"] / timing["n"],
        "score_inproc_load_s": timing["load_s"],
        "n_test": n_test,
        "peak_rss_mib": max(fit.peak_rss_mib, score.peak_rss_mib),
        "bank_rows": bank_rows,
        "model_bytes": sum(f.stat().st_size for f in model.iterdir()),
        "image_auroc": metrics["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
        "aupro": metrics.get("aupro"),
        "pixel_auroc_256": metrics["pixel_auroc_256"],
    }
    shutil.rmtree(scores, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=BOTTLE.parent, help="MVTec AD root")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--config", default="patchcore", help="our default config")
    parser.add_argument("--quick", action="store_true", help="cap the peer's coreset loop and extrapolate its time")
    parser.add_argument("--quick-picks", type=int, default=100, help="greedy picks the peer runs in --quick mode")
    parser.add_argument("--repeats", type=int, default=1, help="alternating repeats; medians are reported")
    parser.add_argument("--ours", default="l4l,default", help="our rows to run: l4l,default (comma separated)")
    parser.add_argument("--skip-peer", action="store_true", help="only our rows (targets then cannot be checked)")
    parser.add_argument(
        "--peer-python",
        default=sys.executable,
        help="interpreter where anomalib==2.7.0 is importable (default: this one)",
    )
    add_common_args(parser)
    parser.add_argument("--eval-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--score-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score_worker:
        score_worker(*args.score_worker)
        return
    if args.eval_worker:
        eval_worker(*args.eval_worker)
        return
    ours_keys = [k for k in args.ours.split(",") if k]
    if unknown := set(ours_keys) - set(OURS):
        parser.error(f"--ours: unknown row(s) {sorted(unknown)}; choose from {sorted(OURS)}")

    os.environ.update(dict(item.split("=", 1) for item in args.env))
    info = machine_info()
    info["env"] = args.env
    print_machine(info)
    category_root = args.root / args.category
    max_picks = args.quick_picks if args.quick else 0
    results: dict[str, list[dict[str, Any]]] = {"peer": [], **{k: [] for k in ours_keys}}
    work = Path(tempfile.mkdtemp(prefix="anomaly-peer-"))
    try:
        for rep in range(args.repeats):
            # alternate: peer, ours, (peer, ours, ...) so that load drifts hit both alike
            if not args.skip_peer:
                print(f"repeat {rep + 1}/{args.repeats}: anomalib{' (quick)' if args.quick else ''} ...", flush=True)
                results["peer"].append(run_peer(args.peer_python, args.root, args.category, max_picks, work))
            for key in ours_keys:
                print(f"repeat {rep + 1}/{args.repeats}: {OURS[key][0]} ...", flush=True)
                results[key].append(run_ours(key, args.config, category_root, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {key: _median_dict(runs) for key, runs in results.items() if runs}
    peer = summary.get("peer")
    rows = []
    if peer:
        fit = peer.get("fit_extrapolated_s", peer["fit_s"])
        label = "anomalib 2.7.0 PatchCore" + (" [fit EXTRAPOLATED]" if args.quick else "")
        rows.append(
            [
                label,
                fit,
                peer["coreset"].get("picks_per_s"),
                None,
                peer["test_ms_per_image"],
                peer["peak_rss_mib"],
                peer["bank_rows"],
                peer["metrics"].get("image_AUROC"),
                peer["metrics"].get("pixel_AUROC"),
                None,
                None,
            ]
        )
    for key in ours_keys:
        o = summary[key]
        rows.append(
            [
                OURS[key][0],
                o["fit_s"],
                None,
                o["score_ms_per_image"],
                o["score_inproc_ms_per_image"],
                o["peak_rss_mib"],
                o["bank_rows"],
                o["image_auroc"],
                o["pixel_auroc"],
                o["pixel_auroc_256"],
                o["aupro"],
            ]
        )
    print()
    print(f"{args.category}: median of {args.repeats} alternating run(s)")
    print(
        table(
            [
                "system",
                "fit s",
                "picks/s",
                "score ms/img (process)",
                "score ms/img (in-process)",
                "peak RSS MiB",
                "bank rows",
                "image AUROC",
                "pixel AUROC",
                "pix AUROC@256",
                "AUPRO",
            ],
            rows,
        )
    )
    print(
        "ours: fit s and score ms/img (process) are whole CLI processes (imports, model load, maps + overlays"
        " written); score ms/img (in-process) times the same work after imports and model load, as Engine.test"
        " is timed; peak RSS = max(fit, score) process"
    )
    if peer:
        print(
            f"anomalib: Engine.fit / Engine.test inside one process (process wall {peer['process_s']:.1f} s incl."
            f" {peer['import_s']:.1f} s imports), peak RSS of that process, pixel AUROC on its 256x256 maps;"
            f" {peer['feature_keys_loaded']} feature keys loaded"
        )
        c = peer["coreset"]
        if args.quick:
            print(
                f"QUICK: anomalib ran {c['greedy_picks']} of {c['full_picks']} greedy picks"
                f" on {c['rows']} x {c['dims']} (projected) rows"
                f" at {c['picks_per_s']:.2f} picks/s; measured fit {peer['fit_s']:.1f} s with a"
                f" {c['measured_s']:.1f} s capped coreset -> full coreset EXTRAPOLATED to {c['extrapolated_s']:.0f} s;"
                " its bank was filled with random rows (its accuracy is approximate)"
            )
        elif c:
            print(
                f"anomalib coreset: {c.get('full_picks')} picks from {c.get('rows')} rows"
                f" in {c.get('measured_s', 0):.0f} s"
                f" ({c.get('picks_per_s', 0):.2f} picks/s)"
            )
        print()
        print(_ratios(peer, summary, args.quick))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    save_json(
        args.json, {"machine": info, "quick": args.quick, "repeats": args.repeats, "summary": summary, "runs": results}
    )


def _ratios(peer: dict[str, Any], summary: dict[str, dict[str, Any]], quick: bool) -> str:
    peer_fit = peer.get("fit_extrapolated_s", peer["fit_s"])
    tag = " (extrapolated peer fit)" if quick else ""
    rows = []
    if "default" in summary:
        o = summary["default"]
        fit_x = peer_fit / o["fit_s"]
        score_x = peer["test_ms_per_image"] / o["score_ms_per_image"]
        score_in = peer["test_ms_per_image"] / o["score_inproc_ms_per_image"]
        rss_r = o["peak_rss_mib"] / peer["peak_rss_mib"]
        img_ok = o["image_auroc"] >= peer["metrics"]["image_AUROC"]
        rows += [
            [
                "default: fit speed-up" + tag,
                fit_x,
                f">= {TARGETS['fit_default']:g}x",
                verdict(fit_x >= TARGETS["fit_default"]),
            ],
            [
                "default: scoring speed-up, whole CLI process",
                score_x,
                f">= {TARGETS['score']:g}x",
                verdict(score_x >= TARGETS["score"]),
            ],
            [
                "default: scoring speed-up, in-process (like Engine.test)",
                score_in,
                f">= {TARGETS['score']:g}x",
                verdict(score_in >= TARGETS["score"]),
            ],
            ["default: peak RSS ours / peer", rss_r, f"<= {TARGETS['rss']}", verdict(rss_r <= TARGETS["rss"])],
            [
                "default: image AUROC ours vs peer",
                f"{o['image_auroc']:.4f} vs {peer['metrics']['image_AUROC']:.4f}",
                "not lower",
                verdict(img_ok),
            ],
            [
                "default: pixel AUROC",
                o["pixel_auroc"],
                f">= {TARGETS['pixel_auroc']}",
                verdict(o["pixel_auroc"] >= TARGETS["pixel_auroc"]),
            ],
        ]
    if "l4l" in summary:
        o = summary["l4l"]
        fit_x = peer_fit / o["fit_s"]
        rows.append(
            [
                "like-for-like 0.1: fit speed-up" + tag,
                fit_x,
                f">= {TARGETS['fit_l4l']:g}x",
                verdict(fit_x >= TARGETS["fit_l4l"]),
            ]
        )
        rows.append(
            ["like-for-like 0.1: scoring speed-up", peer["test_ms_per_image"] / o["score_ms_per_image"], "info", "-"]
        )
    return table(["target (issue 8)", "value", "target", "verdict"], rows)


def _median_dict(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric field over repeats (nested dicts too); other fields from the first run."""
    first = runs[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = _median_dict([r[key] for r in runs])
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            value = median([float(r[key]) for r in runs])
            out[key] = int(value) if all(isinstance(r[key], int) for r in runs) and value.is_integer() else value
        else:
            out[key] = value
    return out


if __name__ == "__main__":
    main()
