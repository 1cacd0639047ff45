"""`anomaly export`: a fitted model directory -> a torch-free export directory (see anomaly.runtime).

The network (input normalisation, backbone, the scorer's torch-side feature aggregation) becomes
one ONNX graph with a dynamic batch, or OpenVINO IR converted from it; everything after it
(FAISS index or Gaussian statistics, post-processing, thresholds) is written as plain files, all
listed with their SHA-256 in manifest.json.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from anomaly import __version__
from anomaly._fs import save_tensors, staged_dir
from anomaly.detector import Detector
from anomaly.errors import BackendError, ConfigError, DataError
from anomaly.features import FeatureExtractor, scaled_layers
from anomaly.results import StageProgress
from anomaly.runtime.manifest import MANIFEST, write_manifest
from anomaly.runtime.network import load_network
from anomaly.scorers._aggregate import fuse_layers

__all__ = ["EXPORT_FORMATS", "OPSET", "export_model"]

EXPORT_FORMATS = ("onnx", "openvino")
OPSET = 18  # the lowest opset of torch's dynamo exporter; ONNX Runtime >= 1.14 and OpenVINO run it
_CHECK_TOLERANCE = 1e-4  # max |exported - torch| / max |torch| on a random batch, else the export is refused


def export_model(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    fmt: str = "onnx",
    progress: StageProgress | None = None,
    weights: str | None = None,
) -> Path:
    """Export the model in ``model_dir`` to ``out_dir`` (written atomically) as ``onnx`` or ``openvino``;
    ``progress("export", done, 3)`` follows the network's export, the scorer's files and the check. ``weights``:
    the backbone weights file the model was fitted with, moved (as ``Detector.load``).

    Raises:
        DataError: not a model directory, or a zero-shot model (it scores pools, not single images).
        ConfigError: unknown format. BackendError: exporter missing, or the exported graph disagrees with torch.
    """
    fmt = fmt.lower()  # ONNX, OpenVINO as the projects spell them
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got '{fmt}'")
    det = Detector.load(model_dir, weights=weights)
    if det.zero_shot:
        raise DataError(
            f"{model_dir}: {det.scorer.name} is zero-shot (it scores a pool of images against each other) "
            "and cannot be exported; score it with torch: `anomaly score --model` or `--zero-shot`"
        )
    head, outputs, state, files = _scorer_parts(det)
    network = _Network(det.extractor, head).eval().cpu()
    target = Path(out_dir)
    step = progress or (lambda stage, done, total: None)
    with staged_dir(target, MANIFEST) as tmp:
        try:
            step("export", 0, 3)
            net_file = _write_network(network, outputs, det.extractor.image_size, tmp, fmt)
            step("export", 1, 3)
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            if state:
                save_tensors(state, tmp / "state.safetensors")
        except OSError as exc:  # a full disk, a quota: one line, and staged_dir removes what was written
            raise DataError(f"{target}: could not write the export ({exc.strerror or exc})") from None
        spec = {"format": fmt, "file": net_file, "input": "images", "outputs": outputs, "opset": OPSET}
        step("export", 2, 3)
        _check_network(network, tmp, spec, det.extractor.image_size)
        write_manifest(tmp, _manifest(det, spec))
        step("export", 3, 3)
    return target


class _Network(torch.nn.Module):
    """uint8 RGB images (N, H, W, 3) -> normalised -> backbone layers (finest first, as
    FeatureExtractor.__call__ orders them) -> the scorer's aggregation head."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, extractor: FeatureExtractor, head: torch.nn.Module) -> None:
        super().__init__()
        self.model = extractor.model
        self.extra_blocks = extractor.extra_blocks
        self.final_norm = extractor.final_norm  # a ViT's tokens after its final norm, as the extractor gives them
        self.passes = extractor.passes  # a CNN's layers taken from a shrunk input (backbone.layer_scales)
        self.shrinks = [None if m is None else (m[0].cpu(), m[1].cpu()) for m in extractor.shrinks]
        self.head = head
        self.register_buffer("mean", extractor.mean.cpu())
        self.register_buffer("std", extractor.std.cpu())

    def forward(self, images: torch.Tensor) -> Any:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        maps = scaled_layers(self.model, x, self.passes, self.shrinks, self.extra_blocks, self.final_norm)
        return self.head(sorted(maps, key=lambda m: -m.shape[-1]))


