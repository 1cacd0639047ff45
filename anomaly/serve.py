"""`anomaly serve`: an HTTP scoring service (FastAPI + uvicorn) over a model or an export directory.

Endpoints: ``POST /predict`` (one image: multipart field ``file`` or the raw request body;
``?mask=png`` / ``?map=npy`` add the mask / anomaly map base64-encoded to the JSON, whose ``warnings`` list what
the prediction warned of, e.g. a 12-bit frame for an 8-bit model), ``GET /health`` (or HEAD),
``GET /metrics`` (Prometheus text). Bad input answers 4xx with ``{"error": ...}``; an unexpected
failure answers 500 for that request only: the process keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from anomaly._fs import restore_interrupted
from anomaly.errors import AnomalyError, DataError, LogLines
from anomaly.results import DetectionResult

__all__ = ["DEFAULT_MAX_BYTES", "app_from_env", "create_app", "load_predictor"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 32 * 2**20
_ROUTES = ("/predict", "/health", "/metrics")
_CLIENT_CLOSED = 499  # the client went away before the answer (nginx's code): not a failure of the service
_ENV_MODEL, _ENV_MAX_BYTES = "ANOMALY_SERVE_MODEL", "ANOMALY_SERVE_MAX_BYTES"  # for uvicorn's worker processes
_ENV_DEVICE, _ENV_LOG_LEVEL = "ANOMALY_SERVE_DEVICE", "ANOMALY_SERVE_LOG_LEVEL"


def load_predictor(model: str | os.PathLike[str], device: str | None = None) -> Any:
    """An ExportedDetector for an export directory (no torch), else a torch Detector for a model directory;
    ``device`` replaces the model's own (auto, cpu, cuda, cuda:N, mps). A zero-shot model (``anomaly fit --config
    musc`` on a few good images) scores each request against its references, as ``anomaly score --model`` scores
    one image."""
    from anomaly.runtime import ExportedDetector, is_export_dir

    path = Path(model)
    restore_interrupted(path)
    if not path.is_dir():
        raise DataError(f"--model {path}: model or export directory not found")
    if is_export_dir(path):
        return ExportedDetector(path, device=device or "auto")
    from anomaly.detector import Detector

    return Detector.load(path, device=device)


def create_app(predictor: Any, *, max_bytes: int = DEFAULT_MAX_BYTES, name: str = "") -> FastAPI:
    """The service around ``predictor`` (a Detector or ExportedDetector), with its own metrics registry."""
    app = FastAPI(title="anomaly", docs_url=None, redoc_url=None)
    registry = CollectorRegistry()
    requests = Counter("anomaly_requests", "HTTP requests", ["path", "status"], registry=registry)
    latency = Histogram(
        "anomaly_request_seconds",
        "Request latency in seconds",
        ["path"],
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        registry=registry,
    )
    verdicts = Counter("anomaly_verdicts", "Verdicts given", ["verdict"], registry=registry)
    lock = threading.Lock()  # one prediction at a time: the backends use every core per call
    backend = predictor.manifest["network"]["format"] if hasattr(predictor, "manifest") else "torch"

    def score(data: bytes, maps: bool) -> tuple[Any, list[str]]:
        """The result, and the warnings the prediction logged (an odd bit depth or aspect ratio) for the client."""
        with lock, _Warnings() as warnings:  # decoding too: queued requests hold bytes, not decoded images
            return predictor.predict(data, maps=maps), warnings.messages  # bytes: the image's own bit depth is seen

    # async: answered on the event loop, not behind predictions queued in the thread pool; HEAD for health checks
    # that send it (wget --spider, uptime monitors)
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "scorer": predictor.scorer.name, "backend": backend}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(request: Request, mask: str | None = None, map: str | None = None) -> Response:  # noqa: A002
        unknown = sorted(set(request.query_params) - {"mask", "map"})  # a typo (?maps=npy) answered 200 without a map
        if unknown or mask not in (None, "png") or map not in (None, "npy"):
            what = f"unknown query parameter {unknown[0]!r}; " if unknown else ""
            return _error(400, f"{what}supported options: ?mask=png and ?map=npy")
        if (mask or map) and not predictor.scorer.has_maps:
            return _error(400, f"the {predictor.scorer.name} scorer gives image scores only: no mask or map")
        try:
            if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
                async with request.form(max_files=1) as form:  # closes the spooled upload files
                    upload = form.get("file")
                    if not isinstance(upload, UploadFile):  # a part without a filename is text (curl -F file=<x)
                        what = "is text, not a file" if isinstance(upload, str) else "is missing"
                        return _error(400, f"multipart field 'file' {what}: send the image as a file (-F file=@x.png)")
                    data = await upload.read()
                    if not data:  # not "empty request": the client did send field 'file'
                        return _error(400, f"multipart field 'file' ({upload.filename!r}) is an empty file: 0 bytes")
            else:
                data = await request.body()
        except ClientDisconnect:  # nobody to answer; counted apart from failures (nginx's 499)
            log.info("client disconnected during its upload to /predict")
            return _error(_CLIENT_CLOSED, "client disconnected")
        if not data:
            return _error(400, "empty request: send one image as multipart field 'file' or as the request body")
        try:
            result, warnings = await run_in_threadpool(score, data, bool(mask or map))
        except AnomalyError as exc:
            return _error(400, str(exc))
        verdicts.labels("anomalous" if result.is_anomalous else "normal").inc()
        # encoded and rendered in a worker thread: a large image's map is hundreds of MB of JSON, which on the event
        # loop held /health for 20 s
        return await run_in_threadpool(_response, result, warnings, bool(mask), bool(map))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # the framework's 4xx (multipart, 405) as {"error"}, with its headers (a 405's Allow)
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request to %s failed", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    app.add_middleware(_LimitAndMeasure, max_bytes=max_bytes, requests=requests, latency=latency)  # type: ignore[arg-type]
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for ``--workers`` > 1: each worker process loads the model named in the environment."""
    model = os.environ[_ENV_MODEL]
    _log_like_the_cli(int(os.environ.get(_ENV_LOG_LEVEL) or logging.INFO))
    predictor = load_predictor(model, os.environ.get(_ENV_DEVICE) or None)
    return create_app(predictor, max_bytes=int(os.environ[_ENV_MAX_BYTES]), name=Path(model).name)


