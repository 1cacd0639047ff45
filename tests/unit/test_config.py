from __future__ import annotations

import pytest

from anomaly import ConfigError, load_config
from anomaly.config import apply_overrides, config_names
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
