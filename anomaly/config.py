"""Detector configuration: a typed dataclass schema loaded from YAML with strict keys.

Named configs (``patchcore``, ``padim``, ``gaussian``, ``musc``, ...) ship with the package;
``--set dotted.key=value`` overrides, and configs built in code (``DetectorConfig(batch_size=8)``,
``dataclasses.replace``), go through the same validation as YAML keys. A key given twice in YAML is refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from anomaly.errors import ConfigError

__all__ = [
    "BackboneConfig",
    "DetectorConfig",
    "PostprocessConfig",
    "PreprocessConfig",
    "ScorerConfig",
    "ThresholdConfig",
    "apply_overrides",
    "config_names",
    "load_config",
]


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping of the YAML gives one key twice."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1), also reading YAML 1.2 exponent floats without a dot (``1e-3``, ``5E2``),
    which 1.1 takes for strings: ``--set threshold.target_fpr=1e-3`` is a number as users write it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load``, refusing a key given twice in one mapping (PyYAML keeps the last one silently). Keys are
    checked on the composed nodes, before merge keys (``<<: *base``, whose keys may be overridden) are expanded."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_unique_keys(node: yaml.Node, seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node checked already
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}  # (tag, text) of a key -> its line
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in first:
                    problem = f"duplicate key '{key_node.value}', first on line {first[key] + 1}"
                    raise _DuplicateKeyError(None, None, problem, key_node.start_mark)
                first[key] = key_node.start_mark.line
            _check_unique_keys(value_node, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(item, seen)


_MIN_SIDE, _MAX_SIDE = 32, 4096
_WEIGHT_SOURCES = ("auto", "packaged", "hub")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class BackboneConfig:
    """Frozen feature extractor: any timm model, layers by feature-info name (``blocks.2``) or index."""

    name: str = "tf_efficientnet_lite0"
    layers: tuple[str, ...] = ("blocks.2", "blocks.4")
    weights: str = "auto"  # auto | packaged | hub | path to a .pth/.safetensors file
    pretrained: bool = True
    image_size: tuple[int, int] | None = None  # (H, W); None = the model's pretrained config
    mean: tuple[float, float, float] | None = None  # None = the model's pretrained config
    std: tuple[float, float, float] | None = None
    final_norm: bool = False  # ViT tokens through the model's final norm (MuSc's DINOv2 taps); CNNs have none
    layer_scales: tuple[float, ...] | None = None  # per layer: the input shrunk by this factor first; None = all 1

    def __post_init__(self) -> None:
        _check_fields(self, "backbone.")
        if not self.layers:
            raise ConfigError("backbone.layers: give at least one layer")
        if self.image_size is not None and not all(_MIN_SIDE <= side <= _MAX_SIDE for side in self.image_size):
            raise ConfigError(
                f"backbone.image_size: each side must be in [{_MIN_SIDE}, {_MAX_SIDE}], got {list(self.image_size)}"
            )
        if self.layer_scales is not None:
            if len(self.layer_scales) != len(self.layers):
                raise ConfigError(
                    f"backbone.layer_scales: one scale per layer ({len(self.layers)}), got {list(self.layer_scales)}"
                )
            if not all(0 < scale <= 1 for scale in self.layer_scales):
                raise ConfigError(f"backbone.layer_scales: each scale must be in (0, 1], got {list(self.layer_scales)}")
        # pixels on the 0-1 scale, as timm's configs give them: a 0-255 mean ([123.7, 116.3, 103.5]) was kept
        # and every input normalised to about -500
        if self.mean is not None and not all(math.isfinite(v) and 0 <= v <= 1 for v in self.mean):
            raise ConfigError(f"backbone.mean: values must be in [0, 1] (a 0-1 pixel scale), got {list(self.mean)}")
        if self.std is not None and not all(math.isfinite(v) and 0 < v <= 1 for v in self.std):
            raise ConfigError(f"backbone.std: values must be in (0, 1] (a 0-1 pixel scale), got {list(self.std)}")
        if self.weights not in _WEIGHT_SOURCES:
            suffix = Path(self.weights).suffix.lower()
            if suffix not in _WEIGHT_SUFFIXES:
                raise ConfigError(
                    f"backbone.weights: expected auto, packaged, hub or a {'/'.join(_WEIGHT_SUFFIXES)} file, "
                    f"got '{self.weights}'"
                )
            if not self.pretrained:  # random weights were used and the file ignored without a word
                raise ConfigError(
                    f"backbone.weights: {self.weights} is given with backbone.pretrained: false (random weights); "
                    "drop one of them"
                )


@dataclass(frozen=True)
class ScorerConfig:
    """Scorer name from the registry and its constructor keywords."""

    name: str = "memory_bank"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_fields(self, "scorer.")


@dataclass(frozen=True)
class TileConfig:
    """Overlapping tiles, each seen by the backbone at the input size (large images, small defects)."""

    size: int | None = None  # tile height in original pixels; None = the image's shorter side
    overlap: float = 0.25  # least share of a tile shared with its neighbour

    def __post_init__(self) -> None:
        _check_fields(self, "preprocess.tile.")
        if self.size is not None and not _MIN_SIDE <= self.size <= 65536:
            raise ConfigError(f"preprocess.tile.size: must be null or in [{_MIN_SIDE}, 65536] pixels, got {self.size}")
        if not (math.isfinite(self.overlap) and 0 <= self.overlap <= 0.75):
            raise ConfigError(f"preprocess.tile.overlap: must be in [0, 0.75], got {self.overlap}")


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes model input: ``stretch`` to the input size, ``keep_aspect`` (longer side
    fitted, mirrored border), or ``auto``: fit (or a zero-shot pool without references) gives the input the
    images' aspect at the configured pixel count (:func:`anomaly.data.views.fitted_input_size`) and stretches
    to it, and the saved config holds the decision; ``tile`` (when set) cuts it into overlapping tiles
    instead. ``standardize`` maps every image's gray-level mean and spread to fixed values first (brightness
    and contrast drift between acquisitions removed; see :func:`anomaly.data.views.standardize_intensity`);
    ``auto`` turns it on at fit (or for a reference-free pool) when the images' exposure drifts (the spread
    of their bright level, :func:`anomaly.data.views.lighting_drift`). ``bit_depth``: how many bits the values
    of 16-bit images use (a 12-bit camera's 0..4095 in a 16-bit PNG: 12); they are scaled to 8 bits accordingly,
    and ``auto`` takes it at fit (or for a reference-free pool) from the largest value of the images, rounded up to
    an even count (16, the full range, when none is a 16-bit image). 8-bit images are read as they are."""

    resize: str = "stretch"
    tile: TileConfig | None = None
    standardize: bool | str = False
    bit_depth: int | str = 16

    def __post_init__(self) -> None:
        _check_fields(self, "preprocess.")
        if self.resize not in ("stretch", "keep_aspect", "auto"):
            raise ConfigError(f"preprocess.resize: expected stretch, keep_aspect or auto, got '{self.resize}'")
        if not (isinstance(self.standardize, bool) or self.standardize == "auto"):
            raise ConfigError(f"preprocess.standardize: expected true, false or auto, got {self.standardize!r}")
        depth_ok = self.bit_depth == "auto" or (
            isinstance(self.bit_depth, int) and not isinstance(self.bit_depth, bool) and 8 <= self.bit_depth <= 16
        )
        if not depth_ok:
            raise ConfigError(f"preprocess.bit_depth: expected an integer in [8, 16] or auto, got {self.bit_depth!r}")


