from __future__ import annotations

from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
from skimage import data as skdata

from anomaly import ConfigError, DataError, WeightsUnavailableError
from anomaly.features import FeatureExtractor, layer_table, list_offline_backbones, resolve_weights


def _classify(model: torch.nn.Module, image: np.ndarray) -> str:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    x = (x - 0.5) / 0.5
    with torch.inference_mode():
        label = int(model(x).argmax())
    return timm.data.ImageNetInfo().index_to_description(label)


def test_packaged_weights_are_the_real_imagenet_weights() -> None:
    """The full lite0 classifier with the packaged weights names two known photos; random weights do not."""
    from anomaly.features import _create_model

    source = resolve_weights("tf_efficientnet_lite0", "packaged")
    assert source.kind == "packaged" and len(source.sha256 or "") == 64
    model = _create_model("tf_efficientnet_lite0", source, None).eval()
    assert _classify(model, skdata.chelsea()) == "Egyptian cat"
    assert _classify(model, skdata.coffee()) == "espresso"
    torch.manual_seed(0)
    random_model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    assert (_classify(random_model, skdata.chelsea()), _classify(random_model, skdata.coffee())) != (
        "Egyptian cat",
        "espresso",
    )


def test_cnn_layers_by_name_and_index_give_finest_first_maps() -> None:
    by_name = FeatureExtractor("tf_efficientnet_lite0", ["blocks.4", "blocks.2"], image_size=(64, 64), device="cpu")
    by_index = FeatureExtractor("tf_efficientnet_lite0", ["2", "3"], image_size=(64, 64), device="cpu")
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    a, b = by_name(images), by_index(images)
    assert [t.shape for t in a.layers] == [(2, 40, 8, 8), (2, 112, 4, 4)]
    assert a.embedding.shape == (2, 112)
    for x, y in zip(a.layers, b.layers):
        torch.testing.assert_close(x, y)
    again = by_name(images)
    assert all(torch.equal(x, y) for x, y in zip(a.layers, again.layers))  # deterministic


def test_any_block_of_an_efficientnet_is_a_layer_and_later_blocks_are_pruned() -> None:
    """lite0's blocks.3 (80 channels, stride 16) is not in timm's feature_info; it comes from the full model's
    own block outputs, and the blocks after the last requested layer are dropped."""
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    inner = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.3"], image_size=(64, 64), device="cpu")
    assert inner.layer_names == ["blocks.2", "blocks.3"] and len(inner.model.blocks) == 4
    got = inner(images)
    assert [t.shape for t in got.layers] == [(2, 40, 8, 8), (2, 80, 4, 4)]
    stage_end = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], image_size=(64, 64), device="cpu")
    assert len(stage_end.model.blocks) == 5  # an int n would mean "the last n layers" to timm: nothing pruned
    assert torch.equal(stage_end(images).layers[0], got.layers[0])  # the shared layer is the same either way
    model = stage_end.model
    with torch.inference_mode():  # blocks.3 by hand: the stem and the first four blocks of the same weights
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - stage_end.mean) / stage_end.std
        x = model.bn1(model.conv_stem(x))
        for block in model.blocks[:4]:
            x = block(x)
    torch.testing.assert_close(got.layers[1], x)
    with pytest.raises(ConfigError, match=r"unknown layer 'blocks.9'; .*or any block blocks.0 ... blocks.6"):
        FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.9"], device="cpu")


def test_layer_table_of_feature_info_models_and_vits() -> None:
    assert layer_table("resnet18")[2:] == [("layer2", 128, 8), ("layer3", 256, 16), ("layer4", 512, 32)]
    assert layer_table("vit_small_patch14_reg4_dinov2.lvd142m")[0] == ("blocks.0", 384, 14)
    with pytest.raises(ConfigError, match="unknown timm model"):
        layer_table("no_such_net")


def test_vit_patch_tokens_come_back_as_maps_with_cls_embedding() -> None:
    vit = FeatureExtractor(
        "vit_tiny_patch16_224", ["blocks.2", "blocks.5"], pretrained=False, image_size=(64, 64), device="cpu"
    )
    out = vit(np.zeros((3, 64, 64, 3), dtype=np.uint8))
    assert len(vit.model.blocks) == 6  # blocks.6-11 never run
    assert [t.shape for t in out.layers] == [(3, 192, 4, 4), (3, 192, 4, 4)]
    assert out.embedding.shape == (3, 192)


