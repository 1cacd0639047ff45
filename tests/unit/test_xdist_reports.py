"""The test suite's own reports: what a pytest-xdist worker sends its controller must be UTF-8."""

from __future__ import annotations

import os
import warnings

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


def test_a_warning_naming_an_undecodable_file_reaches_the_controller(pytestconfig: pytest.Config) -> None:
    """A worker sends each warning apart from the reports: one naming a file with a lone surrogate ended the session
    in an INTERNALERROR ("strings must be utf-8 encodable"), which named no test."""
    execnet = pytest.importorskip("execnet")
    remote = pytest.importorskip("xdist.remote")
    name = os.fsdecode(b"cam\xff.png")
    message = warnings.WarningMessage(UserWarning(f"odd {name}"), UserWarning, "t.py", 1)
    conftest = next(p for p in pytestconfig.pluginmanager.get_plugins() if hasattr(p, "pytest_warning_recorded")
                    and getattr(p, "__file__", "").endswith("conftest.py"))  # fmt: skip
    conftest.pytest_warning_recorded(warning_message=message)
    sent = execnet.loads(execnet.dumps(remote.serialize_warning_message(message)))  # raised DumpError
    assert sent["message_str"] == "odd cam\\udcff.png" and sent["category_class_name"] == "UserWarning"
    plain = warnings.WarningMessage(UserWarning("é"), UserWarning, "t.py", 1)
    conftest.pytest_warning_recorded(warning_message=plain)
    assert str(plain.message) == "é"  # anything else is sent as it was
