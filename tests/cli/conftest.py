"""Fixtures of the CLI tests: a tiny saved model and data files (shared with tests/trainers)."""

from __future__ import annotations

import pytest

from tests import tiny as fixtures


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return str(fixtures.build_tiny_model(tmp_path_factory.mktemp("cli-llama"), "llama"))


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    return fixtures.make_data(tmp_path_factory.mktemp("cli-data"))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