def test_final_norm_passes_a_vits_tokens_through_its_norm_and_is_refused_for_a_cnn() -> None:
    """MuSc's code takes DINOv2's intermediate tokens after the model's final LayerNorm (ALGORITHMS.md 3.1);
    ``musc_dinov2`` took them as the blocks left them."""
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    kwargs: dict[str, Any] = {"pretrained": False, "image_size": (64, 64), "device": "cpu"}
    raw = FeatureExtractor("vit_tiny_patch16_224", ["blocks.1", "blocks.3"], **kwargs)
    normed = FeatureExtractor("vit_tiny_patch16_224", ["blocks.1", "blocks.3"], final_norm=True, **kwargs)
    normed.model.load_state_dict(raw.model.state_dict())
    torch.nn.init.normal_(normed.model.norm.weight)  # a norm with weights of its own, not the identity's 1 and 0
    torch.nn.init.normal_(normed.model.norm.bias)
    got, plain = normed(images), raw(images)
    with torch.inference_mode():
        for layer, tokens in zip(got.layers, plain.layers):
            n, c, h, w = tokens.shape
            expected = normed.model.norm(tokens.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, c, h, w)
            torch.testing.assert_close(layer, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.embedding, normed.model.norm(plain.embedding), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="backbone.final_norm: 'tf_efficientnet_lite0' returns feature maps"):
        FeatureExtractor("tf_efficientnet_lite0", ["blocks.2"], image_size=(64, 64), device="cpu", final_norm=True)


def test_a_vit_with_registers_and_no_class_token_embeds_its_patch_tokens_mean() -> None:
    """The *_reg*_gap ViTs have register tokens and no class token: the first register was taken for the class
    token as the embedding; a class token (vit_tiny's) stays the embedding."""
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    registers = FeatureExtractor(
        "vit_dpwee_patch16_reg1_gap_256", ["blocks.1"], pretrained=False, image_size=(64, 64), device="cpu"
    )
    assert registers.model.num_prefix_tokens == 1  # the register
    out = registers(images)
    torch.testing.assert_close(out.embedding, out.layers[-1].mean((2, 3)))
    with_class = FeatureExtractor(
        "vit_tiny_patch16_224", ["blocks.1"], pretrained=False, image_size=(64, 64), device="cpu"
    )
    out = with_class(images)
    assert not torch.allclose(out.embedding, out.layers[-1].mean((2, 3)))


def test_layer_names_follow_the_returned_maps_and_a_layer_given_twice_is_refused() -> None:
    """Layers of one grid came back in depth order while ``layer_names`` kept the given order (an export's manifest
    named them so); ``blocks.2`` and its index ``2`` gave one map for two names."""
    lite = FeatureExtractor("tf_efficientnet_lite0", ["blocks.4", "blocks.3", "1"], image_size=(64, 64), device="cpu")
    assert lite.layer_names == ["blocks.1", "blocks.3", "blocks.4"] and lite.channels == [24, 80, 112]
    vit = FeatureExtractor(
        "vit_tiny_patch16_224", ["blocks.3", "blocks.1"], pretrained=False, image_size=(64, 64), device="cpu"
    )
    assert vit.layer_names == ["blocks.1", "blocks.3"]
    blank = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    with torch.inference_mode():
        tokens = vit.model.forward_intermediates(
            (torch.from_numpy(blank).permute(0, 3, 1, 2).float() - vit.mean) / vit.std,
            indices=[1],
            intermediates_only=True,
        )
    torch.testing.assert_close(vit(blank).layers[0], tokens[0])
    with pytest.raises(ConfigError, match=r"backbone.layers: layer 'blocks.2' is given twice \(blocks.2 and 2\)"):
        FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "2"], image_size=(64, 64), device="cpu")
    with pytest.raises(ConfigError, match="layer 'blocks.3' is given twice"):
        FeatureExtractor("tf_efficientnet_lite0", ["blocks.3", "blocks.3"], image_size=(64, 64), device="cpu")


def test_images_other_than_uint8_rgb_are_refused() -> None:
    lite = FeatureExtractor("tf_efficientnet_lite0", ["blocks.1"], image_size=(64, 64), device="cpu")
    for images in (np.full((1, 64, 64, 3), 0.5), np.zeros((1, 64, 64, 4), dtype=np.uint8)):
        with pytest.raises(ValueError, match=r"expected \(N, 64, 64, 3\) uint8 images"):
            lite(images)