@dataclass(frozen=True)
class PostprocessConfig:
    """Map post-processing: Gaussian blur sigma in pixels of the model input (0 disables)."""

    blur_sigma: float = 4.0

    def __post_init__(self) -> None:
        _check_fields(self, "postprocess.")
        if not (math.isfinite(self.blur_sigma) and 0 <= self.blur_sigma <= 64):
            raise ConfigError(f"postprocess.blur_sigma: must be in [0, 64] input pixels, got {self.blur_sigma}")


@dataclass(frozen=True)
class ThresholdConfig:
    """Decision threshold from normal images only (see :mod:`anomaly.thresholds`).

    ``target_fpr``: the share of normal images that may be flagged. Trained scorers are cross-fitted
    over ``folds`` folds of the training images; zero-shot pools model their normal component.
    ``outlier_z``: training images whose cross-fitted score lies more than this many robust standard
    deviations above the median (log scale) are left out of the threshold as probable defects (None:
    keep every image; see :func:`anomaly.thresholds.outlying_scores`).
    """

    target_fpr: float = 0.01
    folds: int = 10
    outlier_z: float | None = 10.0

    def __post_init__(self) -> None:
        _check_fields(self, "threshold.")
        if not (math.isfinite(self.target_fpr) and 0 < self.target_fpr <= 0.5):
            raise ConfigError(f"threshold.target_fpr: must be in (0, 0.5], got {self.target_fpr}")
        if not 2 <= self.folds <= 100:
            raise ConfigError(f"threshold.folds: must be in [2, 100], got {self.folds}")
        if self.outlier_z is not None and not self.outlier_z > 0:  # a finite float by now (_check_fields)
            raise ConfigError(f"threshold.outlier_z: must be a positive number or null, got {self.outlier_z!r}")


