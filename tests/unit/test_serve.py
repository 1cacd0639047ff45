"""HTTP service: health, predict (multipart and raw), masks/maps, 400/413 errors, metrics, a real uvicorn."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
from fastapi.testclient import TestClient  # noqa: E402

from anomaly import Detector  # noqa: E402
from anomaly.config import apply_overrides, load_config  # noqa: E402
from anomaly.runtime import ExportedDetector  # noqa: E402
from anomaly.serve import create_app, load_predictor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runtime(patchcore_export: Path) -> ExportedDetector:
    return ExportedDetector(patchcore_export)


@pytest.fixture(scope="module")
def client(runtime: ExportedDetector) -> TestClient:
    return TestClient(create_app(runtime, max_bytes=200_000), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def images(synthetic_root: Path) -> list[Path]:
    return sorted((synthetic_root / "test").glob("*/*.png"))


def test_predict_answers_the_runtime_score_for_multipart_and_raw_bodies(
    client: TestClient, runtime: ExportedDetector, images: list[Path]
) -> None:
    assert client.get("/health").status_code == 200
    for path in images[:3]:
        expected = runtime.predict(path)
        multipart = client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/png")})
        raw = client.post("/predict", content=path.read_bytes(), headers={"content-type": "image/png"})
        for response in (multipart, raw):
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["score"] == pytest.approx(expected.image_score, rel=1e-6)
            assert body["is_anomalous"] == expected.is_anomalous and body["threshold"] == expected.threshold


def test_mask_and_map_come_back_at_the_image_size(
    client: TestClient, runtime: ExportedDetector, images: list[Path]
) -> None:
    path = images[-1]
    body = client.post("/predict?mask=png&map=npy", files={"file": ("x.png", path.read_bytes())}).json()
    amap = np.load(io.BytesIO(base64.b64decode(body["map_npy"])))
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(body["mask_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
    expected = runtime.predict(path)
    assert amap.dtype == np.float32 and amap.shape == expected.anomaly_map.shape == mask.shape
    assert np.abs(amap - expected.anomaly_map).max() < 1e-5
    assert ((mask > 0) == expected.mask).all() and mask.any() == expected.is_anomalous
    assert client.post("/predict?mask=jpeg", content=path.read_bytes()).status_code == 400


def test_warnings_of_the_prediction_come_back_to_the_client(client: TestClient, images: list[Path]) -> None:
    """A 12-bit frame sent to a model that reads 16-bit data as 16 bits is near-black: the service decodes the
    uploaded bytes at their own depth and passes the runtime's warning on, as the CLI and the Python API warn."""
    assert client.post("/predict", content=images[0].read_bytes()).json()["warnings"] == []
    twelve_bit = cv2.imencode(".png", cv2.imread(str(images[0])).astype(np.uint16) * 16)[1].tobytes()
    body = client.post("/predict", files={"file": ("frame.png", twelve_bit)}).json()
    assert len(body["warnings"]) == 1 and "12 bits: near-black" in body["warnings"][0]
    assert client.post("/predict", content=images[0].read_bytes()).json()["warnings"] == []


def test_bad_and_oversized_requests_are_refused_and_the_service_stays_healthy(
    client: TestClient, images: list[Path]
) -> None:
    corrupt = client.post("/predict", files={"file": ("bad.png", b"\x89PNG not really an image")})
    assert corrupt.status_code == 400 and "cannot read image" in corrupt.json()["error"]
    assert client.post("/predict", content=b"").status_code == 400
    empty = client.post("/predict", files={"file": ("cam 1 ü.png", b"")})  # told to send what it sent
    assert empty.status_code == 400 and empty.json() == {
        "error": "multipart field 'file' ('cam 1 ü.png') is an empty file: 0 bytes"
    }
    other = client.post("/predict", files={"other": ("x.png", images[0].read_bytes())})
    assert other.status_code == 400 and "'file' is missing" in other.json()["error"]
    part = b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nPNG\r\n--b--\r\n'  # no filename: curl -F file=<x
    text = client.post("/predict", content=part, headers={"content-type": "multipart/form-data; boundary=b"})
    assert text.status_code == 400 and "'file' is text, not a file" in text.json()["error"]
    big = b"\0" * 300_000
    assert client.post("/predict", content=big).status_code == 413  # declared length
    chunked = client.post("/predict", content=iter([big[:150_000], big[150_000:]]))  # streamed, no length
    assert chunked.status_code == 413 and "limit" in chunked.json()["error"]
    assert client.get("/health").status_code == 200
    assert client.post("/predict", content=images[0].read_bytes()).status_code == 200


