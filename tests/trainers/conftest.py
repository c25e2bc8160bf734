"""Fixtures of the trainer tests; the helpers live in tiny_fixtures.py."""

from __future__ import annotations

import pytest
import torch
from tiny_fixtures import build_tiny_model, make_data


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama"))


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _one_thread():
    # One intra-op thread: on a shared 2-core machine two threads of these tiny GEMMs contend and ran ~10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