def _response(result: DetectionResult, warnings: list[str], mask: bool, anomaly_map: bool) -> Response:
    """The JSON answer to /predict, with the mask (PNG) and the map (.npy) base64-encoded when asked for.

    The base64 bytes are spliced into the body as they are: a map's text went through a str, ``json.dumps`` and
    its UTF-8 encoding: with its mask, a 12-megapixel map (46 MB) peaked at 253 MB, now at 155 MB (the text and
    the body)."""
    fields: dict[str, Any] = {
        "score": result.image_score,
        "is_anomalous": result.is_anomalous,
        "threshold": result.threshold,
        "pixel_threshold": result.to_dict()["pixel_threshold"],  # None without a map
        "warnings": warnings,
    }
    encoded: dict[str, bytes] = {}
    if mask:
        pixels = result.mask
        assert pixels is not None  # /predict asks for a mask or a map only of a scorer with maps
        _, png = cv2.imencode(".png", pixels.astype(np.uint8) * 255)  # a binary uint8 image always encodes
        encoded["mask_png"] = base64.b64encode(png.tobytes())
    if anomaly_map:
        assert result.anomaly_map is not None
        encoded["map_npy"] = base64.b64encode(_npy_bytes(np.ascontiguousarray(result.anomaly_map, np.float32)))
    # as JSONResponse renders: no NaN (a ValueError, answered 500), UTF-8 file names in warnings
    head = json.dumps(fields, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    parts = [head[:-1]]
    for key, text in encoded.items():
        parts += [b',"', key.encode(), b'":"', text, b'"']  # no copy of the text before the one join
    return Response(b"".join([*parts, b"}"]), media_type="application/json")


def _npy_bytes(array: np.ndarray) -> bytearray:
    """``np.save``'s bytes of a C-ordered array, written once into a buffer of their size (a BytesIO grew by
    copies: twice the map at its peak)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    size = header.tell()
    data = bytearray(size + array.nbytes)
    data[:size] = header.getbuffer()
    data[size:] = array.data.cast("B")
    return data


def run(
    model: str | os.PathLike[str], host: str, port: int, workers: int, max_bytes: int, device: str | None = None
) -> None:
    """Serve until interrupted (uvicorn)."""
    import uvicorn

    _check_port(host, port)
    if workers > 1:
        _check_loads(model, device)  # fail fast, with one clear error, before the workers start
        os.environ[_ENV_MODEL], os.environ[_ENV_MAX_BYTES] = str(model), str(max_bytes)
        os.environ[_ENV_DEVICE] = device or ""
        os.environ[_ENV_LOG_LEVEL] = str(logging.getLogger().getEffectiveLevel())  # -q / -v reach the workers
        uvicorn.run("anomaly.serve:app_from_env", factory=True, host=host, port=port, workers=workers)
    else:
        app = create_app(load_predictor(model, device), max_bytes=max_bytes, name=Path(model).name)
        uvicorn.run(app, host=host, port=port)


def _log_like_the_cli(level: int) -> None:
    """A worker process of ``--workers`` starts with no log handler (uvicorn configures only its own loggers): the
    warnings of its predictions and its failed requests' errors reach stderr as the CLI writes them with one worker
    (``warning: ...``, ``error: ...``), not only the client's JSON or nowhere."""
    root = logging.getLogger()
    if root.handlers:  # a process that set up its own logging keeps it
        return
    root.setLevel(level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogLines("%(message)s"))
    root.addHandler(handler)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # as the CLI: its loader logs every build it probes


def _check_loads(model: str | os.PathLike[str], device: str | None) -> None:
    """Raise the error :func:`load_predictor` would, from a child process: the supervisor of ``--workers`` then
    holds no model of its own (a torch model kept about 0.8 GB there for nothing)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        failure = pool.apply(_load_failure, (str(model), device))
    if failure is not None:
        kind, message = failure
        raise next((e for e in AnomalyError.__subclasses__() if e.__name__ == kind), AnomalyError)(message)


def _load_failure(model: str, device: str | None) -> tuple[str, str] | None:
    """The class name and message of the error loading ``model`` raises (None when it loads)."""
    try:
        load_predictor(model, device)
    except AnomalyError as exc:
        return type(exc).__name__, str(exc)
    return None


def _check_port(host: str, port: int) -> None:
    """One clear error for a port that cannot be listened on (uvicorn logs a traceback or exits with 3)."""
    if not 0 <= port <= 65535:
        raise DataError(f"--port {port}: expected 0-65535")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise DataError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _Warnings(logging.Handler):
    """Collects the warnings that ``anomaly``'s loggers emit while it is entered (one prediction at a time)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != __name__:  # the service's own lines are about other requests (one that failed meanwhile)
            self.messages.append(record.getMessage())

    def __enter__(self) -> _Warnings:
        logger = logging.getLogger("anomaly")
        self._level = logger.level
        if logger.getEffectiveLevel() > logging.WARNING:  # a quieter log must not empty the client's warnings
            logger.setLevel(logging.WARNING)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("anomaly")
        logger.removeHandler(self)
        logger.setLevel(self._level)


class _BodyTooLarge(Exception):
    pass


class _LimitAndMeasure:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (declared or streamed), request counts and latency."""

    def __init__(self, app: ASGIApp, max_bytes: int, requests: Counter, latency: Histogram) -> None:
        self.app, self.max_bytes, self.requests, self.latency = app, max_bytes, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in _ROUTES else "other"
        start, status, received = time.perf_counter(), [500], [0]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def limited() -> Message:
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > self.max_bytes:
                raise _BodyTooLarge
            return message

        declared = dict(scope["headers"]).get(b"content-length", b"")
        try:
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise _BodyTooLarge
            await self.app(scope, limited, send_status)
        except _BodyTooLarge:
            message = f"request body larger than the limit of {self.max_bytes} bytes"
            await _error(413, message)(scope, receive, send_status)
        finally:
            self.requests.labels(path, str(status[0])).inc()
            self.latency.labels(path).observe(time.perf_counter() - start)