def test_another_requests_failure_is_not_a_warning_of_this_prediction() -> None:
    """The service logs a failed request at ERROR level on the "anomaly" logger: a prediction queued behind it and
    running while it was logged answered the other request's "request to /predict failed" as one of its warnings."""
    import logging
    from types import SimpleNamespace

    from anomaly.results import DetectionResult

    class Predictor:
        scorer = SimpleNamespace(name="stub", has_maps=False)

        def predict(self, data: bytes, maps: bool) -> DetectionResult:
            if data == b"fails":
                time.sleep(0.3)  # the other request queues behind this one meanwhile
                raise RuntimeError("a bug")
            logging.getLogger("anomaly.data").warning("its own warning")
            time.sleep(0.5)  # still running while the failure is logged
            return DetectionResult(1.0, True, 0.5)

    client = TestClient(create_app(Predictor()), raise_server_exceptions=False)
    answers: dict[str, object] = {}
    failing = threading.Thread(target=lambda: answers.update(failed=client.post("/predict", content=b"fails")))
    failing.start()
    time.sleep(0.1)
    queued = client.post("/predict", content=b"queued")
    failing.join()
    assert answers["failed"].status_code == 500  # type: ignore[attr-defined]
    assert queued.status_code == 200 and queued.json()["warnings"] == ["its own warning"], queued.text


def test_an_unknown_or_misspelt_option_is_refused_not_ignored(client: TestClient, images: list[Path]) -> None:
    """``?maps=npy`` (for ``?map=npy``) answered 200 without the map: the client found out only on reading it."""
    png = images[0].read_bytes()
    for query, name in (("maps=npy", "maps"), ("mask=png&Map=npy", "Map"), ("overlay=1", "overlay")):
        response = client.post(f"/predict?{query}", content=png)
        assert response.status_code == 400, response.text
        assert response.json() == {
            "error": f"unknown query parameter '{name}'; supported options: ?mask=png and ?map=npy"
        }
    both = client.post("/predict?mask=png&map=npy", content=png)
    assert both.status_code == 200 and {"mask_png", "map_npy"} <= set(both.json())


def test_every_refusal_is_an_error_object_and_media_types_ignore_case(client: TestClient, images: list[Path]) -> None:
    png = images[0].read_bytes()
    two = client.post("/predict", files=[("file", ("a.png", png)), ("file", ("b.png", png))])
    no_boundary = client.post("/predict", content=png, headers={"content-type": "multipart/form-data"})
    wrong_method = client.get("/predict")
    for response, status in ((two, 400), (no_boundary, 400), (wrong_method, 405)):
        assert response.status_code == status and set(response.json()) == {"error"}, response.text
    assert wrong_method.headers["allow"] == "POST"  # a 405 says which methods the resource takes (RFC 9110)
    body, boundary = _multipart(png)
    mixed_case = client.post(
        "/predict", content=body, headers={"content-type": f"Multipart/Form-Data; boundary={boundary}"}
    )
    assert mixed_case.status_code == 200, mixed_case.text


def test_health_answers_head_as_health_checks_send_it(client: TestClient) -> None:
    """wget --spider (a Docker HEALTHCHECK without curl) and uptime monitors send HEAD: it was 405, 'unhealthy'."""
    head = client.head("/health")
    assert head.status_code == 200 and head.content == b""
    assert client.get("/health").json()["status"] == "ok"


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "anomaly-test-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'.encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), boundary


def test_a_client_that_leaves_mid_upload_is_not_a_server_error(runtime: ExportedDetector) -> None:
    """A disconnect during the body was a 500 with two tracebacks in the log: alert noise, not a failure."""
    import asyncio

    app = create_app(runtime)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "headers": [(b"content-type", b"image/png"), (b"content-length", b"1000")],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("test", 80),
        "client": ("test", 1),
        "root_path": "",
    }
    messages = iter([{"type": "http.request", "body": b"\x89PNG", "more_body": True}, {"type": "http.disconnect"}])
    sent: list[dict] = []  # type: ignore[type-arg]

    async def receive() -> dict:  # type: ignore[type-arg]
        return next(messages)

    async def send(message: dict) -> None:  # type: ignore[type-arg]
        sent.append(message)

    worker = threading.Thread(target=lambda: asyncio.run(app(scope, receive, send)))  # a loop of its own
    worker.start()
    worker.join(timeout=60)
    assert sent[0]["status"] == 499
    metrics = TestClient(app).get("/metrics").text
    assert 'anomaly_requests_total{path="/predict",status="499"} 1.0' in metrics
    assert 'status="500"' not in metrics


