"""The exported network (backbone + feature aggregation) run by ONNX Runtime or OpenVINO."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from anomaly._runtime import cpu_threads, omp_threads, passive_openmp
from anomaly.errors import BackendError

__all__ = ["Network", "load_network"]


class Network(Protocol):
    """Resized uint8 RGB images (N, H, W, 3) in, the graph's float32 outputs out, in manifest order; ``gpu``: the
    CUDA device the outputs come from (None: the CPU), where FAISS's ``use_gpu: auto`` searches them."""

    gpu: int | None

    def __call__(self, images: NDArray[np.uint8]) -> list[NDArray[np.float32]]: ...


def load_network(root: Path, spec: dict[str, Any], device: str = "auto") -> Network:
    """The network described by the manifest's ``network`` entry: ``onnx`` or ``openvino``.

    ``device``: ``auto`` (ONNX Runtime's CUDA provider when it has one, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N`` (ONNX exports only); a device the runtime cannot use is a BackendError, not a silent CPU run.
    """
    kind = spec.get("format")
    if device != "auto" and device != "cpu" and not (kind == "onnx" and _cuda_index(device) is not None):
        runs = "auto, cpu, cuda or cuda:N" if kind == "onnx" else "auto or cpu"
        raise BackendError(f"device: '{device}' is not one this {kind} export runs on ({runs})")
    if kind == "onnx":
        return _OnnxNetwork(root / spec["file"], spec["outputs"], device)
    if kind == "openvino":
        return _OpenVinoNetwork(root / spec["file"], spec["outputs"])
    raise BackendError(f"{root}: unknown network format {kind!r} (expected onnx or openvino)")


def _cuda_index(device: str) -> int | None:
    """0 for ``cuda``, N for ``cuda:N``, None for anything else."""
    name, colon, index = device.partition(":")
    if name != "cuda":
        return None
    if not colon:
        return 0
    return int(index) if index.isdigit() else None


class _OnnxNetwork:
    def __init__(self, path: Path, outputs: list[str], device: str = "auto") -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError('ONNX exports need onnxruntime: pip install "anomaly[export]"') from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no memory-pattern plan: it pre-allocates each input shape's whole plan (PaDiM's runtime peak 36 MiB higher,
        # no faster: benchmarks/README.md section 5)
        options.enable_mem_pattern = False
        threads = omp_threads()  # a Ray actor's reservation, a container's quota (set by `import anomaly`), the user's
        if threads is not None:  # else ONNX Runtime's own default (the physical cores)
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # warnings about unused initialisers are not the user's concern
        if passive_openmp():  # the CLI's policy: idle threads sleep, not spin, so shared cores do not stall
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        # full float32: the CUDA provider runs convolutions and matmuls in TF32 (10 mantissa bits) by default, which
        # moved maps past the parity tolerance when cuDNN did it to the Detector (features._full_float32_convolutions)
        float32 = {"use_tf32": 0}
        providers: list[Any] = [("CUDAExecutionProvider", float32)] if "CUDAExecutionProvider" in available else []
        providers.append("CPUExecutionProvider")
        if device == "cpu":
            providers = ["CPUExecutionProvider"]
        elif device != "auto":
            if "CUDAExecutionProvider" not in available:
                raise BackendError(
                    f"device: '{device}' requested but this onnxruntime has no CUDA provider (pip install "
                    "onnxruntime-gpu, or use auto or cpu)"
                )
            cuda = ("CUDAExecutionProvider", {"device_id": _cuda_index(device), **float32})
            providers = [cuda, "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        if device not in ("auto", "cpu") and "CUDAExecutionProvider" not in self.session.get_providers():
            # ONNX Runtime falls back to the CPU with a logged warning when its CUDA provider cannot start (CUDA or
            # cuDNN libraries missing, no such GPU): the device asked for is refused, not silently replaced
            raise BackendError(
                f"device: '{device}' requested but ONNX Runtime could not start its CUDA provider there (its CUDA /"
                " cuDNN libraries, or no such GPU; use auto or cpu)"
            )
        self.input = self.session.get_inputs()[0].name
        self.outputs = outputs
        on_cuda = "CUDAExecutionProvider" in self.session.get_providers()
        self.gpu = (_cuda_index(device) if device != "auto" else 0) if on_cuda else None

    def __call__(self, images: NDArray[np.uint8]) -> list[NDArray[np.float32]]:
        return self.session.run(self.outputs, {self.input: images})


class _OpenVinoNetwork:
    gpu: int | None = None  # OpenVINO exports run on the CPU

    def __init__(self, path: Path, outputs: list[str]) -> None:
        try:
            import openvino
        except ImportError:
            raise BackendError('OpenVINO exports need openvino: pip install "anomaly[openvino]"') from None
        core = openvino.Core()
        # f32 inference: CPUs with bf16/AMX units would otherwise run in bf16 and lose score parity.
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": cpu_threads()}
        self.model = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.outputs = [self.model.output(name) for name in outputs]

    def __call__(self, images: NDArray[np.uint8]) -> list[NDArray[np.float32]]:
        # a request of its own (14 us): calling the compiled model shares one, which a second thread finds busy
        result = self.model.create_infer_request().infer(images)
        return [np.asarray(result[output]) for output in self.outputs]
