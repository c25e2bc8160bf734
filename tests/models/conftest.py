"""Fixtures of the model tests; the tiny models themselves are built by tests/tiny.py."""

from __future__ import annotations

import pytest

from tests.tiny import ARCHS, VOCAB, build_tiny_model, tiny_config, tiny_tokenizer  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """factory(arch="llama", with_pad=True, seed=0, dtype=torch.float32, **config) -> folder, cached per session."""
    cache = {}

    def make(arch: str = "llama", **kwargs):
        key = (arch, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            cache[key] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **kwargs)
        return cache[key]

    return make
