from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from anomaly import ConfigError, load_config
from anomaly.config import (
    BackboneConfig,
    DetectorConfig,
    PreprocessConfig,
    ThresholdConfig,
    TileConfig,
    apply_overrides,
    config_names,
    from_dict,
)
from anomaly.scorers import get_scorer


@pytest.mark.parametrize("name", ["patchcore", "padim", "gaussian", "musc"])
def test_every_shipped_config_loads_and_builds_its_scorer(name: str) -> None:
    config = load_config(name)
    assert config.backbone.name == "tf_efficientnet_lite0"  # the offline packaged default
    get_scorer(config.scorer.name, config.scorer.params)


def test_config_names_lists_the_shipped_configs() -> None:
    assert {"patchcore", "padim", "gaussian", "musc"} <= set(config_names())


def test_unknown_key_is_rejected_with_suggestion(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("scorer:\n  nmae: memory_bank\n")
    with pytest.raises(ConfigError, match=r"scorer\.nmae: unknown config key; did you mean 'name'"):
        load_config(path)
    for key, suggested in (("treshold.target_fpr=0.05", "threshold"), ("scorer.parms.k=1", "params")):
        with pytest.raises(ConfigError, match=f"unknown config key; did you mean '{suggested}'"):
            apply_overrides(load_config("patchcore"), [key])  # a section's name misspelt, not only a leaf's


def test_a_shipped_configs_file_name_points_at_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--config patchcore.yaml` (no such file here) said only "config file not found"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"not found: patchcore\.yaml \(a shipped config is named without its ext"):
        load_config("patchcore.yaml")
    with pytest.raises(ConfigError, match=r"not found: patchcore\.YAML \(a shipped config"):  # not 'unknown config'
        load_config("patchcore.YAML")
    with pytest.raises(ConfigError, match=r"not found: sub/patchcore\.yaml$"):  # a path: the user meant a file
        load_config("sub/patchcore.yaml")


def test_unknown_config_name() -> None:
    with pytest.raises(ConfigError, match="unknown config 'patchcor'; did you mean 'patchcore'"):
        load_config("patchcor")


def test_overrides_are_validated_like_yaml() -> None:
    config = apply_overrides(load_config("patchcore"), ["scorer.params.k=3", "backbone.image_size=[64,96]", "seed=7"])
    assert config.scorer.params["k"] == 3
    assert config.backbone.image_size == (64, 96)
    assert config.seed == 7
    with pytest.raises(ConfigError, match="backbone.nam: unknown config key"):
        apply_overrides(config, ["backbone.nam=resnet18"])
    with pytest.raises(ConfigError, match="batch_size: expected an integer"):
        apply_overrides(config, ["batch_size=many"])
    with pytest.raises(ConfigError, match="expects dotted.key=value"):
        apply_overrides(config, ["seed"])


def test_exponent_floats_without_a_dot_are_numbers(tmp_path) -> None:
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string; users write it as a number, on the command line and in files."""
    config = apply_overrides(load_config("patchcore"), ["threshold.target_fpr=1e-3", "postprocess.blur_sigma=5E0"])
    assert config.threshold.target_fpr == 0.001 and config.postprocess.blur_sigma == 5.0
    path = tmp_path / "mine.yaml"
    path.write_text("threshold:\n  target_fpr: 2e-2\n")
    assert load_config(path).threshold.target_fpr == 0.02
    assert apply_overrides(config, ["backbone.name=1e3x"]).backbone.name == "1e3x"  # not a number: a string


def test_a_section_set_whole_keeps_its_other_keys_and_errors_name_the_key() -> None:
    config = load_config("patchcore")
    merged = apply_overrides(config, ["threshold={target_fpr: 0.05}", "scorer.params={k: 3}"])
    assert merged.threshold.target_fpr == 0.05 and merged.threshold.folds == config.threshold.folds
    assert merged.scorer.params == {"k": 3}  # a scorer's params are its own: set whole, replaced whole
    switched = apply_overrides(load_config("padim"), ["scorer={name: gaussian}"])
    assert switched.scorer.name == "gaussian" and switched.scorer.params == {}
    for override, message in [
        ("scorer=3", "scorer: expected a mapping, got 3"),
        ("preprocess.tile=512", "preprocess.tile: expected a mapping, got 512"),
        ("backbone.image_size=128", "backbone.image_size: expected a list of 2 values, got 128"),
    ]:
        with pytest.raises(ConfigError) as info:
            apply_overrides(config, [override])
        assert str(info.value) == message


def test_invalid_yaml_names_its_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("backbone:\n  name: x\n  layers: [a, b\nscorer: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML \(line 4, column 7: expected ','"):
        load_config(path)


def test_outlier_z_is_a_positive_number_or_null() -> None:
    config = load_config("patchcore")
    assert config.threshold.outlier_z == 10.0
    assert apply_overrides(config, ["threshold.outlier_z=null"]).threshold.outlier_z is None
    assert apply_overrides(config, ["threshold.outlier_z=8"]).threshold.outlier_z == 8.0
    for bad in ("0", "-1", "abc", "true"):
        with pytest.raises(ConfigError, match="threshold.outlier_z: "):
            apply_overrides(config, [f"threshold.outlier_z={bad}"])


def test_unknown_scorer_param_is_rejected() -> None:
    with pytest.raises(ConfigError, match="scorer.params.coreset_ration: unknown parameter.*coreset_ratio"):
        get_scorer("memory_bank", {"coreset_ration": 0.1})
    with pytest.raises(ConfigError, match="unknown scorer 'memorybank'"):
        get_scorer("memorybank", {})


def test_a_key_given_twice_is_refused_with_its_file_and_line(tmp_path) -> None:
    """PyYAML keeps the last of two equal keys: a config that set target_fpr twice ran with the second silently."""
    path = tmp_path / "twice.yaml"
    path.write_text("threshold:\n  target_fpr: 0.05\n  folds: 5\n  target_fpr: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: invalid YAML (line 4, column 3: duplicate key 'target_fpr', first on line 2)"
    with pytest.raises(ConfigError) as info:
        apply_overrides(load_config("patchcore"), ["threshold={folds: 3, folds: 5}"])
    assert str(info.value) == "--set threshold={folds: 3, folds: 5}: duplicate key 'folds', first on line 1"
    merged = tmp_path / "merged.yaml"  # keys merged by `<<` (from an anchor, say) may still be overridden
    merged.write_text("threshold:\n  <<: {target_fpr: 0.05, folds: 5}\n  folds: 4\n")
    assert load_config(merged).threshold == ThresholdConfig(target_fpr=0.05, folds=4)
    # an anchor that merges keys itself, merged again further down: PyYAML's expansion of the second merge made
    # the anchor's own keys look doubled to a check at construction
    merged.write_text(
        "scorer:\n  name: memory_bank\n  params: &p\n    <<: {coreset_ratio: 0.1}\n    coreset_ratio: 0.05\n"
        "x_other:\n  <<: *p\n"
    )
    with pytest.raises(ConfigError, match="^x_other: unknown config key"):  # read; only the key is unknown
        load_config(merged)


def test_configs_built_in_code_are_checked_as_yaml_values_are() -> None:
    """The dataclasses built in code (or by ``replace``) skipped the type checks of YAML and --set: a string batch
    size raised a bare TypeError, ``pretrained="no"`` meant pretrained and a float folds count was kept."""
    config = load_config("patchcore")
    for make, message in [
        (lambda: DetectorConfig(batch_size="16"), "batch_size: expected an integer, got '16'"),
        (lambda: BackboneConfig(pretrained="no"), "backbone.pretrained: expected true/false, got 'no'"),
        (lambda: ThresholdConfig(folds=3.5), "threshold.folds: expected an integer, got 3.5"),
        (lambda: replace(config, seed=1.5), "seed: expected an integer, got 1.5"),
        (lambda: DetectorConfig(backbone={"nmae": "x"}), "backbone.nmae: unknown config key; did you mean 'name'?"),
        (
            lambda: replace(config, preprocess=PreprocessConfig(tile=TileConfig(size=64.5))),
            "preprocess.tile.size: expected an integer, got 64.5",
        ),
    ]:
        with pytest.raises(ConfigError) as info:
            make()
        assert str(info.value) == message
    built = DetectorConfig(BackboneConfig(layers="blocks.2", image_size=[128, 128]), batch_size=np.int64(8))
    assert built.backbone.layers == ("blocks.2",) and built.backbone.image_size == (128, 128)  # as YAML reads them
    assert type(built.batch_size) is int and from_dict(built.to_dict()) == built
    numpy_built = BackboneConfig(pretrained=np.bool_(False), image_size=np.array([96, 64]))  # NumPy values from code
    assert numpy_built.pretrained is False and numpy_built.image_size == (96, 64)


def test_a_null_section_takes_its_keys_one_by_one() -> None:
    """`--set preprocess.tile.size=512` said a key of the schema was unknown (the section is null by default), and a
    key set after `preprocess.tile={size: 512}` was unknown too."""
    base = load_config("patchcore")
    assert base.preprocess.tile is None
    assert apply_overrides(base, ["preprocess.tile.size=512"]).preprocess.tile == TileConfig(size=512, overlap=0.25)
    both = apply_overrides(base, ["preprocess.tile={size: 512}", "preprocess.tile.overlap=0.5"])
    assert both.preprocess.tile == TileConfig(size=512, overlap=0.5)
    assert apply_overrides(base, ["preprocess.tile.size=512", "preprocess.tile=null"]).preprocess.tile is None
    with pytest.raises(ConfigError, match="preprocess.tile.sise: unknown config key; did you mean 'size'"):
        apply_overrides(base, ["preprocess.tile.sise=512"])


def test_a_string_key_refuses_null_and_booleans() -> None:
    """`backbone.layers: null` became the layer 'None' and `name: off` the model 'False', refused only when the
    backbone was built, naming a value the user never wrote; a union's word (bit_depth, standardize) keeps its check."""
    base = load_config("patchcore")
    for override, message in [
        ("backbone.layers=null", "backbone.layers: expected a list, got null"),
        ("backbone.layers=[blocks.2, yes]", "backbone.layers[1]: expected a string, got true"),
        ("backbone.name=off", "backbone.name: expected a string, got false"),
        ("scorer.name=null", "scorer.name: expected a string, got null"),
        ("device=null", "device: expected a string, got null"),
        ("preprocess.bit_depth=true", "preprocess.bit_depth: expected an integer in [8, 16] or auto, got 'True'"),
    ]:
        with pytest.raises(ConfigError) as info:
            apply_overrides(base, [override])
        assert str(info.value) == message
    assert apply_overrides(base, ["backbone.layers=[2, blocks.3]"]).backbone.layers == ("2", "blocks.3")  # indices
    assert apply_overrides(base, ["backbone.layers=blocks.3"]).backbone.layers == ("blocks.3",)


def test_mean_and_std_on_the_0_255_scale_are_refused() -> None:
    base = load_config("padim")
    with pytest.raises(ConfigError, match=r"^backbone.mean: values must be in \[0, 1\]"):
        apply_overrides(base, ["backbone.mean=[123.675, 116.28, 103.53]"])
    with pytest.raises(ConfigError, match=r"^backbone.std: values must be in \(0, 1\]"):
        apply_overrides(base, ["backbone.std=[58.395, 57.12, 57.375]"])
    kept = apply_overrides(base, ["backbone.mean=[0, 0.5, 1]", "backbone.std=[1, 0.5, 0.01]"]).backbone
    assert kept.mean == (0.0, 0.5, 1.0) and kept.std == (1.0, 0.5, 0.01)


def test_a_weights_file_with_random_weights_is_refused(tmp_path: Path) -> None:
    """`backbone.weights=FILE` with `backbone.pretrained=false` fitted random weights and ignored the file."""
    base = load_config("patchcore")
    with pytest.raises(
        ConfigError, match=r"backbone.weights: .*w.safetensors is given with backbone.pretrained: false"
    ):
        apply_overrides(base, [f"backbone.weights={tmp_path / 'w.safetensors'}", "backbone.pretrained=false"])
    assert not apply_overrides(base, ["backbone.pretrained=false"]).backbone.pretrained  # auto: random is fine


def test_layer_scales_take_one_factor_in_0_1_per_layer() -> None:
    config = load_config("patchcore")
    assert apply_overrides(config, ["backbone.layer_scales=[1, 0.8]"]).backbone.layer_scales == (1.0, 0.8)
    with pytest.raises(ConfigError, match=r"^backbone.layer_scales: one scale per layer \(2\), got \[0.8\]"):
        apply_overrides(config, ["backbone.layer_scales=[0.8]"])
    with pytest.raises(ConfigError, match=r"^backbone.layer_scales: each scale must be in \(0, 1\], got \[1.0, 0.0\]"):
        apply_overrides(config, ["backbone.layer_scales=[1, 0]"])


def test_other_layers_or_another_model_drop_the_configs_layer_scales() -> None:
    """Scales belong to the config's own layers of its own model: `--set backbone.layers=[blocks.2,blocks.3]` (or a
    ViT by name) on a config with two scales was refused as "one scale per layer" / "ViT tokens"."""
    base = apply_overrides(load_config("patchcore"), ["backbone.layer_scales=[1.0,0.8]"])
    assert apply_overrides(base, ["backbone.layers=[blocks.2,blocks.3]"]).backbone.layer_scales is None
    assert apply_overrides(base, ["backbone.layers=[blocks.1]"]).backbone.layer_scales is None
    assert apply_overrides(base, ["backbone.name=vit_small_patch14_dinov2"]).backbone.layer_scales is None
    assert apply_overrides(base, ["backbone={name: tf_efficientnet_lite1}"]).backbone.layer_scales is None
    assert apply_overrides(base, ["backbone.layers=[blocks.2,blocks.4]"]).backbone.layer_scales == (1.0, 0.8)
    assert apply_overrides(base, ["backbone.image_size=[64,64]"]).backbone.layer_scales == (1.0, 0.8)
    kept = apply_overrides(base, ["backbone.layers=[blocks.1,blocks.4]", "backbone.layer_scales=[1,0.5]"])
    assert kept.backbone.layer_scales == (1.0, 0.5)