class _PatchEmbeddings(torch.nn.Module):
    """scorers._aggregate.fuse_layers as a module: patch_embeddings fills a preallocated buffer in
    chunks of 32 images, which a trace would freeze to the example's batch size."""

    def __init__(self, patch_size: int, grid_layer: int, kernel: str) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_layer = grid_layer
        self.kernel = kernel

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        return fuse_layers(layers, self.patch_size, self.grid_layer, self.kernel)  # (N, h, w, D)


class _PadimEmbedding(torch.nn.Module):
    """PadimScorer._embed up to the channel subset: nearest-upsampled layers, concatenated, selected."""

    channels: torch.Tensor  # buffer

    def __init__(self, channels: NDArray[np.int64]) -> None:
        super().__init__()
        self.register_buffer("channels", torch.from_numpy(np.asarray(channels, dtype=np.int64)))

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        h, w = layers[0].shape[-2:]
        maps = [layer if layer.shape[-2:] == (h, w) else F.interpolate(layer, size=(h, w)) for layer in layers]
        return torch.cat(maps, 1).index_select(1, self.channels)  # (N, d, h, w)


class _Pooled(torch.nn.Module):
    """GlobalGaussianScorer's per-layer global average pooling."""

    def forward(self, layers: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(layer.mean((2, 3)) for layer in layers)


def _scorer_parts(
    det: Detector,
) -> tuple[torch.nn.Module, list[str], dict[str, NDArray[Any]], dict[str, bytes]]:
    """(graph head, its output names, state for state.safetensors, raw files) of the detector's scorer."""
    scorer: Any = det.scorer
    if scorer.name == "memory_bank":
        state = {"bank": scorer.bank_} if scorer.reweight else {}  # Eq. 7 looks up bank rows
        files = {"index.faiss": scorer.index_.serialize().tobytes()}
        return _PatchEmbeddings(scorer.patch_size, scorer.grid_layer, scorer.patch_kernel), ["embeddings"], state, files
    if scorer.name == "padim":
        state = {"mean": scorer.mean_.numpy(), "chol_inv": _inverse_factors(scorer.chol_)}
        if scorer.grid_ is not None:  # the runtime refuses features of another grid shape with as many positions
            state["grid"] = np.array(scorer.grid_, dtype=np.int64)
        return _PadimEmbedding(scorer.channels_), ["embedding"], state, {}
    if scorer.name == "gaussian":
        state = {f"mean.{i}": m for i, m in enumerate(scorer.means_)}
        state.update({f"precision.{i}": p for i, p in enumerate(scorer.precisions_)})
        return _Pooled(), [f"pooled{i}" for i in range(len(scorer.means_))], state, {}
    raise DataError(f"scorer {scorer.name!r} cannot be exported")


def _inverse_factors(chol: torch.Tensor, chunk: int = 256) -> NDArray[np.float32]:
    """L^-1 of every per-position Cholesky factor, in float64: the runtime's triangular solve becomes
    a batched matmul (numpy has no batched triangular solver)."""
    eye = torch.eye(chol.shape[-1], dtype=torch.float64)
    parts = [
        torch.linalg.solve_triangular(chol[i : i + chunk].double(), eye, upper=False).float()
        for i in range(0, len(chol), chunk)
    ]
    return torch.cat(parts).numpy()


def _write_network(network: _Network, outputs: list[str], size: tuple[int, int], folder: Path, fmt: str) -> str:
    """Write the graph as model.onnx, or as model.xml + model.bin (OpenVINO IR, float32 kept); return its file."""
    example = torch.zeros(2, *size, 3, dtype=torch.uint8)
    onnx_file = folder / "model.onnx"
    try:
        with warnings.catch_warnings(), _quiet_exporter(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network,
                (example,),
                str(onnx_file),
                input_names=["images"],
                output_names=outputs,
                opset_version=OPSET,
                dynamo=True,
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
                external_data=False,
                verbose=False,
            )
    except ImportError as exc:
        raise BackendError(f'ONNX export needs onnx and onnxscript: pip install "anomaly[export]" ({exc})') from None
    if fmt == "onnx":
        return onnx_file.name
    try:
        import openvino
    except ImportError:
        raise BackendError('OpenVINO export needs openvino: pip install "anomaly[openvino]"') from None
    converted = openvino.convert_model(str(onnx_file))
    try:
        openvino.save_model(converted, str(folder / "model.xml"), compress_to_fp16=False)
    except RuntimeError as exc:  # OpenVINO reports a failed write (a full disk) as "basic_ios::clear: iostream error"
        raise OSError(f"OpenVINO could not write model.xml / model.bin: {exc}") from None
    onnx_file.unlink()
    return "model.xml"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's graph passes log every rewrite at INFO level: keep the CLI's output to its own lines."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check_network(network: _Network, folder: Path, spec: dict[str, Any], size: tuple[int, int]) -> None:
    """Run torch and the exported graph on one random batch; refuse an export that disagrees."""
    images = np.random.default_rng(0).integers(0, 256, (3, *size, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = network(torch.from_numpy(images))
    expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    got = load_network(folder, spec)(images)
    for name, want, have in zip(spec["outputs"], expected, got):
        error = float(np.abs(want - have).max() / max(float(np.abs(want).max()), 1e-12))
        if have.shape != want.shape or error > _CHECK_TOLERANCE:
            raise BackendError(f"exported output {name} differs from torch (relative error {error:.2g}); not exported")


def _manifest(det: Detector, network: dict[str, Any]) -> dict[str, Any]:
    bb, pre, source, profile = det.config.backbone, det.config.preprocess, det.extractor.source, det.input_profile()
    assert det.decision_ is not None
    return {
        "anomaly_version": __version__,
        "torch_version": torch.__version__,
        "backbone": {
            "name": bb.name,
            "layers": list(det.extractor.layer_names),
            "layer_scales": list(det.extractor.layer_scales),  # each layer from the input shrunk by it (in the graph)
            "weights": {"kind": source.kind, "location": source.location, "sha256": source.sha256},
        },
        "network": network,
        "input": {
            "size": list(det.extractor.image_size),
            "mean": [round(v / 255, 6) for v in det.extractor.mean.flatten().tolist()],
            "std": [round(v / 255, 6) for v in det.extractor.std.flatten().tolist()],
            "layout": "uint8 RGB (N, H, W, 3) views, cut as the Detector does; normalised inside the network",
            "resize": pre.resize,  # stretch | keep_aspect (the longer side fitted, the rest mirrored)
            "tile": None if pre.tile is None else {"size": pre.tile.size, "overlap": pre.tile.overlap},
            "standardize": bool(pre.standardize),  # per-image gray mean/std, before the network
            "bit_depth": int(pre.bit_depth),  # significant bits of 16-bit images
            "training_aspects": profile.aspects,  # width / height range of stretched training images
            "training_smallest": profile.smallest,  # longer side of the smallest training image
            "training_colour": profile.colour,  # "gray" / "colour" when every training image was
        },
        "scorer": {"name": det.scorer.name, "params": det.scorer.get_params()},
        "postprocess": {
            "blur_sigma": det.config.postprocess.blur_sigma,
            "image_score_from_map": det.scorer.image_score_from_map,
        },
        "threshold": det.decision_.to_dict(),
        "batch_size": det.config.batch_size,
        "config": det._resolved_config(),  # ExportedDetector.config: the model's settings, as Detector.config
    }
