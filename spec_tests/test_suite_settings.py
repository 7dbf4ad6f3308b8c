"""The suite's own settings are strict: a warning is an error, xfails must fail, markers exist."""

from __future__ import annotations

import pytest


def test_pytest_runs_strict(request: pytest.FixtureRequest) -> None:
    config = request.config
    assert config.getini("xfail_strict") is True
    filters = config.getini("filterwarnings")
    assert filters[0] == "error"
    assert all(f == "error" or f.startswith("ignore:") for f in filters)  # narrow exceptions
    assert "--strict-markers" in config.getini("addopts")
    assert config.option.strict_markers or "--strict-markers" in config.getini("addopts")
