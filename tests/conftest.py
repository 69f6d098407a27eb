"""Shared fixtures of the serving tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serving_fixtures import build_artifact


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A complete model artifact around a random tiny CLIP, built once per test session."""
    return build_artifact(tmp_path_factory.mktemp("serving_artifact"))


@pytest.fixture(scope="session")
def featured_model_dir(tmp_path_factory) -> Path:
    """The same, with a numeric ``followers`` and a categorical ``platform`` feature column."""
    return build_artifact(tmp_path_factory.mktemp("featured_artifact"), features=True)
