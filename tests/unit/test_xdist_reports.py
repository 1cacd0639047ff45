"""The test suite's own reports: what a pytest-xdist worker sends its controller must be UTF-8."""

from __future__ import annotations

import os

import pytest


def test_a_failure_naming_an_undecodable_file_reaches_the_controller(pytestconfig: pytest.Config) -> None:
    """Only captured output was escaped: a failure whose message held a file name's lone surrogate made the worker's
    report unsendable (execnet: "strings must be utf-8 encodable"), an INTERNALERROR that ended the session, and
    its summary counted only the tests that had passed ("5 passed", the failures not named)."""
    execnet = pytest.importorskip("execnet")
    name = os.fsdecode(b"cam\xff.png")
    try:
        assert name == "x", f"bad {name}"
    except AssertionError:
        excinfo = pytest.ExceptionInfo.from_current()
    report = pytest.TestReport(
        "t.py::t", ("t.py", 0, "t"), {}, "failed", excinfo.getrepr(), "call", [("Captured log call", f"log {name}")]
    )
    data = pytestconfig.hook.pytest_report_to_serializable(config=pytestconfig, report=report)
    sent = execnet.loads(execnet.dumps(data))  # raised DumpError
    shown = pytestconfig.hook.pytest_report_from_serializable(config=pytestconfig, data=sent)
    assert shown.failed and "bad cam\\udcff.png" in str(shown.longrepr)
    assert shown.sections == [("Captured log call", "log cam\\udcff.png")]
    output = [("Captured stdout call", "é\n")]  # anything else is sent as it was
    normal = pytest.TestReport("t.py::u", ("t.py", 1, "u"), {}, "passed", None, "call", output)
    data = pytestconfig.hook.pytest_report_to_serializable(config=pytestconfig, report=normal)
    assert pytestconfig.hook.pytest_report_from_serializable(config=pytestconfig, data=data).sections == normal.sections
