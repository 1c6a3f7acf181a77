"""Shared fixtures. Tests that start tritonserver are marked `server`."""

from __future__ import annotations

import pytest

from python_backends.paths import default_model_dir


@pytest.fixture(scope="session")
def model_dir() -> str:
    path = default_model_dir()
    if not (path / "model.safetensors").exists():
        pytest.fail(f"weights cache missing at {path}: run `make setup`")
    return str(path)