def test_an_unusable_port_is_one_error_line(patchcore_export: Path) -> None:
    from typer.testing import CliRunner

    from anomaly.cli import app

    def serve(port: int) -> object:
        return CliRunner().invoke(app, ["serve", "--model", str(patchcore_export), "--port", str(port)])

    out_of_range = serve(99999)
    assert out_of_range.exit_code == 2 and "error: --port 99999: expected 0-65535" in out_of_range.output
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        in_use = serve(port)
    assert in_use.exit_code == 2 and f"error: --port {port}: cannot listen on 127.0.0.1:{port}" in in_use.output
    assert "Traceback" not in out_of_range.output + in_use.output


def test_serve_takes_a_device_as_score_does(patchcore_export: Path, patchcore_model: Path) -> None:
    """A model fitted with --device cuda could not be served on a CPU machine: --device replaces the model's."""
    import torch
    from typer.testing import CliRunner

    from anomaly.cli import app
    from anomaly.serve import load_predictor

    assert load_predictor(patchcore_model, "cpu").config.device == "cpu"
    with socket.create_server(("127.0.0.1", 0)) as free:
        port = str(free.getsockname()[1])
    refused = CliRunner().invoke(app, ["serve", "--model", str(patchcore_export), "--port", port, "--device", "mps"])
    assert refused.exit_code == 2
    assert "error: device: 'mps' is not one this onnx export runs on" in refused.output
    if not torch.cuda.is_available():
        args = ["serve", "--model", str(patchcore_model), "--port", port, "--device", "cuda"]
        no_gpu = CliRunner().invoke(app, args)
        assert no_gpu.exit_code == 2 and "error: device: 'cuda' requested but no CUDA GPU" in no_gpu.output


def test_metrics_count_requests_latency_and_verdicts(client: TestClient, images: list[Path]) -> None:
    for path in images:
        client.post("/predict", content=path.read_bytes())
    text = client.get("/metrics").text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"
    }
    assert samples['anomaly_requests_total{path="/predict",status="200"}'] >= len(images)
    assert samples['anomaly_request_seconds_count{path="/predict"}'] >= len(images)
    flagged = samples.get('anomaly_verdicts_total{verdict="anomalous"}', 0)
    normal = samples.get('anomaly_verdicts_total{verdict="normal"}', 0)
    assert flagged >= 1 and normal >= 1
    assert samples['anomaly_requests_total{path="/predict",status="400"}'] >= 1


def test_a_torch_model_directory_is_served_with_its_detector_scores(patchcore_model: Path, images: list[Path]) -> None:
    detector = Detector.load(patchcore_model)
    client = TestClient(create_app(detector))
    body = client.post("/predict", files={"file": ("x.png", images[0].read_bytes())}).json()
    assert body["score"] == pytest.approx(detector.predict(images[0]).image_score, rel=1e-6)
    assert client.get("/health").json()["backend"] == "torch"


def test_a_few_shot_musc_model_scores_each_request_against_its_references(
    synthetic_root: Path, images: list[Path], tmp_path: Path
) -> None:
    """The contract serves any MODEL_DIR; a `fit --config musc` one was refused (exit 2) though `score --model`
    scores one image against its references, which is what a request gets."""
    config = apply_overrides(load_config("musc"), ["backbone.image_size=[64,64]"])
    references = sorted((synthetic_root / "train" / "good").glob("*.png"))[:4]
    model = Detector(config).fit(references).save(tmp_path / "musc")
    detector = load_predictor(model)
    client = TestClient(create_app(detector), raise_server_exceptions=False)
    for image in (images[0], images[-1]):  # a defective and a good one
        body = client.post("/predict?mask=png", files={"file": ("x.png", image.read_bytes())}).json()
        expected = Detector.load(model).predict(image)
        assert (body["score"], body["is_anomalous"]) == (pytest.approx(expected.image_score), expected.is_anomalous)
        assert body["threshold"] == pytest.approx(expected.threshold) and "mask_png" in body


