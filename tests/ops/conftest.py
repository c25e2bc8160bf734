import pytest


@pytest.fixture
def use_backend(monkeypatch):
    """Set RLHF_FAST_BACKEND for one test."""

    def set_backend(name):
        monkeypatch.setenv("RLHF_FAST_BACKEND", name)

    return set_backend