def test_unknown_layer_and_model_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown layer 'layer9'; available: blocks.0"):
        FeatureExtractor("tf_efficientnet_lite0", ["layer9"], device="cpu")
    with pytest.raises(ConfigError, match="unknown timm model"):
        FeatureExtractor("no_such_net", ["1"], device="cpu")


@pytest.mark.parametrize("suffix", [".safetensors", ".SAFETENSORS", ".Safetensors"])
def test_local_safetensors_file_with_timm_keys_loads(tmp_path, monkeypatch, suffix: str) -> None:
    """An uppercase suffix (model.SAFETENSORS) is a safetensors file too: it was read through torch.load (pickle),
    here and in timm, and refused as 'not a readable weights file'."""
    from safetensors.torch import save_file

    reference = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2"], image_size=(64, 64), device="cpu")
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    from anomaly.features import _read_state_dict, _to_timm_keys

    state = _to_timm_keys(_read_state_dict(Path(reference.source.location)), full, "packaged")
    path = tmp_path / f"lite0{suffix}"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    def no_pickle(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"torch.load{args}")

    monkeypatch.setattr(torch, "load", no_pickle)
    local = FeatureExtractor(
        "tf_efficientnet_lite0", ["blocks.2"], weights=str(path), image_size=(64, 64), device="cpu"
    )
    assert local.source.kind == "file" and "state_dict" not in local.model.pretrained_cfg
    images = np.full((1, 64, 64, 3), 127, dtype=np.uint8)
    torch.testing.assert_close(local(images).layers[0], reference(images).layers[0])


def _resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return timm.create_model("resnet18", pretrained=False).state_dict()


@pytest.mark.parametrize("left_out", ["fc.", "num_batches_tracked"])
def test_a_timm_checkpoint_without_its_classifier_or_batchnorm_counters_loads(tmp_path, left_out: str) -> None:
    # a checkpoint saved from a headless model (num_classes=0) or with torchvision's key names (no BatchNorm
    # counters) holds every tensor the features use: it failed with a traceback, or as "102 tensors cannot map"
    state = _resnet18_state()
    torch.save(state, tmp_path / "full.pth")
    torch.save({k: v for k, v in state.items() if left_out not in k}, tmp_path / "part.pth")
    images = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    full, part = (
        FeatureExtractor("resnet18", ["layer2"], weights=str(tmp_path / f), image_size=(64, 64), device="cpu")
        for f in ("full.pth", "part.pth")
    )
    torch.testing.assert_close(part(images).layers[0], full(images).layers[0])


def test_a_weights_file_of_another_architecture_is_one_error(tmp_path) -> None:
    state = _resnet18_state()
    torch.save({**state, "layer4.2.conv1.weight": torch.zeros(512, 512, 3, 3)}, tmp_path / "more.pth")  # resnet34's
    torch.save({**state, "layer3.0.conv1.weight": torch.zeros(256, 64, 3, 3)}, tmp_path / "shape.pth")
    torch.save({k: v for k, v in state.items() if "layer4.1.conv1" not in k}, tmp_path / "less.pth")
    for name in ("more.pth", "shape.pth", "less.pth"):
        with pytest.raises(WeightsUnavailableError, match=f"{name}: does not fit timm 'resnet18'"):
            FeatureExtractor("resnet18", ["layer2"], weights=str(tmp_path / name), image_size=(64, 64), device="cpu")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", "tensor.pth"])
def test_a_damaged_weights_file_is_one_error_naming_it(tmp_path, suffix: str) -> None:
    path = tmp_path / f"lite0{suffix}"
    if suffix == "tensor.pth":  # readable, but one tensor, not named ones
        torch.save(torch.ones(3), path)
    else:
        path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match=f"lite0{suffix}: not a (readable )?weights file".replace(".", "\\.")):
        FeatureExtractor("tf_efficientnet_lite0", ["blocks.2"], weights=str(path), image_size=(64, 64), device="cpu")