def test_a_scorer_without_maps_answers_no_pixel_threshold_and_refuses_a_mask(
    synthetic_root: Path, images: list[Path]
) -> None:
    """The global gaussian scorer has no map: its pixel threshold was the image threshold repeated."""
    config = apply_overrides(load_config("gaussian"), ["backbone.image_size=[128,128]", "batch_size=4"])
    detector = Detector(config).fit(sorted((synthetic_root / "train" / "good").glob("*.png"))[:8])
    client = TestClient(create_app(detector), raise_server_exceptions=False)
    body = client.post("/predict", files={"file": ("x.png", images[0].read_bytes())}).json()
    assert body["score"] == pytest.approx(detector.predict(images[0]).image_score, rel=1e-6)
    assert body["pixel_threshold"] is None and body["threshold"] == detector.threshold_
    assert client.post("/predict?mask=png", content=images[0].read_bytes()).status_code == 400


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_command_runs_uvicorn_on_a_port(patchcore_export: Path, images: list[Path], workers: str) -> None:
    """SIGTERM stops it with one line, exit 0; with --workers too, whose supervisor returns instead of raising."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "anomaly", "serve", "--model", str(patchcore_export), "--port", str(port)]
    server = subprocess.Popen([*cmd, "--workers", workers], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        response = httpx.post(f"{url}/predict", files={"file": ("x.png", images[0].read_bytes())})
        assert response.status_code == 200 and {"score", "is_anomalous", "threshold"} <= set(response.json())
        twelve_bit = cv2.imencode(".png", cv2.imread(str(images[0])).astype(np.uint16) * 16)[1].tobytes()
        warned = httpx.post(f"{url}/predict", files={"file": ("frame.png", twelve_bit)}).json()["warnings"]
        assert warned
    finally:
        server.terminate()
        server.wait(timeout=30)
    stderr = server.stderr.read().decode() if server.stderr else ""
    assert server.returncode == 0 and "serve: stopped" in stderr and "half-written" not in stderr
    # the log has the warning the client got, also from a worker process of --workers (it had no log handler)
    assert f"warning: {warned[0]}" in stderr, stderr


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_serve_refuses_a_body_limit_that_is_not_a_size(patchcore_export: Path, value: str) -> None:
    from typer.testing import CliRunner

    from anomaly.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(patchcore_export), "--max-mb", value])
    assert result.exit_code == 2 and "--max-mb a number of MiB > 0" in result.output


def test_workers_check_the_model_in_a_child_and_keep_its_error(patchcore_model: Path, tmp_path: Path) -> None:
    """With --workers the supervisor loaded the model only to fail fast, and kept it (about 0.8 GB for a torch model)
    beside the N workers that serve: the check now loads it in a child process and raises its error here."""
    check = (
        "import sys; from anomaly.serve import _check_loads; _check_loads(sys.argv[1], None); "
        "print('torch' in sys.modules, 'anomaly.detector' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", check, str(patchcore_model)], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split() == ["False", "False"], done.stderr
    (tmp_path / "meta.json").write_text("{")
    from anomaly.errors import DataError
    from anomaly.serve import _check_loads, load_predictor

    with pytest.raises(DataError) as expected:
        load_predictor(tmp_path)
    with pytest.raises(DataError) as checked:
        _check_loads(tmp_path, None)
    assert str(checked.value) == str(expected.value)


def test_a_large_maps_answer_holds_few_copies_of_it() -> None:
    """The map's base64 text went through a str, json.dumps and an encoding (and np.save into a growing buffer):
    5.5x the map at the peak for ?map=npy&mask=png. The answer still parses, and its map loads bit for bit."""
    import tracemalloc

    from anomaly.results import DetectionResult
    from anomaly.serve import _response

    amap = np.random.default_rng(0).random((1500, 2000), dtype=np.float32)
    result = DetectionResult(0.5, True, 0.4, amap, pixel_threshold=0.6)
    tracemalloc.start()
    try:
        answer = _response(result, ["cam_\u00e9.png: a warning"], mask=True, anomaly_map=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3.5 * amap.nbytes, peak / amap.nbytes  # the base64 text (1.33x) and the body (1.4x), the mask
    body = json.loads(answer.body)
    assert body["warnings"] == ["cam_\u00e9.png: a warning"] and body["is_anomalous"] is True
    assert np.array_equal(np.load(io.BytesIO(base64.b64decode(body["map_npy"]))), amap)
    assert answer.media_type == "application/json"
