"""Fixtures of the CLI tests: a tiny saved model and data files (shared with tests/trainers)."""

from __future__ import annotations

import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "_rlhf_fast_tiny_fixtures", os.path.join(os.path.dirname(__file__), "..", "trainers", "tiny_fixtures.py"))
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return str(fixtures.build_tiny_model(tmp_path_factory.mktemp("cli-llama"), "llama"))


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    return fixtures.make_data(tmp_path_factory.mktemp("cli-data"))


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