def test_missing_weights_error_lists_the_options(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    with pytest.raises(WeightsUnavailableError, match=r"local file.*hub.*packaged"):
        resolve_weights("resnet18", "auto")
    with pytest.raises(WeightsUnavailableError, match="file not found"):
        resolve_weights("resnet18", "/nonexistent/weights.pth")
    assert resolve_weights("resnet18", "auto", pretrained=False).kind == "random"


def test_offline_backbones_include_the_packaged_lite0() -> None:
    names = {name: source.kind for name, source in list_offline_backbones()}
    assert names.get("tf_efficientnet_lite0") == "packaged"


def test_batchnorm_folding_keeps_the_features(monkeypatch) -> None:
    import anomaly.features as features

    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    folded = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], image_size=(64, 64), device="cpu")
    used = []  # BatchNorms the forward pass still runs (older timm keeps the pruned head's, never called)
    hooks = [
        m.register_forward_pre_hook(lambda m, _: used.append(m))
        for m in folded.model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    folded(images)
    for hook in hooks:
        hook.remove()
    assert used == []
    monkeypatch.setattr(features, "_fold_batchnorm", lambda *args: None)
    plain = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], image_size=(64, 64), device="cpu")
    for a, b in zip(folded(images).layers, plain(images).layers):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (61, 97), (50, 83)])
