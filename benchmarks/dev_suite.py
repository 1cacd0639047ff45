"""Dev suite (issue 12): one config over several real and synthetic categories, one table with the mean.

    python benchmarks/prepare_dev_suite.py --bsdata CLONE --neu CLONE --out /tmp/devsuite   # once
    python benchmarks/dev_suite.py --config patchcore --set scorer.params.coreset_ratio=0.1 --out /tmp/ds/run1

Each category goes through :func:`anomaly.benchmark.run_benchmark` (fit on train/good, score test, evaluate),
so per-category outputs (result.json, PIMO plot, overlays) land in ``--out/<category>`` and a finished category
is skipped when re-run with the same config. The suite table (``suite.md``/``.csv``/``.json``) has one row per
category and their mean. Use ``--category`` to leave one out when tuning.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BOTTLE  # noqa: E402

from anomaly.benchmark import COLUMNS as BENCHMARK_COLUMNS  # noqa: E402
from anomaly.benchmark import run_benchmark  # noqa: E402
from anomaly.config import apply_overrides, load_config  # noqa: E402

SUITE = (
    "bottle",
    "bsdata",
    "mtd_dev",
    "mtd",
    "glass",
    "transistor",
    "kolektor",
    "mpdd",
    "mpdd_strips",
    "screw",
    "deeppcb",
    "elpv_mono",
    "elpv_poly",
    "synth_texture",
    "synth_object",
)
_OMITTED = ("pixel_ap", "image_f1max", "pixel_f1max", "peak_mem_mb", "peak_gpu_mb")
COLUMNS = [c for c in BENCHMARK_COLUMNS if c not in _OMITTED]  # the benchmark's own columns, in its order


def category_arg(value: str) -> str:
    """``--category``: a suite name, or the path of any MVTec-layout category folder (named by its folder)."""
    if value in SUITE or Path(value).is_dir():
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is neither a suite category ({', '.join(SUITE)}) nor a folder")


def suite_paths(root: Path, bottle: Path, names: list[str] | None) -> dict[str, Path]:
    """Category folder of each suite name (bottle from the shared MVTec AD copy, the rest under ``root``) or path.

    ``names=None`` means every category that prepare_dev_suite.py has written (its MTD halves are optional).
    """
    paths: dict[str, Path] = {}
    for n in names or SUITE:
        path = bottle if n == "bottle" else root / n if n in SUITE else Path(n).resolve()
        name = n if n in SUITE else path.name
        if name in paths:  # one output folder per name
            raise SystemExit(f"--category {n}: a second category named {name} ({paths[name]} is the first)")
        paths[name] = path
    return paths if names else {n: p for n, p in paths.items() if p.is_dir()}


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the suite columns."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_fmt(row.get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over categories of every numeric column (NaN/None skipped)."""
    mean: dict[str, Any] = {"category": "mean"}
    for col in COLUMNS[1:]:
        values = [r[col] for r in rows if isinstance(r.get(col), (int, float)) and r[col] == r[col]]
        if values:
            mean[col] = sum(values) / len(values)
    return mean


def write_tables(rows: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> str:
    table = format_rows(rows)
    (out / "suite.md").write_text(table + "\n")
    (out / "suite.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    with (out / "suite.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default="patchcore", help="config name or YAML path")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--root", type=Path, default=Path("/tmp/devsuite"), help="prepare_dev_suite.py output")
    parser.add_argument("--bottle", type=Path, default=BOTTLE)
    parser.add_argument(
        "--category", action="append", type=category_arg, help="suite name or category folder (repeatable); default all"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--force", action="store_true", help="re-run categories that already have results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = apply_overrides(load_config(args.config), args.overrides)
    rows, seconds = [], {}
    for name, path in suite_paths(args.root, args.bottle, args.category).items():
        start = time.perf_counter()
        table = run_benchmark("mvtec", path.parent, [path.name], config, args.out / "runs", force=args.force)
        (row,) = [r for r in table if r["category"] == path.name]  # the table also holds the earlier categories
        seconds[name] = time.perf_counter() - start
        rows.append({**row, "category": name})
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    rows.append(mean_row(rows))
    meta = {"config": args.config, "overrides": args.overrides, "wall_s": seconds, "config_dict": config.to_dict()}
    print(write_tables(rows, args.out, meta))
    print(f"total {sum(seconds.values()):.0f} s")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.3f}" if abs(value) <= 1 else f"{value:.1f}"
    return "" if value is None else str(value)


if __name__ == "__main__":
    main()
