"""Fixtures of the trainer tests; the helpers live in tiny_fixtures.py."""

from __future__ import annotations

import pytest
from tiny_fixtures import build_tiny_model, make_data


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama"))


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
