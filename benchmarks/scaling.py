"""Scaling of the memory-bank detector with the number of training images (issue 8).

1. fit/score on generated images (anomaly.data.synthetic, ``--image-size`` px, default 64 so that
   5000 images fit the time budget on 2 cores: 64 patches per image, 320k patches at N=5000), for
   two bank policies, each point in a fresh process (peak RSS is that point's own):

   * ``ratio``: coreset_ratio p fixed (default 0.04 as configs/patchcore.yaml): p*N*HW picks, each
     costing O(N*HW) -> p*N^2 work;
   * ``cap``:   the same ratio with ``max_bank`` M: at most M picks -> fit linear in N.

   Reported: fit s, feature-extraction s, coreset s, scoring ms/image, bank rows, serialized
   index bytes, model bytes, peak RSS.

2. Flat vs HNSW (``HNSW32,Flat``, the index ``auto`` picks for banks > 200k rows): recall@1 against
   exact search on large banks built from real backbone features of the generated images
   (random subsets of all training patches, up to 214,016 rows = bottle's full patch set), with
   build and search times. Target: recall@1 >= 0.95.

3. bottle: pixel AUROC with the HNSW index vs the exact Flat index on the same bank
   (``--bottle-set`` overrides the config, e.g. scorer.params.coreset_ratio=0.1 for a larger bank).
   Target: |difference| <= 0.002.

    python benchmarks/scaling.py                       # all parts, default sizes 50,200,1000,5000
    python benchmarks/scaling.py --sizes 50,200 --parts fit
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
    add_common_args,
    images_under,
    machine_info,
    own_peak_rss_mib,
    print_machine,
    run_process,
    save_json,
    table,
    verdict,
)

RECALL_TARGET = 0.95
AUROC_TOLERANCE = 0.002


# ----------------------------------------------------------------------------- workers (own process)
def worker_generate(spec: dict[str, Any]) -> dict[str, Any]:
    from anomaly.data.synthetic import make_synthetic_category

    root = make_synthetic_category(
        spec["out"], n_train=spec["n_train"], n_test_good=25, n_test_defect=25, size=spec["size"]
    )
    return {"root": str(root)}


def worker_fit(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    import anomaly.scorers.memory_bank as memory_bank
    from anomaly import Detector, load_config
    from anomaly.config import apply_overrides

    timings = {"coreset_s": 0.0}
    original = memory_bank.greedy_coreset

    def timed_coreset(*args: Any, **kwargs: Any) -> Any:  # benchmark-only wrapper, the package is untouched
        start = time.perf_counter()
        out = original(*args, **kwargs)
        timings["coreset_s"] += time.perf_counter() - start
        return out

    memory_bank.greedy_coreset = timed_coreset
    train = sorted(Path(spec["train"]).glob("*.png"))[: spec["n"]]
    test = images_under(Path(spec["test"]))
    config = apply_overrides(load_config("patchcore"), spec["overrides"])
    det = Detector(config)
    size = det.extractor.image_size  # backbone creation and first-call warm-up are not part of the curve
    det.extractor(np.zeros((config.batch_size, *size, 3), np.uint8))
    marks: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        marks[stage] = time.perf_counter()

    fit_start = time.perf_counter()
    det.fit(train, progress=progress)
    fit_s = time.perf_counter() - fit_start
    start = time.perf_counter()
    det.predict(test)
    score_s = time.perf_counter() - start
    scorer = det.scorer
    with tempfile.TemporaryDirectory() as tmp:
        det.save(Path(tmp) / "model")
        model_bytes = sum(f.stat().st_size for f in (Path(tmp) / "model").iterdir())
    return {
        "n": spec["n"],
        "policy": spec["policy"],
        "patches": spec["n"] * _grid_area(det),
        "fit_s": fit_s,
        "features_s": marks["features"] - fit_start,
        "coreset_s": timings["coreset_s"],
        "score_ms_per_image": 1e3 * score_s / len(test),
        "bank_rows": int(scorer.bank_.shape[0]),
        "index_bytes": int(len(scorer.index_.serialize())),
        "model_bytes": model_bytes,
        "own_peak_rss_mib": own_peak_rss_mib(),
    }


def _grid_area(det: Any) -> int:
    h, w = det.extractor.image_size
    return (h // 8) * (w // 8)  # blocks.2 grid (stride 8) = the patch grid of the bank


def worker_recall(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from anomaly import Detector, load_config
    from anomaly.config import apply_overrides
    from anomaly.index import NNIndex
    from anomaly.scorers._aggregate import patch_embeddings

    config = apply_overrides(load_config("patchcore"), spec["overrides"])
    det = Detector(config)

    def embed(paths: list[Path]) -> np.ndarray:
        import cv2

        out = []
        size = det.extractor.image_size
        for i in range(0, len(paths), 64):
            batch = np.stack(
                [cv2.resize(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), size[::-1]) for p in paths[i : i + 64]]
            )
            emb = patch_embeddings([layer for layer in det.extractor(batch).layers])
            out.append(emb.reshape(-1, emb.shape[-1]).numpy())
        return np.concatenate(out)

    train = sorted(Path(spec["train"]).glob("*.png"))[: spec["n"]]
    start = time.perf_counter()
    pool = embed(train)
    features_s = time.perf_counter() - start
    queries = embed(images_under(Path(spec["test"])))
    rng = np.random.default_rng(0)
    rows = []
    for size in spec["bank_sizes"]:
        if size > len(pool):
            continue
        bank = pool[np.sort(rng.choice(len(pool), size, replace=False))]
        row: dict[str, Any] = {"bank_rows": size, "queries": len(queries), "dims": bank.shape[1]}
        exact = None
        for name in ("Flat", *spec["indexes"]):
            t0 = time.perf_counter()
            index = NNIndex(name).build(bank)
            t1 = time.perf_counter()
            dist, ids = index.search(queries, 1)
            t2 = time.perf_counter()
            row[f"{name}:build_s"] = t1 - t0
            row[f"{name}:search_ms_per_1k"] = 1e3 * (t2 - t1) / len(queries) * 1000
            row[f"{name}:index_bytes"] = int(len(index.serialize()))
            if exact is None:
                exact = (dist[:, 0], ids[:, 0])
            else:
                same = ids[:, 0] == exact[1]
                tie = np.isclose(dist[:, 0], exact[0], rtol=1e-5, atol=1e-6)  # another row at the same distance
                row[f"{name}:recall@1"] = float(np.mean(same | tie))
                row[f"{name}:dist_ratio_max"] = float(np.max(dist[:, 0] / np.maximum(exact[0], 1e-12)))
        rows.append(row)
    return {"pool_rows": len(pool), "features_s": features_s, "banks": rows}


def worker_bottle(spec: dict[str, Any]) -> dict[str, Any]:
    from anomaly import Detector, load_config
    from anomaly.config import apply_overrides
    from anomaly.data.datasets import load_mvtec
    from anomaly.evaluation import evaluate_samples
    from anomaly.index import NNIndex

    data = load_mvtec(spec["root"])
    det = Detector(apply_overrides(load_config("patchcore"), spec["overrides"]))
    start = time.perf_counter()
    det.fit([s.image_path for s in data.train])
    fit_s = time.perf_counter() - start
    test = data.test
    out: dict[str, Any] = {"bank_rows": int(det.scorer.bank_.shape[0]), "fit_s": fit_s}
    for name in ("Flat", *spec["indexes"]):
        det.scorer.index = name
        t0 = time.perf_counter()
        det.scorer.index_ = NNIndex(name).build(det.scorer.bank_)
        t1 = time.perf_counter()
        results = det.predict([s.image_path for s in test])
        t2 = time.perf_counter()
        metrics = evaluate_samples([r.image_score for r in results], test, [r.anomaly_map for r in results]).metrics
        out[name] = {
            "build_s": t1 - t0,
            "predict_s": t2 - t1,
            "image_auroc": metrics["image_auroc"],
            "pixel_auroc": metrics["pixel_auroc"],
        }
    return out


# ----------------------------------------------------------------------------- driver
def _spawn(kind: str, spec: dict[str, Any], work: Path) -> tuple[dict[str, Any], float, float]:
    spec_file = work / "spec.json"
    out_file = work / "out.json"
    spec_file.write_text(json.dumps(spec))
    proc = run_process(
        [sys.executable, __file__, "--worker", kind, "--worker-spec", str(spec_file), "--worker-out", str(out_file)]
    ).check()
    return json.loads(out_file.read_text()), proc.seconds, proc.peak_rss_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="50,200,1000,5000", help="training-set sizes (comma separated)")
    parser.add_argument("--parts", default="fit,recall,bottle", help="which parts to run: fit,recall,bottle")
    parser.add_argument("--image-size", type=int, default=64, help="generated image side in px (default 64)")
    parser.add_argument("--ratio", type=float, default=0.04, help="coreset ratio of both policies (default 0.04)")
    parser.add_argument("--max-bank", type=int, default=1000, help="bank cap of the 'cap' policy (default 1000)")
    parser.add_argument("--recall-banks", default="20000,100000,214016", help="bank sizes for the recall test")
    parser.add_argument("--recall-index", default="HNSW32,Flat", help="approximate index(es), ';'-separated")
    parser.add_argument("--bottle", type=Path, default=BOTTLE, help="category root for the AUROC check")
    parser.add_argument("--bottle-set", action="append", default=[], help="config override for the bottle check")
    add_common_args(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-spec", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(Path(args.worker_spec).read_text())
        workers = {"generate": worker_generate, "fit": worker_fit, "recall": worker_recall, "bottle": worker_bottle}
        fn = workers[args.worker]
        Path(args.worker_out).write_text(json.dumps(fn(spec)))
        return

    os.environ.update(dict(item.split("=", 1) for item in args.env))
    info = machine_info()
    info["env"] = args.env
    print_machine(info)
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    parts = set(args.parts.split(","))
    indexes = [s for s in args.recall_index.split(";") if s]
    work = Path(tempfile.mkdtemp(prefix="anomaly-scaling-"))
    size_px = args.image_size
    base = [f"backbone.image_size=[{size_px},{size_px}]"]
    payload: dict[str, Any] = {"machine": info, "image_size": size_px, "ratio": args.ratio, "max_bank": args.max_bank}
    try:
        n_gen = max(sizes) if "fit" in parts else 0
        grid = (size_px // 8) ** 2
        if "recall" in parts:
            n_gen = max(n_gen, -(-max(int(b) for b in args.recall_banks.split(",")) // grid))
        if n_gen:
            t0 = time.perf_counter()
            spec = {"out": str(work / "data"), "n_train": n_gen, "size": size_px}
            root = Path(_spawn("generate", spec, work)[0]["root"])
            print(
                f"generated {n_gen} + 50 images of {size_px}x{size_px} px in {time.perf_counter() - t0:.1f} s"
                f" ({grid} patches per image)"
            )
            train, test = str(root / "train" / "good"), str(root / "test")

        if "fit" in parts:
            rows = []
            for n in sizes:
                for policy, extra in (("ratio", []), ("cap", [f"scorer.params.max_bank={args.max_bank}"])):
                    spec = {
                        "n": n,
                        "policy": policy,
                        "train": train,
                        "test": test,
                        "overrides": [*base, f"scorer.params.coreset_ratio={args.ratio}", *extra],
                    }
                    print(f"fit N={n} policy={policy} ...", flush=True)
                    res, wall, rss = _spawn("fit", spec, work)
                    res.update(process_s=wall, process_rss_mib=rss)
                    rows.append(res)
            payload["fit"] = rows
            print()
            print(
                f"fit/score scaling: {size_px}x{size_px} px generated images, coreset ratio {args.ratio},"
                f" cap policy max_bank={args.max_bank}; scoring on 50 test images; one process per row"
            )
            print(
                table(
                    [
                        "N",
                        "policy",
                        "patches",
                        "fit s",
                        "features s",
                        "coreset s",
                        "score ms/img",
                        "bank rows",
                        "index bytes",
                        "model bytes",
                        "peak RSS MiB",
                    ],
                    [
                        [
                            r["n"],
                            r["policy"],
                            r["patches"],
                            r["fit_s"],
                            r["features_s"],
                            r["coreset_s"],
                            r["score_ms_per_image"],
                            r["bank_rows"],
                            r["index_bytes"],
                            r["model_bytes"],
                            r["process_rss_mib"],
                        ]
                        for r in rows
                    ],
                )
            )
            _print_growth(rows)

        if "recall" in parts:
            banks = [int(b) for b in args.recall_banks.split(",") if b]
            n_img = -(-max(banks) // grid)
            print(f"\nrecall N={n_img} images -> up to {max(banks)} bank rows ...", flush=True)
            spec = {
                "n": n_img,
                "train": train,
                "test": test,
                "overrides": base,
                "bank_sizes": banks,
                "indexes": indexes,
            }
            res, wall, rss = _spawn("recall", spec, work)
            payload["recall"] = res
            rows = []
            for b in res["banks"]:
                for name in ("Flat", *indexes):
                    recall = b.get(f"{name}:recall@1")
                    rows.append(
                        [
                            b["bank_rows"],
                            name,
                            b[f"{name}:build_s"],
                            b[f"{name}:search_ms_per_1k"],
                            b[f"{name}:index_bytes"],
                            1.0 if name == "Flat" else recall,
                            "exact" if name == "Flat" else verdict(recall >= RECALL_TARGET),
                        ]
                    )
            print(
                f"nearest-neighbour recall@1 vs exact: {res['banks'][0]['queries']} test-patch queries,"
                f" banks = random subsets of {res['pool_rows']} real training-patch embeddings"
                f" ({res['banks'][0]['dims']} dims)"
            )
            print(
                table(
                    [
                        "bank rows",
                        "index",
                        "build s",
                        "search ms/1k queries",
                        "index bytes",
                        "recall@1",
                        f">= {RECALL_TARGET}",
                    ],
                    rows,
                )
            )

        if "bottle" in parts:
            print(f"\nbottle: Flat vs {', '.join(indexes)} on the same bank ...", flush=True)
            spec = {"root": str(args.bottle), "overrides": args.bottle_set, "indexes": indexes}
            res, wall, rss = _spawn("bottle", spec, work)
            payload["bottle"] = res
            flat = res["Flat"]
            rows = [
                [
                    "Flat",
                    res["bank_rows"],
                    flat["build_s"],
                    flat["predict_s"],
                    flat["image_auroc"],
                    flat["pixel_auroc"],
                    None,
                    "exact",
                ]
            ]
            for name in indexes:
                r = res[name]
                diff = r["pixel_auroc"] - flat["pixel_auroc"]
                rows.append(
                    [
                        name,
                        res["bank_rows"],
                        r["build_s"],
                        r["predict_s"],
                        r["image_auroc"],
                        r["pixel_auroc"],
                        f"{diff:+.5f}",
                        verdict(abs(diff) <= AUROC_TOLERANCE),
                    ]
                )
            print(
                f"{args.bottle.name} ({' '.join(args.bottle_set) or 'default patchcore config'}),"
                " maps at original resolution"
            )
            print(
                table(
                    [
                        "index",
                        "bank rows",
                        "build s",
                        "predict s (83 img)",
                        "image AUROC",
                        "pixel AUROC",
                        "diff vs Flat",
                        f"|diff| <= {AUROC_TOLERANCE}",
                    ],
                    rows,
                )
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    save_json(args.json, payload)


def _print_growth(rows: list[dict[str, Any]]) -> None:
    """Log-log slope of fit and coreset time between the two largest N of each policy."""
    for policy in ("ratio", "cap"):
        pts = sorted((r["n"], r["fit_s"], r["coreset_s"]) for r in rows if r["policy"] == policy)
        if len(pts) < 2:
            continue
        (n0, f0, c0), (n1, f1, c1) = pts[-2], pts[-1]
        print(
            f"{policy}: N {n0} -> {n1}: fit time x{f1 / f0:.1f} (exponent {_slope(n0, n1, f0, f1):.2f}),"
            f" coreset time x{c1 / max(c0, 1e-9):.1f} (exponent {_slope(n0, n1, c0, c1):.2f})"
        )


def _slope(n0: int, n1: int, a: float, b: float) -> float:
    """Exponent k of time ~ N^k between two points."""
    import math

    return math.log(b / a) / math.log(n1 / n0) if a > 0 and b > 0 else float("nan")


if __name__ == "__main__":
    main()
