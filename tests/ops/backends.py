"""Backend parametrisation: every op is tested on each backend that implements it."""

import pytest

from rlhf_fast import _dispatch


def backends_for(op):
    names = ["torch"]
    if op in _dispatch._TRITON_OPS:
        names.append("triton")
    if op in _dispatch._NATIVE_OPS:
        names.append("native")
    return names


@pytest.fixture
def use_backend(monkeypatch):
    def set_backend(name):
        monkeypatch.setenv("RLHF_FAST_BACKEND", name)

    return set_backend