@dataclass(frozen=True)
class DetectorConfig:
    """Everything a Detector needs; saved with the model as JSON."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        _check_fields(self, "")
        if not 1 <= self.batch_size <= 4096:
            raise ConfigError(f"batch_size: must be in [1, 4096], got {self.batch_size}")
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"device: expected auto, cpu, mps, cuda or cuda:N, got '{self.device}'")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe nested dict (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self))


def config_names() -> list[str]:
    """Names of the configs shipped with the package."""
    return sorted(p.name[:-5] for p in _config_dir().iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str | os.PathLike[str]) -> DetectorConfig:
    """Load a named config (``patchcore``) or a YAML file path, rejecting unknown keys."""
    path = Path(name_or_path)
    if path.suffix.lower() not in (".yaml", ".yml") and not path.is_file():  # my.YAML is a file too
        candidate = _config_dir() / f"{name_or_path}.yaml"
        if not candidate.is_file():
            hint = _did_you_mean(str(name_or_path), config_names())
            raise ConfigError(f"unknown config '{name_or_path}'{hint}; named configs: {', '.join(config_names())}")
        path = Path(str(candidate))
    if not path.is_file():
        shipped = path.parent == Path(".") and path.stem in config_names()  # patchcore.yaml for patchcore
        hint = f" (a shipped config is named without its extension: {path.stem})" if shipped else ""
        raise ConfigError(f"config file not found: {path}{hint}")
    try:
        raw = _load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = "" if mark is None else f"line {mark.line + 1}, column {mark.column + 1}: "
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML ({where}{what})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> DetectorConfig:
    """Build a DetectorConfig from a nested dict; unknown keys raise ConfigError with the key path."""
    return _build(DetectorConfig, raw, "")


def apply_overrides(config: DetectorConfig, overrides: list[str]) -> DetectorConfig:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) with full validation."""
    raw = config.to_dict()
    given = _given_backbone_keys(overrides)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects dotted.key=value, got '{item}'")
        try:
            value = _load_yaml(text)
        except _DuplicateKeyError as exc:
            raise ConfigError(f"--set {item}: {exc.problem}") from None
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            _fill_optional_section(node, parts[: depth + 1])  # `preprocess.tile.size=512` while tile is null
            if part not in node or not isinstance(node[part], dict):
                sections = [k for k, v in node.items() if isinstance(v, dict) or v is None]
                hint = _did_you_mean(part, sections) if part not in node else ""
                raise ConfigError(f"{'.'.join(parts[: depth + 1])}: unknown config key{hint}")
            node = node[part]
        free_form = parts[:-1] == ["scorer", "params"]
        if parts[-1] not in node and not free_form:
            hint = _did_you_mean(parts[-1], list(node))
            raise ConfigError(f"{key}: unknown config key{hint}")
        # `threshold={target_fpr: 0.05}` keeps the section's other keys; the scorer section is replaced whole, as
        # its params belong to its name (`scorer={name: gaussian}` must not keep padim's)
        if isinstance(value, dict):
            _fill_optional_section(node, parts)  # `preprocess.tile={size: 512}` keeps the section's other defaults
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict) and parts[0] != "scorer":
            _merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    backbone = raw.get("backbone")
    if isinstance(backbone, dict) and "layer_scales" not in given and backbone.get("layer_scales") is not None:
        before = config.backbone
        if backbone.get("name") != before.name or list(backbone.get("layers") or []) != list(before.layers):
            backbone["layer_scales"] = None  # scales given for the config's own layers of its own model
    return from_dict(raw)


