"""Shared fixtures: a synthetic MVTec-layout category and the real bottle category."""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from anomaly.data.synthetic import make_synthetic_category

REPO = Path(__file__).resolve().parents[1]
MVTEC_ROOT = Path(os.environ.get("ANOMALY_MVTEC_ROOT", REPO.parent / "shared" / "datasets" / "mvtec_ad"))
SMALL = ["--set", "backbone.image_size=[128,128]"]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic category (12 train, 4 good + 6 defective test images, 128 px)."""
    root = tmp_path_factory.mktemp("data")
    return make_synthetic_category(root, "widget", n_train=12, n_test_good=4, n_test_defect=6, size=128, seed=0)


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    """The real MVTec AD bottle category (integration tests)."""
    root = MVTEC_ROOT / "bottle"
    if not (root / "train" / "good").is_dir():
        pytest.skip(f"MVTec AD bottle not found at {root} (set ANOMALY_MVTEC_ROOT)")
    return root


# --- a real browser for the HTML report tests (Debian's chromium driven by playwright) ---
CHROMIUM = Path(os.environ.get("ANOMALY_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Accumulates the page's cumulative layout shift (CLS) from the first paint on.
_CLS_SCRIPT = """
window.__cls = 0;
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) if (!entry.hadRecentInput) window.__cls += entry.value;
}).observe({ type: "layout-shift", buffered: true });
"""


@dataclass
class OpenedReport:
    """A report page once its scripts have run, with what went wrong while loading it."""

    page: Any
    errors: list[str]  # console errors, uncaught exceptions, failed requests
    outside: list[str]  # requested URLs outside the report folder
    seconds: float  # navigation start to the page being interactive (its scripts done)


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """Headless Chromium (`apt-get install chromium` + `pip install playwright`), else the test is skipped."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install -e '.[dev]'")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install it with `apt-get install chromium` (or set ANOMALY_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_report(chromium: Any) -> Iterator[Callable[[Path], OpenedReport]]:
    """Open REPORT_DIR/index.html from disk; network requests are refused and recorded."""
    contexts = []

    def _open(folder: Path) -> OpenedReport:
        context = chromium.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        context.route(re.compile(r"^(https?|wss?|ftp)://"), lambda route: route.abort())
        page = context.new_page()
        page.add_init_script(_CLS_SCRIPT)
        prefix = folder.resolve().as_uri() + "/"
        opened = OpenedReport(page, [], [], 0.0)
        page.on("console", lambda msg: opened.errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: opened.errors.append(str(exc)))
        page.on("requestfailed", lambda req: opened.errors.append(f"request failed: {req.url}"))
        page.on("request", lambda req: None if req.url.startswith(prefix) else opened.outside.append(req.url))
        start = time.perf_counter()
        page.goto(prefix + "index.html")
        page.wait_for_function("document.documentElement.dataset.ready === 'true'", timeout=60_000)
        opened.seconds = time.perf_counter() - start
        return opened

    yield _open
    for context in contexts:
        context.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_report_to_serializable(config: pytest.Config, report: Any) -> Iterator[None]:
    """A report may hold a file name's undecodable bytes (lone surrogates), in its captured output or in a failure's
    message: pytest-xdist must send it as UTF-8 from a worker (execnet refuses it: INTERNALERROR, the session ends
    and the failure is not named), so they are written as escapes in what is sent, every string of it."""
    outcome = yield
    outcome.force_result(_utf8_escaped(outcome.get_result()))


@pytest.hookimpl(tryfirst=True)
def pytest_warning_recorded(warning_message: warnings.WarningMessage) -> None:
    """A warning's text is sent from an xdist worker as well (not as a report): one naming an undecodable file ended
    the session in an INTERNALERROR that named no test. Its message is escaped before pytest-xdist's hook sends it."""
    text = str(warning_message.message)
    escaped = _utf8_escaped(text)
    if escaped != text:
        try:
            warning_message.message = warning_message.category(escaped)
        except Exception:  # a category whose constructor takes other arguments: the text alone
            warning_message.message = escaped


def _utf8_escaped(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, dict):
        return {_utf8_escaped(k): _utf8_escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_utf8_escaped(v) for v in value)
    return value
