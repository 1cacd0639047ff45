"""The same CLI runs on the CPU and on a CUDA GPU: metrics, score differences and wall time side by side.

For each device, as a user runs it (whole processes):

* ``anomaly fit --config patchcore --set device=D`` on CATEGORY, then ``anomaly score --maps`` on its test split
  and ``anomaly evaluate``;
* ``anomaly score --zero-shot --config musc --device D --maps`` on the test split, then ``anomaly evaluate``.

Prints image / pixel AUROC and AUPRO per device and run, where each fit spent its time (the fit's own log line),
the largest score difference between the devices (relative to the largest score) and how many verdicts differ.
Needs a CUDA GPU for the default ``--devices cpu cuda``.

    python benchmarks/device_check.py [--category ROOT] [--devices cpu cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BOTTLE, add_common_args, anomaly_cli, machine_info, print_machine, run_process, save_json, table  # noqa: E402


def _scores(folder: Path) -> dict[str, tuple[float, str]]:
    with (folder / "scores.csv").open() as fh:
        return {row["path"]: (float(row["score"]), row["is_anomalous"]) for row in csv.DictReader(fh)}


def _evaluate(cli: list[str], category: Path, scores: Path, out: Path) -> dict:
    run_process([*cli, "-q", "evaluate", "--root", str(category), "--scores", str(scores), "--out", str(out)]).check()
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--category", type=Path, default=BOTTLE, help="MVTec-layout category root (default: bottle)")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="the first is compared with the others")
    add_common_args(parser)
    args = parser.parse_args()
    info = machine_info()
    print_machine(info)
    cli, test = anomaly_cli(), args.category / "test"
    tmp = Path(tempfile.mkdtemp(prefix="anomaly-device-"))
    rows, results, stages = [], {}, []
    try:
        for i, device in enumerate(args.devices):
            model, scored = tmp / f"model_{i}", tmp / f"patchcore_{i}"
            fit = run_process(
                [*cli, "fit", "--set", f"device={device}", "--out", str(model), str(args.category)]
            ).check()
            stages.append(next((line for line in fit.stderr.splitlines() if "fit took" in line), "?").strip())
            score = run_process([*cli, "-q", "score", "--model", str(model), "--maps", "--out", str(scored), str(test)])
            zero = tmp / f"musc_{i}"
            musc = run_process(
                [*cli, "-q", "score", "--zero-shot", "--device", device, "--maps", "--out", str(zero), str(test)]
            )
            for name, folder, seconds in (
                ("patchcore", scored, fit.seconds + score.check().seconds),
                ("musc", zero, musc.check().seconds),
            ):
                metrics = _evaluate(cli, args.category, folder, tmp / f"eval_{name}_{i}")
                results[(name, i)] = _scores(folder)
                rows.append(
                    [name, device, metrics["image_auroc"], metrics["pixel_auroc"], metrics.get("aupro"), seconds]
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(["run", "device", "image AUROC", "pixel AUROC", "AUPRO", "wall s (fit + score)"], rows))
    print("\n".join(f"patchcore {device}: {line}" for device, line in zip(args.devices, stages)))
    diffs = []
    for name in ("patchcore", "musc"):
        first = results[(name, 0)]
        top = max(abs(s) for s, _ in first.values())
        for i, device in enumerate(args.devices[1:], 1):
            other = results[(name, i)]
            largest = max(abs(first[p][0] - other[p][0]) for p in first) / top
            flipped = sum(first[p][1] != other[p][1] for p in first)
            diffs.append([name, f"{args.devices[0]} vs {device}", len(first), f"{largest:.1e}", flipped])
    print(table(["run", "devices", "images", "largest score difference / max score", "verdicts that differ"], diffs))
    save_json(
        args.json,
        {"machine": info, "category": str(args.category), "runs": rows, "fit_stages": stages, "differences": diffs},
    )


if __name__ == "__main__":
    main()
