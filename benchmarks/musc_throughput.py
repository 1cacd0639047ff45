"""MuSc mutual scoring: achieved GFLOP/s vs this machine's matmul, memory vs N, zero-shot CLI (issue 8).

1. Throughput, bottle-like shapes from configs/musc.yaml (tf_efficientnet_lite0 at 256x256:
   blocks.2 -> L = 32x32 = 1024 patches of C = 40, blocks.4 -> L = 16x16 = 256 of C = 112), N = 83
   (bottle/test). The useful work of one ``mutual_scores`` call is ``msm_flops(N, L, C)``; the
   reference is the better of two matmuls of the same shapes measured in the same run: torch.matmul
   (B, L, C) @ (B, C, L) written out whole, and (128, C) @ (C, P*L) products into an 8 MiB tile (the
   product as the MSM kernel issues it, without its min/max reductions).
   The two are alternated ``--repeats`` times and the best of each is kept (throughput under noise).
   Target: MSM >= 50 % of matmul.
2. Memory vs N (50, 100, 200) under the configured ``memory_budget_mb``: one fresh process per N
   scores random features of the same shapes with MuScScorer (r_list=(1,) to save time: memory does
   not depend on r); extra memory = peak RSS - RSS with the inputs allocated. Target: < budget.
3. ``anomaly score --zero-shot --out TMP bottle/test`` as a user runs it: seconds/image, peak RSS.

    python benchmarks/musc_throughput.py [--n 83] [--mem-sizes 50,100,200] [--skip-cli]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BOTTLE,
    add_common_args,
    anomaly_cli,
    current_rss_mib,
    machine_info,
    own_peak_rss_mib,
    print_machine,
    run_process,
    save_json,
    table,
    verdict,
)

FRACTION_TARGET = 0.5


def musc_shapes(
    config: str = "musc", size: int | None = None
) -> tuple[list[tuple[str, int, int, int]], dict[str, Any]]:
    """(layer, C, h, w) per configured layer, from the backbone's feature_info, and the scorer params."""
    import timm

    from anomaly import load_config

    cfg = load_config(config)
    h, w = (size, size) if size else cfg.backbone.image_size
    model = timm.create_model(cfg.backbone.name, pretrained=False)
    info = {i["module"]: i for i in model.feature_info}
    shapes = [
        (name, info[name]["num_chs"], h // info[name]["reduction"], w // info[name]["reduction"])
        for name in cfg.backbone.layers
    ]
    return shapes, dict(cfg.scorer.params)


def throughput(
    n: int, shapes: list[tuple[str, int, int, int]], budget: float, repeats: int, batch: int
) -> list[dict[str, Any]]:
    import torch

    from anomaly.scorers.musc import lnamd, msm_flops, mutual_scores

    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, c, h, w in shapes:
        length = h * w
        z = lnamd(torch.randn(n, c, h, w, generator=gen), 1)  # (N, L, C) unit patch vectors
        a = z[:batch].contiguous()
        bt = (
            z[batch : 2 * batch].transpose(1, 2).contiguous()
            if n >= 2 * batch
            else z[:batch].transpose(1, 2).contiguous()
        )
        flops_msm = msm_flops(n, length, c)
        flops_mm = 2 * a.shape[0] * length * length * c
        # the same product as the MSM kernel issues it: 128 query rows against P images in 8 MiB tiles
        p_img = max(1, min(n - 1, (8 * 2**20) // (128 * length * 4)))
        q, flat = z[0], z[1 : 1 + p_img].reshape(-1, c).T
        tile = torch.empty(128, flat.shape[1])
        flops_tiled = 2 * length * flat.shape[1] * c

        def tiled(q: torch.Tensor = q, flat: torch.Tensor = flat, tile: torch.Tensor = tile) -> None:
            for r0 in range(0, q.shape[0], 128):
                part = q[r0 : r0 + 128]
                torch.mm(part, flat, out=tile[: part.shape[0]])

        torch.matmul(a, bt)  # warm-up
        tiled()
        mutual_scores(z[: min(n, 4)], memory_budget_mb=budget)
        best = {"msm": float("inf"), "bmm": float("inf"), "tiled": float("inf")}
        for _ in range(repeats):
            t0 = time.perf_counter()
            mutual_scores(z, memory_budget_mb=budget)
            best["msm"] = min(best["msm"], time.perf_counter() - t0)
            for key, fn, flops in (("bmm", partial(torch.matmul, a, bt), flops_mm), ("tiled", tiled, flops_tiled)):
                inner = max(1, round(flops_msm / flops / 4))  # a comparable amount of matmul work
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                best[key] = min(best[key], (time.perf_counter() - t0) / inner)
        row = {
            "layer": name,
            "N": n,
            "L": length,
            "C": c,
            "msm_gflop": flops_msm / 1e9,
            "msm_s": best["msm"],
            "msm_gflops": flops_msm / best["msm"] / 1e9,
            "bmm_shape": f"({a.shape[0]},{length},{c})@({a.shape[0]},{c},{length})",
            "bmm_gflops": flops_mm / best["bmm"] / 1e9,
            "tiled_shape": f"({min(128, length)},{c})@({c},{flat.shape[1]})",
            "tiled_gflops": flops_tiled / best["tiled"] / 1e9,
        }
        row["matmul_gflops"] = max(row["bmm_gflops"], row["tiled_gflops"])
        row["fraction"] = row["msm_gflops"] / row["matmul_gflops"]
        rows.append(row)
    return rows


def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One N in a fresh process: RSS with inputs allocated, then the peak while scoring."""
    import torch

    from anomaly.scorers.musc import MuScScorer

    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(spec["n"], c, h, w, generator=gen) for _, c, h, w in spec["shapes"]]
    scorer = MuScScorer(r_list=tuple(spec["r_list"]), memory_budget_mb=spec["budget"], rscin_k=None)
    scorer.score([x[:2] for x in layers])  # warm-up: kernels, thread pools
    before = current_rss_mib()
    start = time.perf_counter()
    scorer.score(layers)
    seconds = time.perf_counter() - start
    peak = own_peak_rss_mib()  # VmHWM: warm-up and imports stay below the scoring peak
    return {
        "n": spec["n"],
        "inputs_mib": sum(x.numel() * 4 for x in layers) / 2**20,
        "rss_before_mib": before,
        "peak_rss_mib": peak,
        "extra_mib": peak - before,
        "seconds": seconds,
    }


def throughput_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Shapes from the config, then the timings (in its own process, so the driver stays small)."""
    shapes, params = musc_shapes(spec["config"])
    budget = spec["budget"] if spec["budget"] is not None else float(params.get("memory_budget_mb", 512))
    rows = throughput(spec["n"], shapes, budget, spec["repeats"], spec["batch"]) if spec["n"] else []
    return {"shapes": shapes, "params": params, "budget": budget, "rows": rows}


def _spawn(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--worker-spec",
            str(spec_file),
            "--worker-out",
            str(out_file),
        ]
        run_process(cmd).check()
        return json.loads(out_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="musc")
    parser.add_argument(
        "--n", type=int, default=83, help="images in the pool for the throughput part (bottle/test: 83)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternating MSM/matmul timings; best of each")
    parser.add_argument("--batch", type=int, default=16, help="batch B of the reference matmul")
    parser.add_argument("--mem-sizes", default="50,100,200", help="N for the memory part ('' to skip)")
    parser.add_argument("--budget", type=float, default=None, help="memory_budget_mb (default: the config's)")
    parser.add_argument("--test-dir", type=Path, default=BOTTLE / "test")
    parser.add_argument("--skip-cli", action="store_true", help="skip the zero-shot CLI run")
    add_common_args(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-spec", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fn = {"throughput": throughput_worker, "memory": memory_worker}[args.worker]
        Path(args.worker_out).write_text(json.dumps(fn(json.loads(Path(args.worker_spec).read_text()))))
        return

    os.environ.update(dict(item.split("=", 1) for item in args.env))
    info = machine_info()
    info["env"] = args.env
    print_machine(info)
    print(f"throughput: N={args.n}, shapes of the '{args.config}' config, best of {args.repeats} ...", flush=True)
    spec = {"config": args.config, "n": args.n, "budget": args.budget, "repeats": args.repeats, "batch": args.batch}
    res = _spawn("throughput", spec)
    shapes, params, budget, rows = res["shapes"], res["params"], res["budget"], res["rows"]
    print(f"shapes {[(n, f'L={h * w}', f'C={c}') for n, c, h, w in shapes]}, memory budget {budget:g} MB")
    payload: dict[str, Any] = {"machine": info, "shapes": shapes, "budget_mb": budget, "throughput": rows}
    headers = ["layer", "N", "L", "C", "MSM GFLOP", "MSM s", "MSM GFLOP/s", "bmm", "bmm GFLOP/s"]
    headers += ["mm in 8 MiB tiles", "tiles GFLOP/s", "MSM / best matmul", f">= {FRACTION_TARGET:.0%}"]
    keys = ["layer", "N", "L", "C", "msm_gflop", "msm_s", "msm_gflops", "bmm_shape", "bmm_gflops"]
    keys += ["tiled_shape", "tiled_gflops", "fraction"]
    print(table(headers, [[r[k] for k in keys] + [verdict(r["fraction"] >= FRACTION_TARGET)] for r in rows]))
    print(
        "bmm: (B,L,C)@(B,C,L) written out whole; tiles: the product as the MSM kernel issues it, without its"
        " reductions. The reference is the better of the two."
    )
    total = sum(r["msm_s"] for r in rows) * len(params.get("r_list", [1]))
    print(
        f"mutual scoring of the whole config (x{len(params.get('r_list', [1]))} aggregation degrees):"
        f" ~{total:.1f} s for {args.n} images = {1e3 * total / args.n:.0f} ms/image"
    )

    sizes = [int(s) for s in args.mem_sizes.split(",") if s]
    if sizes:
        print(f"\nmemory vs N (fresh process per N, r_list=(1,), budget {budget:g} MB) ...", flush=True)
        mem_rows = [_spawn("memory", {"n": n, "shapes": shapes, "budget": budget, "r_list": [1]}) for n in sizes]
        payload["memory"] = mem_rows
        print(
            table(
                [
                    "N",
                    "inputs MiB",
                    "RSS before MiB",
                    "peak RSS MiB",
                    "extra MiB",
                    "budget MiB",
                    "under budget",
                    "s (one r)",
                ],
                [
                    [
                        r["n"],
                        r["inputs_mib"],
                        r["rss_before_mib"],
                        r["peak_rss_mib"],
                        r["extra_mib"],
                        budget,
                        verdict(r["extra_mib"] <= budget),
                        r["seconds"],
                    ]
                    for r in mem_rows
                ],
            )
        )

    if not args.skip_cli:
        print(f"\nanomaly score --zero-shot on {args.test_dir} ...", flush=True)
        out = Path(tempfile.mkdtemp(prefix="anomaly-zs-"))
        try:
            n_img = sum(1 for p in args.test_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
            proc = run_process(
                [
                    *anomaly_cli(),
                    "-q",
                    "score",
                    "--zero-shot",
                    "--config",
                    args.config,
                    "--out",
                    str(out / "scores"),
                    str(args.test_dir),
                ]
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"skipped: the zero-shot CLI failed (rc={proc.returncode}): {last}")
            payload["cli"] = {"error": last}
        else:
            payload["cli"] = {
                "seconds": proc.seconds,
                "cpu_seconds": proc.cpu_seconds,
                "images": n_img,
                "s_per_image": proc.seconds / n_img,
                "peak_rss_mib": proc.peak_rss_mib,
            }
            print(
                table(
                    ["command", "images", "wall s", "s/image", "CPU s", "peak RSS MiB"],
                    [
                        [
                            "anomaly score --zero-shot",
                            n_img,
                            proc.seconds,
                            proc.seconds / n_img,
                            proc.cpu_seconds,
                            proc.peak_rss_mib,
                        ]
                    ],
                )
            )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    save_json(args.json, payload)


if __name__ == "__main__":
    main()
