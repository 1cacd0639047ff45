"""Hub backbones (DINOv2, WideResNet-50, CLIP) and their shipped configs, with random weights (no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anomaly import Detector
from anomaly.config import apply_overrides, load_config
from anomaly.features import FeatureExtractor


@pytest.mark.parametrize(
    ("name", "size", "grid", "dim"),
    [
        ("vit_small_patch14_reg4_dinov2.lvd142m", (70, 98), (5, 7), 384),  # 4 registers + CLS dropped from the map
        ("vit_small_patch14_reg4_dinov2.lvd142m", (100, 110), (7, 8), 384),  # not a multiple of 14: the nearest
        ("vit_base_patch16_clip_224.openai", (64, 96), (4, 6), 768),
        ("vit_medium_patch16_gap_256", (64, 96), (4, 6), 512),  # no CLS or register token (as SigLIP): was a crash
    ],
)
def test_vit_token_maps(name: str, size: tuple[int, int], grid: tuple[int, int], dim: int) -> None:
    fx = FeatureExtractor(name, ["blocks.3", "blocks.5"], pretrained=False, image_size=size, device="cpu")
    patch = 16 if "patch16" in name else 14
    assert fx.image_size == (grid[0] * patch, grid[1] * patch)  # whole patches: every input pixel is seen
    out = fx(np.random.default_rng(0).integers(0, 255, (2, *fx.image_size, 3), dtype=np.uint8))
    assert [tuple(t.shape) for t in out.layers] == [(2, dim, *grid)] * 2
    assert tuple(out.embedding.shape) == (2, dim) and bool(out.embedding.isfinite().all())


@pytest.mark.parametrize(
    ("name", "layers", "size", "shapes"),
    [
        ("deit_tiny_patch16_224", ["blocks.1", "blocks.2"], (96, 128), [(192, 6, 8)] * 2),  # a ViT without "vit"
        ("efficientvit_b0", ["stages.1", "stages.2"], (96, 128), [(32, 12, 16), (64, 6, 8)]),  # a CNN with "vit"
        ("swin_tiny_patch4_window7_224", ["layers.1", "layers.2"], (256, 320), [(192, 32, 40), (384, 16, 20)]),
        ("pvt_v2_b0", ["stages.1", "stages.2"], (96, 128), [(64, 12, 16), (160, 6, 8)]),  # no prefix tokens
    ],
)
def test_other_transformer_families_at_any_size(name: str, layers: list[str], size: tuple[int, int], shapes) -> None:
    """The model's constructor, not its name, says whether it takes an input size; hierarchical ones give maps."""
    fx = FeatureExtractor(name, layers, pretrained=False, image_size=size, device="cpu")
    out = fx(np.random.default_rng(0).integers(0, 255, (2, *size, 3), dtype=np.uint8))
    assert [tuple(t.shape[1:]) for t in out.layers] == shapes
    assert out.embedding.shape == (2, shapes[-1][0]) and bool(out.embedding.isfinite().all())


@pytest.mark.parametrize(
    ("name", "grid"),
    [
        ("cait_xxs24_224", (6, 8)),  # CaiT: 5 x 7 patches of 16 at 90 x 120 px dropped the last 10 and 8 px
        ("xcit_nano_12_p16_224", (6, 8)),  # XCiT: its constructor refused 90 x 120
        ("vit_tiny_r_s16_p8_224", (3, 4)),  # a hybrid ViT: a stride-4 CNN stem, then patches of 8 (stride 32)
    ],
)
def test_transformers_whose_patches_do_not_divide_the_input_take_the_nearest_whole_size(
    name: str, grid: tuple[int, int]
) -> None:
    fx = FeatureExtractor(name, ["blocks.1"], pretrained=False, image_size=(90, 120), device="cpu")
    stride = 32 if "_r_" in name else 16
    assert fx.image_size == (grid[0] * stride, grid[1] * stride)
    out = fx(np.random.default_rng(0).integers(0, 255, (2, *fx.image_size, 3), dtype=np.uint8))
    assert tuple(out.layers[0].shape[-2:]) == grid


