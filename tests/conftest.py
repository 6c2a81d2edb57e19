"""Test-wide setup: a private cache directory (kernel dispositions, compiled ops stay shared)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # shared test helpers (references, fixture writers)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh dataset / calibration cache (``KPCONV_TF_CACHE``) for one test."""
    monkeypatch.setenv("KPCONV_TF_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """A fresh dataset / calibration cache shared by the in-process runs of one test module."""
    previous = os.environ.get("KPCONV_TF_CACHE")
    os.environ["KPCONV_TF_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("KPCONV_TF_CACHE", None)
    else:
        os.environ["KPCONV_TF_CACHE"] = previous
