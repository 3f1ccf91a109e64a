"""Shared fixtures: phantom scans and tiny ONNX models, all built in code (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from SHIVACMBLib.modelstore import blobmodel
import phantoms
from helpers import SMALL_BOX, SMALL_FOV
from SHIVACMBLib import inference


@pytest.fixture(autouse=True)
def _isolated_models(tmp_path_factory, monkeypatch):
    """No test sees the developer's own installed models or cache (int8 copies, precision records), and no
    sessions leak between tests."""
    monkeypatch.setenv("SHIVACMB_MODELS", str(tmp_path_factory.mktemp("user-models")))
    monkeypatch.setenv("SHIVACMB_CACHE", str(tmp_path_factory.mktemp("user-cache")))
    inference.clear_ensembles()
    yield
    inference.clear_ensembles()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A one-fold NDHWC dark-blob detector with a small model box."""
    return blobmodel.write_model(tmp_path_factory.mktemp("model") / "test-dark-blob", shape=SMALL_BOX)


@pytest.fixture(scope="session")
def scene() -> phantoms.Scene:
    return phantoms.default_scene()


@pytest.fixture(scope="session")
def iso_scan(tmp_path_factory, scene) -> Path:
    """The default scene on a 1 mm LPS grid, as NIfTI."""
    grid = phantoms.grid_around((1.3, -2.1, 0.7), SMALL_FOV, (1, 1, 1))
    return phantoms.write(phantoms.render(scene, grid, seed=1), tmp_path_factory.mktemp("scan") / "iso.nii.gz")