@pytest.mark.parametrize(
    ("name", "size", "rounded", "stride"),
    [
        ("vit_small_r26_s32_224", (70, 70), (64, 64), 32),  # a whole ResNetV2 stem: its feature_info is a list
        ("vit_small_resnet26d_224", (200, 100), (192, 96), 32),  # a features-only stem: timm's FeatureInfo
        # bare stems, no feature_info: feat_ratio read 24 (253 px went to 264, which the model refused) and 15
        ("vit_tiny_r_s16_p8_224", (253, 125), (256, 128), 32),
        ("vitamin_small_224", (200, 253), (192, 256), 16),
    ],
)
def test_a_hybrid_vit_rounds_to_its_stems_stride(
    name: str, size: tuple[int, int], rounded: tuple[int, int], stride: int
) -> None:
    """The patch embedding's ``feat_ratio`` is the built size over the stem's output: 70 px over 3 padded outputs of
    a stride-32 stem read 23, and 70 px was rounded to 69 (200 px to 195 on a ResNet-26d stem)."""
    fx = FeatureExtractor(name, ["blocks.1"], pretrained=False, image_size=size, device="cpu")
    assert fx.image_size == rounded
    out = fx(np.zeros((1, *rounded, 3), dtype=np.uint8))
    assert tuple(out.layers[0].shape[-2:]) == (rounded[0] // stride, rounded[1] // stride)


@pytest.mark.parametrize(
    ("name", "layer", "message"),
    [
        (
            "twins_pcpvt_small",
            "blocks.1",
            r"'twins_pcpvt_small' cannot take \[90, 122\] \(AssertionError: .*\); its own is \[224, 224\]",
        ),
        (
            "levit_128s",
            "stages.1",
            r"'levit_128s' cannot run at \[90, 122\] \(The size of tensor .*\); its own is \[224, 224\]",
        ),
    ],
)
def test_a_backbone_that_refuses_the_input_size_is_one_config_error(name: str, layer: str, message: str) -> None:
    from anomaly.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^backbone.image_size: {message}$"):
        FeatureExtractor(name, [layer], pretrained=False, image_size=(90, 122), device="cpu")


def _images(n: int, shape: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(60, 200, (*shape, 3), dtype=np.uint8) for _ in range(n)]


def test_patchcore_wrn50_config_fits_and_scores() -> None:
    config = apply_overrides(
        load_config("patchcore_wrn50"),
        ["backbone.pretrained=false", "backbone.image_size=[64,64]", "threshold.folds=3"],
    )
    det = Detector(config).fit(_images(4, (80, 120)))
    result = det.predict(_images(1, (90, 70))[0])
    assert result.anomaly_map.shape == (90, 70) and np.isfinite(result.image_score)
    assert det.extractor.layer_names == ["layer2", "layer3"]


def test_musc_dinov2_config_scores_a_pool() -> None:
    config = apply_overrides(
        load_config("musc_dinov2"), ["backbone.pretrained=false", "backbone.image_size=[70,98]", "batch_size=4"]
    )
    det = Detector(config)
    assert det.extractor.name == "vit_large_patch14_dinov2.lvd142m"
    results = det.predict(_images(3, (50, 75)))
    assert [r.anomaly_map.shape for r in results] == [(50, 75)] * 3
    assert all(np.isfinite(r.image_score) for r in results)


def test_a_model_on_final_norm_vit_tokens_exports_with_its_scores(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The export's network took a ViT's tokens without the final norm that ``backbone.final_norm`` gave the
    Detector's: the exported map was 1.8 off (the score 7.86 against 9.33)."""
    pytest.importorskip("onnxruntime")
    from anomaly.export import export_model
    from anomaly.runtime import ExportedDetector

    config = apply_overrides(
        load_config("patchcore"),
        ["backbone.name=vit_tiny_patch16_224", "backbone.pretrained=false", "backbone.layers=[blocks.2,blocks.5]",
         "backbone.image_size=[64,64]", "backbone.final_norm=true", "threshold.folds=2", "preprocess.resize=stretch"],
    )  # fmt: skip
    images = _images(7, (80, 80))
    det = Detector(config).fit(images[:6])
    exported = ExportedDetector(export_model(det.save(tmp_path / "model"), tmp_path / "export")).predict(images[6])
    expected = det.predict(images[6])
    assert exported.image_score == pytest.approx(expected.image_score, rel=1e-4)
    assert np.abs(exported.anomaly_map - expected.anomaly_map).max() <= 1e-3


@pytest.mark.parametrize(("scales", "passes"), [("[1.0,0.67]", [(96, 96), (64, 64)]), ("[0.5,0.5]", [(64, 64)])])
def test_a_model_with_layer_scales_exports_with_its_scores(tmp_path, scales, passes) -> None:  # type: ignore[no-untyped-def]
    """``backbone.layer_scales``: the export's network shrinks the input for the coarse layer as the Detector does
    (two matrix products in the graph), and a saved model loads with the same scales; with every layer shrunk (one
    pass, not at the input's size) the export ran the unshrunk input."""
    pytest.importorskip("onnxruntime")
    from anomaly.export import export_model
    from anomaly.runtime import ExportedDetector

    config = apply_overrides(
        load_config("patchcore"),
        ["backbone.image_size=[96,96]", f"backbone.layer_scales={scales}", "threshold.folds=2",
         "preprocess.resize=stretch"],
    )  # fmt: skip
    images = _images(7, (80, 80))
    det = Detector(config).fit(images[:6])
    assert [size for size, _ in det.extractor.passes] == passes
    saved = det.save(tmp_path / "model")
    assert Detector.load(saved).predict(images[6]).image_score == pytest.approx(det.predict(images[6]).image_score)
    folder = export_model(saved, tmp_path / "export")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["backbone"]["layer_scales"] == json.loads(scales)  # what the graph shrinks, readable by users
    exported = ExportedDetector(folder).predict(images[6])
    expected = det.predict(images[6])
    assert exported.image_score == pytest.approx(expected.image_score, rel=1e-4)
    assert np.abs(exported.anomaly_map - expected.anomaly_map).max() <= 1e-3


def test_a_vit_sees_the_last_rows_and_columns_of_an_input_that_is_no_multiple_of_its_patch() -> None:
    """At 64 px a patch-14 ViT took 4 x 4 patches of 14 and dropped the last 8 rows and columns: a defect painted
    there scored exactly as the clean image did. The input is now the nearest whole number of patches (70 px)."""
    config = apply_overrides(
        load_config("patchcore"),
        ["backbone.name=vit_small_patch14_dinov2", "backbone.layers=[blocks.5]", "backbone.pretrained=false",
         "backbone.image_size=[64,64]", "preprocess.standardize=false", "threshold.folds=2"],
    )  # fmt: skip
    rng = np.random.default_rng(0)
    train = [
        np.full((128, 128, 3), 120, np.uint8) + rng.integers(0, 8, (128, 128, 3), dtype=np.uint8) for _ in range(6)
    ]
    detector = Detector(config).fit(train)
    assert detector.extractor.image_size == (70, 70)
    clean = train[0].copy()
    corner = clean.copy()
    corner[-12:, -12:] = 255  # the last 12 rows and columns: past the 4th whole patch of 64 px
    scores = [r.image_score for r in detector.predict([clean, corner])]
    assert scores[1] > 1.2 * scores[0]


def test_a_refit_or_a_zero_shot_pool_keeps_a_vit_built_atwhole_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    """resize: auto compared the configured size (100) with the extractor's (98): every fit and every zero-shot pool
    built the backbone again, twice (the weights loaded each time)."""
    from anomaly import features

    builds: list[object] = []
    create = features._create_model
    monkeypatch.setattr(features, "_create_model", lambda *args: builds.append(args[2]) or create(*args))
    overrides = ["backbone.name=vit_small_patch14_dinov2", "backbone.pretrained=false", "backbone.image_size=[100,100]"]
    images = _images(6, (64, 64))
    trained = Detector(apply_overrides(load_config("patchcore"), [*overrides, "backbone.layers=[blocks.5]",
                                                                  "threshold.folds=2"]))  # fmt: skip
    trained.fit(images)
    first = len(builds)
    trained.fit(images)
    assert len(builds) == first and trained.extractor.image_size == (98, 98)
    pool = Detector(apply_overrides(load_config("musc"), [*overrides, "backbone.layers=[blocks.3,blocks.5,blocks.7]"]))
    pool.predict(images[:4])
    first = len(builds)
    pool.predict(images[:4])
    assert len(builds) == first


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: no kernel image is available for execution on the device"),
        RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
    ],
)
def test_a_gpu_failure_in_the_first_pass_is_not_called_an_input_size_error(
    error: RuntimeError, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a pass that the size breaks is a backbone.image_size error: the GPU's own failure stays itself."""

    def fail(self: FeatureExtractor) -> list[int]:
        raise error

    monkeypatch.setattr(FeatureExtractor, "channels", property(fail))
    with pytest.raises(RuntimeError) as raised:
        FeatureExtractor("resnet18", ["layer2"], pretrained=False, image_size=(64, 64), device="cpu")
    assert raised.value is error


def test_a_hub_download_of_a_transformer_that_refuses_the_size_takes_the_nearest_whole_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Downloaded from the hub, an XCiT refuses 90 x 120 in its constructor (before any download) as it does with
    random weights: the size is rounded, not reported as a failed download."""
    import timm.models._builder

    import anomaly.features
    from anomaly.features import WeightsSource

    downloads: list[str] = []
    monkeypatch.setattr(anomaly.features, "resolve_weights", lambda name, *_: WeightsSource("hub", name))
    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda model, *_, **__: downloads.append("x"))
    fx = FeatureExtractor("xcit_nano_12_p16_224", ["blocks.1"], image_size=(90, 120), device="cpu")
    assert fx.image_size == (96, 128) and fx.source.kind == "hub" and downloads


def test_backbone_layers_of_a_model_that_cannot_run_at_224_come_from_its_own_size() -> None:
    """`anomaly backbones crossvit_tiny_240` ended in a traceback (exit 1): its attention tables take 240 px only."""
    from anomaly.features import layer_table

    assert layer_table("crossvit_tiny_240")[:2] == [("blocks.0", 96, 12), ("blocks.1", 96, 12)]