def test_static_same_padding_keeps_the_features(monkeypatch, size) -> None:
    """timm's Conv2dSame pads on every call; the plain convolutions that replace it give the same maps."""
    from timm.layers import Conv2dSame

    import anomaly.features as features

    images = np.random.default_rng(0).integers(0, 255, (2, *size, 3), dtype=np.uint8)
    static = FeatureExtractor("tf_efficientnet_lite0", ["blocks.1", "blocks.6"], image_size=size, device="cpu")
    assert not any(isinstance(m, Conv2dSame) for m in static.model.modules())
    monkeypatch.setattr(features, "_static_same_padding", lambda *args: None)
    dynamic = FeatureExtractor("tf_efficientnet_lite0", ["blocks.1", "blocks.6"], image_size=size, device="cpu")
    assert sum(isinstance(m, Conv2dSame) for m in dynamic.model.modules()) == 5  # stem + four stride-2 blocks
    for a, b in zip(static(images).layers, dynamic(images).layers):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_split_convolutions_are_not_folded_into_a_stranger(monkeypatch) -> None:
    """MixNet concatenates split convolutions and frees them; a reused id() must not pair a BN with one of them."""
    import anomaly.features as features

    images = np.random.default_rng(0).integers(0, 255, (2, 96, 130, 3), dtype=np.uint8)
    torch.manual_seed(0)
    folded = FeatureExtractor("tf_mixnet_s", [1, 3], pretrained=False, image_size=(96, 130), device="cpu")
    monkeypatch.setattr(features, "_fold_batchnorm", lambda *args: None)
    monkeypatch.setattr(features, "_static_same_padding", lambda *args: None)
    torch.manual_seed(0)
    plain = FeatureExtractor("tf_mixnet_s", [1, 3], pretrained=False, image_size=(96, 130), device="cpu")
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules()) < 39  # the plain convs' BNs fold
    for a, b in zip(folded(images).layers, plain(images).layers):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_convolution_whose_own_output_is_a_layer_keeps_its_batchnorm(monkeypatch) -> None:
    """GhostNet returns its stem convolution's output as layer 0 and feeds the same tensor to bn1: folding bn1 into
    the convolution changed that layer (1.07 relative with real BatchNorm statistics); the other layers still fold."""
    import anomaly.features as features

    build = features._timm_model

    def with_statistics(*args, **kwargs):  # random weights keep BatchNorm at the identity, which hides a bad fold
        model = build(*args, **kwargs)
        generator = torch.Generator().manual_seed(0)
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=generator))
            bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            bn.weight.data.copy_(torch.randn(n, generator=generator) + 1)
            bn.bias.data.copy_(torch.randn(n, generator=generator))
        return model

    monkeypatch.setattr(features, "_timm_model", with_statistics)
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    folded = FeatureExtractor("ghostnet_100", [0, 2], pretrained=False, image_size=(64, 64), device="cpu")
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules()) == 1  # bn1 alone stays
    monkeypatch.setattr(features, "_fold_batchnorm", lambda *args: None)
    plain = FeatureExtractor("ghostnet_100", [0, 2], pretrained=False, image_size=(64, 64), device="cpu")
    for a, b in zip(folded(images).layers, plain(images).layers):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_unreachable_hub_fails_at_once_with_the_options(monkeypatch) -> None:
    import anomaly.features as features

    for key in ("HF_HUB_OFFLINE", *features._PROXY_VARIABLES):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    tried = []

    def refuse(address, timeout):  # type: ignore[no-untyped-def]
        tried.append((address, timeout))
        raise OSError("no route")

    monkeypatch.setattr(features.socket, "create_connection", refuse)
    with pytest.raises(WeightsUnavailableError, match=r"hub \(hub.example:8443\) cannot be reached.*local file"):
        resolve_weights("resnet18", "auto")
    assert tried == [(("hub.example", 8443), 3.0)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # behind a proxy the download itself decides
    assert resolve_weights("resnet18", "hub").kind == "hub"
    assert len(tried) == 1


def test_offline_backbones_list_what_auto_takes_and_only_cache_entries_with_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A cache entry holding only config.json was listed, and fit then found no weights; a cached lite0 was listed
    as packaged while `weights: auto` took the cached copy; a tag unknown to this timm raised."""
    for repo, files in (
        ("convnext_tiny.fb_in1k", ["config.json"]),
        ("tf_efficientnet_lite0.in1k", ["model.safetensors"]),
        ("resnet18.future_tag", ["model.safetensors"]),  # a tag of a newer timm: its lookup raised
    ):
        entry = tmp_path / f"models--timm--{repo}"
        snapshot = entry / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text("0" * 40)
        for name in files:
            (snapshot / name).write_bytes(b"{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    listed = {name: source for name, source in list_offline_backbones()}
    assert "convnext_tiny.fb_in1k" not in listed and "resnet18.future_tag" not in listed
    assert "tf_efficientnet_lite0.in1k" not in listed  # the same file as tf_efficientnet_lite0's, listed once
    assert listed["tf_efficientnet_lite0"].kind == "hub-cache" == resolve_weights("tf_efficientnet_lite0").kind
    assert listed["tf_efficientnet_lite0"].location == resolve_weights("tf_efficientnet_lite0").location


def test_layer_scales_take_a_layer_from_the_input_shrunk_by_its_factor() -> None:
    """``backbone.layer_scales``: blocks.4 from the 320 px input shrunk to 256 px (antialiased bilinear, as torch
    resizes) while blocks.2 sees all 320 px; each map equals the same layer of a plain extractor at that size."""
    images = np.random.default_rng(0).integers(0, 255, (2, 320, 320, 3), dtype=np.uint8)
    kwargs: dict[str, Any] = {"image_size": (320, 320), "device": "cpu", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    scaled = FeatureExtractor("tf_efficientnet_lite0", ["blocks.4", "blocks.2"], layer_scales=[0.8, 1.0], **kwargs)
    assert scaled.passes == [((320, 320), [2]), ((256, 256), [3])]
    fine, coarse = scaled(images).layers
    plain = FeatureExtractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], **kwargs)
    torch.testing.assert_close(fine, plain(images).layers[0])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    small = torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear", antialias=True, align_corners=False)
    with torch.inference_mode():
        expected = plain.model.forward_intermediates(small, indices=[3], intermediates_only=True)[0]
    assert coarse.shape == (2, 112, 16, 16)
    torch.testing.assert_close(coarse, expected, rtol=1e-4, atol=1e-3)
    any_block = FeatureExtractor("tf_efficientnet_lite0", ["blocks.3", "blocks.2"], layer_scales=[0.5, 1], **kwargs)
    assert any_block.layer_names == ["blocks.2", "blocks.3"] and any_block.passes == [
        ((320, 320), [3]),
        ((160, 160), [4]),
    ]
    odd = FeatureExtractor(
        "tf_efficientnet_lite0", ["blocks.2"], layer_scales=[0.3], **{**kwargs, "image_size": (70, 90)}
    )
    assert odd.passes == [((32, 32), [2])] and odd(images[:, :70, :90]).layers[0].shape == (2, 40, 4, 4)
    with pytest.raises(ConfigError, match="backbone.layer_scales: one factor in"):
        FeatureExtractor("tf_efficientnet_lite0", ["blocks.2"], layer_scales=[1.5], **kwargs)
    with pytest.raises(ConfigError, match="backbone.layer_scales: 'vit_tiny_patch16_224' returns ViT tokens"):
        FeatureExtractor("vit_tiny_patch16_224", ["blocks.1"], pretrained=False, layer_scales=[0.5], device="cpu")
