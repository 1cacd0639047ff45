"""`anomaly score --ray` / `fit --ray` on one local Ray instance (2 CPUs) shared by the module."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from anomaly.cli import app  # noqa: E402
from anomaly.distributed import fit, score  # noqa: E402
from anomaly.distributed.scoring import FAULT_ENV  # noqa: E402

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The fault-injection file: a worker that finds it deletes it and dies mid-batch."""
    path = tmp_path_factory.mktemp("fault") / "die-once"
    env = {FAULT_ENV: str(path), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env["OMP_NUM_THREADS"] = "2"  # as a driver's setting reaches every worker: each actor still uses its 1 CPU
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": env})
    yield path
    ray.shutdown()


@pytest.fixture(scope="module")
def local_scores(patchcore_model: Path, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local") / "scores"
    result = runner.invoke(
        app, ["score", "--model", str(patchcore_model), "--out", str(out), "--maps", str(synthetic_root / "test")]
    )
    assert result.exit_code == 0, result.output
    return out


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "scores.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _assert_same(out: Path, reference: Path) -> None:
    rows, expected = _rows(out), _rows(reference)
    assert [r["path"] for r in rows] == [r["path"] for r in expected]  # complete, each path once, input order
    for row, ref in zip(rows, expected):
        # float32 sums in another process (thread count, BLAS blocking) may differ in the last bits: 2e-6 relative
        assert float(row["score"]) == pytest.approx(float(ref["score"]), rel=2e-6, abs=1e-6)
        assert (row["is_anomalous"], row["map_path"], row["overlay_path"]) == (
            ref["is_anomalous"],
            ref["map_path"],
            ref["overlay_path"],
        )
        np.testing.assert_allclose(
            np.load(out / row["map_path"]), np.load(reference / ref["map_path"]), rtol=2e-6, atol=1e-6
        )
        assert (out / row["overlay_path"]).is_file()
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(
        [".anomaly-output.json", "scores.csv"] + [r[c] for r in rows for c in ("map_path", "overlay_path")]
    )  # no temp files, no journal, nothing twice
    assert not list(out.parent.glob(f".{out.name}.ray-*"))  # the staging folder became OUT_DIR


def test_cli_score_on_ray_matches_local_though_a_worker_dies(
    fault_file: Path, patchcore_model: Path, synthetic_root: Path, local_scores: Path, tmp_path: Path
) -> None:
    fault_file.touch()  # the first worker to take it dies after writing one image's files
    out = tmp_path / "ray"
    args = [
        "score",
        "--ray",
        "--model",
        str(patchcore_model),
        "--out",
        str(out),
        "--maps",
        str(synthetic_root / "test"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not fault_file.exists()  # a worker died mid-batch; Ray restarted it and retried the batch
    _assert_same(out, local_scores)


def test_an_unreadable_input_is_one_error_and_leaves_nothing(
    patchcore_model: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    for image in sorted((synthetic_root / "test" / "good").glob("*.png"))[:3]:
        shutil.copy(image, folder / image.name)
    (folder / "cut.png").write_bytes((folder / image.name).read_bytes()[:200])  # a truncated PNG
    out = tmp_path / "ray"
    result = runner.invoke(app, ["score", "--ray", "--model", str(patchcore_model), "--out", str(out), str(folder)])
    assert result.exit_code == 2 and "cut.png" in result.output.strip().splitlines()[-1]
    assert not out.exists() and not list(tmp_path.glob(".ray.*"))  # no output, no staging folder


def test_resume_scores_only_what_is_missing(
    fault_file: Path, patchcore_model: Path, synthetic_root: Path, local_scores: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ray"
    seen: list[int] = []

    def interrupt(stage: str, done: int, total: int) -> None:
        seen.append(done)
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score(patchcore_model, [synthetic_root / "test"], out, maps=True, batch_size=2, progress=interrupt)
    (staging,) = out.parent.glob(f".{out.name}.ray-*")
    assert not out.exists()
    with (staging / ".journal.csv").open(newline="") as fh:
        kept = {staging / row[5]: (staging / row[5]).stat().st_ino for row in csv.reader(fh)}
    assert 4 <= len(kept) < 10
    lost = sorted(kept)[0]
    lost.unlink()  # one finished image lost its map: it is scored again
    del kept[lost]

    progress: list[int] = []
    score(
        patchcore_model,
        [synthetic_root / "test"],
        out,
        maps=True,
        batch_size=2,
        progress=lambda stage, done, total: progress.append(done),
    )
    _assert_same(out, local_scores)
    assert progress[0] > len(kept)  # counting starts at what was already done
    moved = {p: (out / p.relative_to(staging)).stat().st_ino for p in kept}
    assert moved == kept  # finished images were not scored again: the same files, renamed with their folder


def test_zero_shot_with_ray_scores_its_pool_in_this_process(synthetic_root: Path, tmp_path: Path) -> None:
    """The contract: ``--ray`` gives the same outputs as without it. A pool does not split over workers, so
    ``score --zero-shot --ray``, ``fit --ray`` of a zero-shot config and ``score --ray`` of its model run in the
    driver's process (they were refused, exit 2)."""
    test = str(synthetic_root / "test")
    common = ["--no-overlays", "--set", "backbone.image_size=[64,64]"]
    zero_shot = ["score", "--zero-shot", *common, "--out"]
    local = runner.invoke(app, [*zero_shot, str(tmp_path / "local"), test])
    on_ray = runner.invoke(app, [*zero_shot, str(tmp_path / "ray"), "--ray", test])
    assert local.exit_code == 0 and on_ray.exit_code == 0, on_ray.output
    assert "--ray: zero-shot scoring compares all inputs as one pool" in on_ray.output
    assert (tmp_path / "ray" / "scores.csv").read_text() == (tmp_path / "local" / "scores.csv").read_text().replace(
        "local", "ray"
    )
    references = [str(p) for p in sorted((synthetic_root / "train" / "good").glob("*.png"))[:3]]
    fitted = runner.invoke(app, ["fit", "--config", "musc", "--ray", "--out", str(tmp_path / "m"), *references])
    assert fitted.exit_code == 0, fitted.output
    assert "--ray: musc's fit stores references; it runs in this process" in fitted.output
    for name, ray_flag in (("m_local", []), ("m_ray", ["--ray"])):
        args = ["score", "--model", str(tmp_path / "m"), "--no-overlays", "--out", str(tmp_path / name), *ray_flag]
        assert runner.invoke(app, [*args, test]).exit_code == 0
    assert _rows(tmp_path / "m_ray") == _rows(tmp_path / "m_local")


def test_a_tiled_fit_with_ray_runs_in_this_process(synthetic_root: Path, tmp_path: Path) -> None:
    tiled = ["--set", "backbone.image_size=[64,64]", "--set", "preprocess.tile.size=96", "--set", "threshold.folds=2"]
    train = str(synthetic_root / "train" / "good")
    for name, ray_flag in (("local", []), ("ray", ["--ray"])):
        result = runner.invoke(app, ["fit", *tiled, *ray_flag, "--out", str(tmp_path / name), train])
        assert result.exit_code == 0, result.output
    assert "--ray: a tiled model's fit does not split its views" in result.output
    thresholds = [json.loads((tmp_path / n / "meta.json").read_text())["threshold"] for n in ("local", "ray")]
    assert thresholds[0] == thresholds[1]


def test_an_address_nothing_answers_at_is_one_line_not_minutes_of_retries(synthetic_root: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as free:  # a port no one listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    args = ["fit", "--ray", "--ray-address", f"127.0.0.1:{port}", "--out", str(tmp_path / "m"), str(synthetic_root)]
    # a process of its own: this module's other tests leave a Ray session, which the CLI would use as it is
    proc = subprocess.run([sys.executable, "-m", "anomaly", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --ray-address 127.0.0.1:{port}: nothing answers")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("index", [[], ["scorer.params.coreset_ratio=0.5", "scorer.params.index=IVF4,Flat"]])
def test_fit_on_ray_gives_the_local_bank_and_threshold(
    index: list[str], fault_file: Path, synthetic_root: Path
) -> None:
    """Also with an IVF index, whose lists the held-out banks on the workers take from the driver's bank."""
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config

    config = apply_overrides(load_config("patchcore"), ["backbone.image_size=[64,64]", "threshold.folds=3", *index])
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each 1-CPU actor: on some CPUs conv sums differ in the last bit across thread counts
    try:
        local = Detector(config).fit(train)
    finally:
        torch.set_num_threads(threads)
    remote = fit(config, train)
    np.testing.assert_array_equal(remote.scorer.bank_, local.scorer.bank_)
    np.testing.assert_array_equal(remote.scorer.bank_image_, local.scorer.bank_image_)
    assert remote.decision_.to_dict() == local.decision_.to_dict()
    assert remote.patch_footprint_ == local.patch_footprint_ == (16, 16)  # 128 px images on a 8 x 8 grid


def test_fit_on_ray_gathers_features_for_other_scorers(fault_file: Path, synthetic_root: Path) -> None:
    from anomaly import Detector
    from anomaly.config import apply_overrides, load_config

    config = apply_overrides(load_config("padim"), ["backbone.image_size=[64,64]", "threshold.folds=3"])
    train = sorted((synthetic_root / "train" / "good").glob("*.png"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each 1-CPU actor: 12 images of 100 features make a covariance that amplifies
    try:  # the last-bit differences of conv sums across thread counts (3.5 % of the threshold)
        local = Detector(config).fit(train)
    finally:
        torch.set_num_threads(threads)
    remote = fit(config, train)
    assert remote.decision_.image == pytest.approx(local.decision_.image, rel=1e-5)
    assert remote.decision_.pixel == pytest.approx(local.decision_.pixel, rel=1e-5)
    assert remote.patch_footprint_ == local.patch_footprint_ is not None


def test_benchmark_runs_categories_as_ray_tasks(fault_file: Path, synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    common = ["--dataset", "mvtec", "--root", synthetic_root.parent, "--category", "widget", "--out", out]
    small = ["--set", "backbone.image_size=[64,64]", "--set", "scorer.params.coreset_ratio=0.1"]
    result = runner.invoke(app, [str(a) for a in ["benchmark", *common, *small, "--ray"]])
    assert result.exit_code == 0, result.output
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["category"] for r in rows] == ["widget", "mean"] and float(rows[0]["image_auroc"]) >= 0.9
    assert (out / "widget" / "report" / "index.html").is_file()  # written by the task, on shared storage


def _init_arguments(monkeypatch: pytest.MonkeyPatch, address: str | None = None) -> dict[str, object]:
    """What ``cluster(address)`` passes to ``ray.init`` when it starts or joins a session (this module's own
    session hidden; nothing is started): the keyword arguments, or the DataError it raises instead."""
    from anomaly.distributed._cluster import cluster
    from anomaly.errors import DataError

    seen: dict[str, object] = {}

    def init(**kwargs: object) -> None:
        seen.update(kwargs)
        raise RuntimeError("not started")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(DataError) as error, cluster(address):
        pass
    return seen or {"error": str(error.value)}


def test_a_local_instance_gets_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """taskset / a container's cpuset, and a cgroup v2 quota (--cpus): not every CPU of the host, one actor each."""
    from anomaly import _runtime

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(_runtime, "_CGROUP_CPU_MAX", tmp_path / "missing")
    monkeypatch.setattr(_runtime, "_CGROUP_V1_CPU", tmp_path / "v1")
    assert _init_arguments(monkeypatch)["num_cpus"] == 3
    (tmp_path / "cpu.max").write_text("200000 100000\n")  # --cpus 2
    monkeypatch.setattr(_runtime, "_CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert _init_arguments(monkeypatch)["num_cpus"] == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")  # no quota
    assert _init_arguments(monkeypatch)["num_cpus"] == 3
    (tmp_path / "v1").mkdir()  # a cgroup v1 host (Docker's --cpus 1.5 there)
    (tmp_path / "v1" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "v1" / "cpu.cfs_period_us").write_text("100000\n")
    monkeypatch.setattr(_runtime, "_CGROUP_CPU_MAX", tmp_path / "missing")
    assert _init_arguments(monkeypatch)["num_cpus"] == 1
    (tmp_path / "v1" / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert _init_arguments(monkeypatch)["num_cpus"] == 3


def test_ray_address_in_the_environment_is_joined_as_ray_init_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ray job submit` runs `anomaly score --ray` with RAY_ADDRESS set: the cluster is joined (and checked), not
    refused as 'a local instance' whose num_cpus ray.init rejects when it connects."""
    import socket

    with socket.socket() as free:  # a port no one listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert str(_init_arguments(monkeypatch)["error"]).startswith(f"RAY_ADDRESS 127.0.0.1:{port}: nothing answers there")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    joined = _init_arguments(monkeypatch)
    assert joined["address"] == "auto" and "num_cpus" not in joined
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert "num_cpus" in _init_arguments(monkeypatch)  # empty: a local instance


def test_ray_alone_starts_a_local_instance_not_the_last_ray_start_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.init without an address joins the cluster named in /tmp/ray/ray_current_cluster (a `ray start` head on
    this machine, or the file a killed one left) and refuses num_cpus there: `--ray` alone failed with "When
    connecting to an existing cluster, num_cpus and num_gpus must not be provided"."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _init_arguments(monkeypatch)["address"] == "local"


def test_sigterm_on_a_local_instance_reaches_the_processs_own_handler(tmp_path: Path) -> None:
    """ray.init installs a handler that prints a stack dump and exits 15; the CLI's (clean-up, exit 143) must
    stay in place."""
    script = (
        "import os, signal, sys, time\n"
        "from anomaly.distributed._cluster import cluster\n"
        "def stop(signum, frame):\n"
        "    raise SystemExit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "with cluster(None):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)  # a local instance of its own (this module's session is in another process)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 143, proc.stderr
    assert "SIGTERM received" not in proc.stderr


def test_relative_paths_are_read_and_written_where_the_driver_runs(
    fault_file: Path, patchcore_model: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers run in the folder Ray was started in (`ray start`; here, this module's first folder): relative
    inputs, model and OUT_DIR are the driver's, and no map lands in the workers' folder while scores.csv names it."""
    from anomaly.config import apply_overrides, load_config

    (tmp_path / "test").symlink_to(synthetic_root / "test")
    (tmp_path / "model").symlink_to(patchcore_model)
    (tmp_path / "train").symlink_to(synthetic_root / "train" / "good")
    monkeypatch.chdir(tmp_path)
    rows = score("model", ["test"], "out", maps=True)
    assert rows and all(row["path"].startswith("test/") for row in rows)  # as given, as without --ray
    written = {p.relative_to("out").as_posix() for p in Path("out").rglob("*") if p.is_file()}
    assert {row[c] for row in rows for c in ("map_path", "overlay_path")} <= written
    assert not list(REPO.glob(".out.ray-*"))
    config = apply_overrides(load_config("padim"), ["backbone.image_size=[64,64]", "threshold.folds=3"])
    train = sorted(Path("train").glob("*.png"))
    assert fit(config, train).decision_ is not None


def test_an_empty_ray_address_is_refused_not_a_run_without_ray(
    patchcore_model: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """`--ray-address "$HEAD"` with HEAD unset: one error line, not a run in this process that ignores it."""
    out = tmp_path / "o"
    args = [
        "score",
        "--ray-address",
        "",
        "--model",
        str(patchcore_model),
        "--out",
        str(out),
        str(synthetic_root / "test"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith("error: --ray-address is empty")
    assert not out.exists() and not list(tmp_path.glob(".o.ray-*"))


def test_an_interrupted_run_says_where_the_same_command_resumes(
    patchcore_model: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Ctrl-C said only "no half-written output was left", not that the scored images are kept to resume from."""
    from anomaly.distributed import scoring

    def interrupted(items: list[dict[str, bytes]], *args: object) -> Iterator[dict[str, str]]:
        yield {"path": os.fsdecode(items[0]["path"])}  # one image scored, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        score(patchcore_model, [synthetic_root / "test"], tmp_path / "out")
    (staging,) = tmp_path.glob(".out.ray-*")
    assert f"{staging} keeps 1 of " in caplog.text and "the same command resumes" in caplog.text
    with pytest.raises(KeyboardInterrupt):  # other output options: a folder of its own, and the first one is named
        score(patchcore_model, [synthetic_root / "test"], tmp_path / "out", maps=True)
    assert f"{staging}: an interrupted run with another model or options" in caplog.text


def test_a_run_stopped_before_any_image_is_scored_leaves_nothing(
    patchcore_model: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Ctrl-C (or SIGTERM) while connecting to the cluster left an empty staging folder beside OUT_DIR, said to
    "keep 0 of N images" to resume from, and named by every later run with other options."""
    from anomaly.distributed import scoring

    @contextlib.contextmanager
    def connecting(address: str | None) -> Iterator[object]:
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(scoring, "cluster", connecting)
    with pytest.raises(KeyboardInterrupt):
        score(patchcore_model, [synthetic_root / "test"], tmp_path / "out")
    assert not list(tmp_path.iterdir()) and "the same command resumes" not in caplog.text


def test_the_ray_extra_installs_the_ray_client_that_ray_addresses_need() -> None:
    """`--ray-address ray://HEAD:10001` (Ray Client, in the README) needs `ray[client]` (grpcio): with the extra's
    Ray Data alone, ray.init refused it ("Ray Client requires pip package `ray[client]`")."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    assert any({"data", "client"} <= Requirement(r).extras for r in extra if Requirement(r).name == "ray")


def test_an_address_where_something_else_answers_is_refused_at_once() -> None:
    """The dashboard's port (8265, `ray job submit`'s address) or another service: ray.init retried it for over five
    minutes, printing connection warnings; a gRPC server (a Ray head's GCS) passes."""
    import socket
    import threading
    import time

    from anomaly.distributed._cluster import _check_reachable
    from anomaly.errors import DataError

    def serve(*reply: bytes) -> int:
        server = socket.create_server(("127.0.0.1", 0))

        def answer() -> None:
            with server, server.accept()[0] as conn:
                conn.recv(64)
                for piece in reply:
                    conn.sendall(piece)
                    time.sleep(0.1)

        threading.Thread(target=answer, daemon=True).start()
        return int(server.getsockname()[1])

    port = serve(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(DataError, match=f"^--ray-address 127.0.0.1:{port}: answers, but not as Ray does"):
        _check_reachable(f"127.0.0.1:{port}", f"--ray-address 127.0.0.1:{port}")
    port = serve(bytes([0, 0, 0x18, 4, 0, 0, 0, 0, 0]))  # a gRPC server's SETTINGS frame
    _check_reachable(f"127.0.0.1:{port}", f"--ray-address 127.0.0.1:{port}")
    port = serve(b"\x00", bytes([0, 0x18, 4, 0, 0, 0, 0, 0]))  # the same frame in two pieces (a tunnel, a proxy)
    _check_reachable(f"127.0.0.1:{port}", f"--ray-address 127.0.0.1:{port}")


def test_a_resumed_run_scores_again_an_image_replaced_at_its_path(tmp_path: Path) -> None:
    """Journalled rows were matched by path alone: an image replaced between the interruption and the rerun kept the
    old image's score."""
    from anomaly.distributed.scoring import JOURNAL, _resume, _stamp
    from anomaly.tables import CSV_COLUMNS, write_scores

    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for image in images:
        image.write_bytes(b"image")
    staging = tmp_path / ".out.ray-key"
    staging.mkdir()
    with (staging / JOURNAL).open("w", newline="") as fh:
        for image in images:
            row = {col: "" for col in CSV_COLUMNS} | {"path": str(image), "score": "1.5", "is_anomalous": "false"}
            csv.writer(fh).writerow([*(row[col] for col in CSV_COLUMNS), _stamp(str(image))])
    images[1].write_bytes(b"another image")
    expected = {str(image): ("", "") for image in images}
    assert list(_resume(staging, expected)) == [str(images[0])]
    rows = [
        {col: "" for col in CSV_COLUMNS} | {"path": str(i), "score": "1.5", "is_anomalous": "false"} for i in images
    ]
    write_scores(staging / "scores.csv", rows)  # killed while finishing: scores.csv beside the journal
    assert list(_resume(staging, expected)) == [str(images[0])]
    (staging / "scores.csv").unlink()
    with (staging / JOURNAL).open("a", newline="") as fh:  # rescored since it changed: its new row counts
        csv.writer(fh).writerow([*(rows[1][col] for col in CSV_COLUMNS), _stamp(str(images[1]))])
    assert sorted(_resume(staging, expected)) == sorted(map(str, images))


def test_a_node_without_the_drivers_folder_says_where_relative_paths_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker kept its own folder silently: a relative `benchmark --out` was written where no one looks for it."""
    from anomaly.distributed._cluster import use_driver_cwd

    monkeypatch.chdir(tmp_path)
    use_driver_cwd(str(tmp_path / "elsewhere"))
    assert f"{tmp_path / 'elsewhere'}: not on this node" in caplog.text and f"written in {tmp_path}" in caplog.text


def test_a_second_run_on_the_same_out_dir_is_refused_while_the_first_writes_it(
    patchcore_model: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """Two `score --ray` runs on one OUT_DIR appended to one journal and renamed one staging folder into place."""
    import fcntl

    out = tmp_path / "scores"
    with open(tmp_path / ".scores.ray.lock", "a") as first:  # the lock a running first run holds
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = runner.invoke(
            app, ["score", "--ray", "--model", str(patchcore_model), "--out", str(out), str(synthetic_root / "test")]
        )
    assert result.exit_code == 2
    assert "another `anomaly score --ray` run is writing it" in result.output.strip().splitlines()[-1]
    assert str(out) in result.output and not out.exists() and not list(tmp_path.glob(".scores.ray-*"))


def test_a_run_that_opened_the_lock_as_the_previous_run_ended_does_not_run_beside_a_newer_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A run ending removes its lock file: a second run that had opened it just before locked the removed file, and
    a third run, locking a new file of that name, wrote the same OUT_DIR alongside it."""
    import fcntl
    from typing import Any

    from anomaly.distributed import scoring
    from anomaly.errors import DataError

    out = tmp_path / "scores"
    first = scoring._only_run(out)
    first.__enter__()
    flock = fcntl.flock

    def first_ends_in_between(handle: Any, operation: int) -> None:  # the second run's open() came before the end
        monkeypatch.setattr(fcntl, "flock", flock)
        first.__exit__(None, None, None)
        flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", first_ends_in_between)
    with scoring._only_run(out):  # the second run: the first has ended
        with pytest.raises(DataError, match="another `anomaly score --ray` run is writing it"):
            with scoring._only_run(out):  # the third run, while the second writes
                pass
    assert not list(tmp_path.iterdir())  # the lock file goes with the run


def test_an_exports_actor_never_loads_torch(fault_file: Path, patchcore_export: Path, tmp_path: Path) -> None:
    """Each actor scoring an export imported torch (about 700 MiB) only to set its thread count."""

    @ray.remote(num_cpus=1)
    def actor_modules() -> tuple[str, bool, str | None]:
        from anomaly.distributed.scoring import ScoreWorker

        worker = ScoreWorker(str(patchcore_export), str(tmp_path / "stage"), os.getcwd(), False, False, 512)
        return worker.error, "torch" in sys.modules, os.environ.get("OMP_NUM_THREADS")

    fresh = {"env_vars": {"ANOMALY_TEST_FRESH_WORKER": "1"}}  # another runtime env: not a worker that ran a fit
    assert ray.get(actor_modules.options(runtime_env=fresh).remote()) == ("", False, "1")


def test_device_and_moved_weights_reach_the_workers(fault_file: Path, synthetic_root: Path, tmp_path: Path) -> None:
    """`score --ray` refused `--device` and `--set backbone.weights=`: a model fitted with `--device cuda`, or whose
    weights file moved, could be scored in one process only. Both now reach every worker's load."""
    import shutil

    from anomaly.features import _packaged_file

    packaged = _packaged_file("tf_efficientnet_lite0")
    assert packaged is not None
    weights = tmp_path / "lite0.pth"
    shutil.copy(packaged, weights)
    model = tmp_path / "model"
    small = ["--set", "backbone.image_size=[64,64]", "--set", "batch_size=4"]
    fitted = runner.invoke(app, ["fit", "--out", str(model), *small, "--set", f"backbone.weights={weights}",
                                 str(synthetic_root)])  # fmt: skip
    assert fitted.exit_code == 0, fitted.output
    moved = str(weights.rename(tmp_path / "moved.pth"))
    test = str(synthetic_root / "test")
    outputs = []
    for name, extra in (("local", []), ("ray", ["--ray"])):
        out = tmp_path / name
        args = [
            "score",
            "--model",
            str(model),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--set",
            f"backbone.weights={moved}",
        ]
        result = runner.invoke(app, [*args, "--maps", *extra, test])
        assert result.exit_code == 0, result.output
        outputs.append(out)
    _assert_same(outputs[1], outputs[0])
    refused = runner.invoke(app, ["score", "--model", str(model), "--out", str(tmp_path / "no"), "--ray", test])
    assert refused.exit_code == 2 and "backbone.weights" in refused.output  # the workers' load names the moved file


def test_a_device_reaches_the_workers_as_given_and_cuda_n_names_the_actors_view(
    patchcore_model: Path, patchcore_export: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--device cuda:1` is handed to the actors as it is (not turned into cuda:0 or cpu); an actor, which Ray gives
    one GPU that it sees as cuda:0, refuses it in one line that says so, where it said "torch sees 1 CUDA GPU(s)" on
    a node of several. No GPU needed: the actor's view of one GPU is patched in."""
    import anomaly.distributed.scoring as scoring
    from anomaly.errors import DataError

    handed: list[str | None] = []

    def no_cluster(items: list[dict[str, bytes]], worker: dict[str, str], address: str | None, batch_size: int):  # type: ignore[no-untyped-def]
        handed.append(worker["device"])
        raise DataError("no cluster in this test")
        yield

    monkeypatch.setattr(scoring, "_run", no_cluster)
    for device in ("cuda:1", "cuda", "cpu"):
        with pytest.raises(DataError, match="no cluster"):
            score(patchcore_model, [synthetic_root / "test"], tmp_path / device.replace(":", "_"), device=device)
    assert handed == ["cuda:1", "cuda", "cpu"]

    monkeypatch.setattr(scoring, "use_reserved_cpus", lambda: None)  # not in an actor
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for model in (patchcore_model, patchcore_export):
        worker = scoring.ScoreWorker(str(model), str(tmp_path / "stage"), os.getcwd(), False, False, 512, "cuda:1")
        assert "'cuda:1'" in worker.error and "as cuda:0: --device cuda, not cuda:1" in worker.error, worker.error


def test_a_model_without_maps_says_so_under_quiet_as_without_ray(
    fault_file: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """`score --ray --maps` with a scorer without maps logged its notice at INFO: `-q` dropped it, where the local
    run keeps it as a warning."""
    model = tmp_path / "gaussian"
    small = ["--set", "backbone.image_size=[64,64]", "--set", "batch_size=4"]
    fitted = runner.invoke(app, ["fit", "--config", "gaussian", "--out", str(model), *small, str(synthetic_root)])
    assert fitted.exit_code == 0, fitted.output
    test = str(synthetic_root / "test" / "good")
    for name, extra in (("local", []), ("ray", ["--ray"])):
        result = runner.invoke(app, ["-q", "score", "--model", str(model), "--out", str(tmp_path / name), "--maps",
                                     *extra, test])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "no maps are written" in result.output, name
        assert not list((tmp_path / name).glob("maps"))


def test_the_workers_input_warnings_reach_the_user_once(
    fault_file: Path, patchcore_model: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    """An input unlike the training images (here a thumbnail) is named in a warning by `anomaly score`; with --ray
    the warning was logged in the actor only, where a local instance's shutdown dropped it: the user never saw it."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted((synthetic_root / "test" / "good").glob("*.png"))[:3]
    for image in good:
        (folder / image.name).write_bytes(image.read_bytes())
    Image.open(good[0]).resize((24, 24)).save(folder / "thumb.png")  # under a third of the 128 px training images
    for name, extra in (("local", []), ("ray", ["--ray"])):
        result = runner.invoke(app, ["score", "--model", str(patchcore_model), "--out", str(tmp_path / name),
                                     *extra, str(folder)])  # fmt: skip
        assert result.exit_code == 0, result.output
        said = [line for line in result.output.splitlines() if line.startswith("warning: ") and "thumb.png" in line]
        assert len(said) == 1 and "under a third" in said[0], (name, result.output)


def test_cpu_work_on_a_cluster_with_gpus_reserves_no_gpu() -> None:
    """`--device cpu` on a cluster with GPUs started one actor per GPU, each holding a GPU it never used (two actors
    on 16 CPUs and 2 GPUs): CPU work takes actors by the CPUs and leaves the GPUs to others."""
    from types import SimpleNamespace

    from anomaly.distributed._cluster import Workers, workers

    ray = SimpleNamespace(cluster_resources=lambda: {"CPU": 16.0, "GPU": 2.0})
    assert workers(ray, device="cpu") == Workers(16, 1, 0)  # type: ignore[arg-type]
    assert workers(ray, 4, device="cpu") == Workers(4, 4, 0)  # type: ignore[arg-type]
    for device in (None, "auto", "cuda"):
        assert workers(ray, device=device) == Workers(2, 8, 1)  # type: ignore[arg-type]
