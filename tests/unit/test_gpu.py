"""CUDA against CPU: the same features, distances, scores and verdicts on either device (skipped without a GPU).

Run on a GPU machine with ``python -m pytest -m gpu``. The backbone runs its convolutions in full float32 on
the GPU (not cuDNN's default TF32), so one fitted model gives the same scores, maps and verdicts on both devices.
Fitting on each device may give different coresets: greedy k-center picks diverge at near-ties once features
differ in their last bits, so fitted models are compared by scoring one of them on both devices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _images(n: int, size: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu() - b.cpu()).abs().max() / b.cpu().abs().max())


def test_features_match_the_cpu_pass() -> None:
    from anomaly.features import FeatureExtractor

    images = _images(4)
    layers = ["blocks.2", "blocks.4"]
    cpu = FeatureExtractor("tf_efficientnet_lite0", layers, image_size=(96, 96), device="cpu")(images)
    gpu = FeatureExtractor("tf_efficientnet_lite0", layers, image_size=(96, 96), device="cuda")(images)
    assert all(x.device.type == "cuda" for x in gpu.layers)
    for a, b in zip(gpu.layers, cpu.layers, strict=True):
        assert a.shape == b.shape
        assert _relative_error(a, b) < 1e-4  # full float32, not TF32


@pytest.mark.parametrize("norm_exponent", [0.0, 0.25])
def test_mutual_scores_match_the_cpu_kernel(norm_exponent: float) -> None:
    from anomaly.scorers.musc import lnamd, mutual_scores

    gen = torch.Generator().manual_seed(0)
    layer = torch.randn(12, 32, 8, 8, generator=gen)
    z = lnamd(layer, 3, norm_exponent)
    ref = lnamd(torch.randn(2, 32, 8, 8, generator=gen), 3, norm_exponent)
    for kwargs in ({}, {"aligned_window": 1, "grid": (8, 8)}):
        cpu = mutual_scores(z, reference=ref, memory_budget_mb=1, **kwargs)
        gpu = mutual_scores(z.cuda(), reference=ref.cuda(), memory_budget_mb=1, **kwargs)
        assert gpu.device.type == "cuda"
        assert torch.allclose(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)


def test_coreset_on_the_gpu_covers_like_the_cpu_one() -> None:
    from anomaly.scorers._coreset import greedy_coreset

    features = torch.randn(4000, 64, generator=torch.Generator().manual_seed(0))

    def radius(picks: np.ndarray) -> float:  # the largest distance of a row to its nearest pick
        return float(torch.cdist(features, features[torch.from_numpy(picks)]).min(1).values.max())

    cpu = greedy_coreset(features, 200, seed=0)
    gpu = greedy_coreset(features.cuda(), 200, seed=0)
    assert len(set(gpu.tolist())) == 200
    assert radius(gpu) == pytest.approx(radius(cpu), rel=0.02)


def _assert_same_results(gpu: list, cpu: list) -> None:
    np.testing.assert_allclose([r.image_score for r in gpu], [r.image_score for r in cpu], rtol=1e-4)
    assert [r.is_anomalous for r in gpu] == [r.is_anomalous for r in cpu]
    for a, b in zip(gpu, cpu, strict=True):
        assert a.anomaly_map.shape == b.anomaly_map.shape
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= 1e-3 * np.abs(b.anomaly_map).max()


def test_zero_shot_pool_scores_match_across_devices(synthetic_root: Path) -> None:
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config

    test = sorted((synthetic_root / "test").rglob("*.png"))
    results = {}
    for device in ("cpu", "cuda"):
        config = apply_overrides(load_config("musc"), ["backbone.image_size=[128,128]", f"device={device}"])
        results[device] = Detector(config).predict(test)
    _assert_same_results(results["cuda"], results["cpu"])


def test_a_model_fitted_on_the_cpu_scores_the_same_on_the_gpu(synthetic_root: Path, tmp_path: Path) -> None:
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config

    config = apply_overrides(load_config("patchcore"), ["backbone.image_size=[128,128]", "device=cpu"])
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    test = sorted((synthetic_root / "test").rglob("*.png"))
    fitted = Detector(config).fit(train)
    on_gpu = Detector.load(fitted.save(tmp_path / "model"), device="cuda")
    assert on_gpu.extractor.device.type == "cuda"
    _assert_same_results(on_gpu.predict(test), fitted.predict(test))


def test_a_model_fitted_on_the_gpu_scores_on_the_cpu(synthetic_root: Path, tmp_path: Path) -> None:
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config

    config = apply_overrides(load_config("patchcore"), ["backbone.image_size=[128,128]", "device=cuda"])
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    test = sorted((synthetic_root / "test").rglob("*.png"))
    fitted = Detector(config).fit(train)
    on_gpu = fitted.predict(test)
    loaded = Detector.load(fitted.save(tmp_path / "model"), device="cpu")
    assert loaded.extractor.device.type == "cpu"
    on_cpu = loaded.predict(test)
    _assert_same_results(on_gpu, on_cpu)
    good = [r.image_score for r, path in zip(on_gpu, test) if path.parent.name == "good"]
    defective = [r.image_score for r, path in zip(on_gpu, test) if path.parent.name != "good"]
    assert max(good) < min(defective)  # the GPU-fitted bank separates the synthetic defects
    assert [r.threshold for r in on_cpu] == [r.threshold for r in on_gpu]  # the saved decision, unchanged


def test_a_memory_bank_fitted_on_cuda_searches_on_that_gpu() -> None:
    """With a CUDA FAISS build the search runs on the features' GPU; with faiss-cpu it stays on the CPU."""
    import faiss

    from anomaly.scorers import get_scorer

    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(6, 8, 6, 6, generator=gen).cuda(), torch.randn(6, 8, 3, 3, generator=gen).cuda()]
    scorer = get_scorer("memory_bank", {"coreset_ratio": 1.0}).fit(layers)
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    assert scorer.index_ is not None
    assert scorer.index_._search_gpu == (torch.cuda.current_device() if gpus else None)
    cpu_scores = (
        get_scorer("memory_bank", {"coreset_ratio": 1.0})
        .fit([x.cpu() for x in layers])
        .score([x.cpu() for x in layers])
    )
    np.testing.assert_allclose(scorer.score(layers).image_scores, cpu_scores.image_scores, rtol=1e-4)