def _given_backbone_keys(overrides: list[str]) -> set[str]:
    """The ``backbone`` keys the overrides set, one by one (``backbone.layers=...``) or in a section
    (``backbone={layers: ...}``)."""
    keys: set[str] = set()
    for item in overrides:
        key, _, text = item.partition("=")
        if key.strip().startswith("backbone."):
            keys.add(key.strip().removeprefix("backbone.").split(".")[0])
        elif key.strip() == "backbone":
            try:
                value = _load_yaml(text)
            except (_DuplicateKeyError, yaml.YAMLError):
                continue  # refused with its own message below
            keys.update(value if isinstance(value, dict) else ())
    return keys


def _fill_optional_section(node: dict[str, Any], parts: list[str]) -> None:
    """Where ``parts`` names a section that may be null (``preprocess.tile``) and ``node`` holds it as null, put the
    section's defaults there, so that its keys can be set one by one."""
    if parts[-1] not in node or node[parts[-1]] is not None:
        return
    cls: Any = DetectorConfig
    for part in parts:
        hint = typing.get_type_hints(cls).get(part)
        sections = [t for t in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(t)]
        if not sections:
            return
        cls = sections[0]
    node[parts[-1]] = dataclasses.asdict(cls())


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    """Set ``update``'s keys in ``into``, merging nested mappings the same way."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _config_dir() -> Path:
    packaged = resources.files("anomaly") / "configs"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "configs"  # source checkout


# The YAML -> dataclass coercion below is written by hand (about 60 lines) rather than taken from pydantic or dacite:
# every error must be one line naming the full dotted key with a did-you-mean hint (``scorer.params.kk``), tuples
# come from YAML lists, and the saved model's config.json must round-trip exactly; pydantic's multi-line
# ValidationError and a second schema beside the dataclasses cost more than these functions.
def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown config key{_did_you_mean(str(key), sorted(fields))}")
    try:
        return cls(**raw)  # its __post_init__ checks the values (_check_fields)
    except TypeError as exc:  # pragma: no cover - dataclass defaults cover every field
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def _check_fields(config: object, prefix: str) -> None:
    """Check every field of the config dataclass ``config`` against its type as YAML values are, and store it
    normalised (lists as tuples, sections given as mappings built): a config built in code, by ``replace`` or from
    YAML passes the same checks. Errors name the key (``prefix`` + field name)."""
    for name, hint in typing.get_type_hints(type(config)).items():
        object.__setattr__(config, name, _coerce(hint, getattr(config, name), prefix + name))


def _coerce(hint: Any, value: Any, path: str, words: bool = False) -> Any:
    """``value`` as type ``hint``, or a ConfigError naming ``path``. A string field refuses null and true/false (YAML's
    ``null``, ``yes``, ``off``: ``layers: null`` became the layer 'None'); ``words``: a string alternative of a union
    (``bit_depth: int | str``), which takes any scalar as text for its section's own check to name."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # NumPy numbers and arrays from code
        value = value.tolist()
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, path + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner[:-1]:  # e.g. ``bool | str``: true/false, else a word such as auto
            try:
                return _coerce(candidate, value, path, words=True)
            except ConfigError:
                continue
        return _coerce(inner[-1], value, path, words=True)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value] if args[-1] is Ellipsis and value is not None else value
        if not isinstance(value, (list, tuple)):
            count = "" if args[-1] is Ellipsis else f" of {len(args)} values"
            raise ConfigError(f"{path}: expected a list{count}, got {'null' if value is None else repr(value)}")
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {value!r}")
        item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        return tuple(_coerce(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list, tuple)) or (not words and (value is None or isinstance(value, bool))):
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
            raise ConfigError(f"{path}: expected a string, got {shown}")
        return str(value)
    return value


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
