"""Backend parametrisation: every op is tested on each backend that implements it."""

from rlhf_fast.ops import _dispatch


def backends_for(op):
    names = ["torch"]
    if op in _dispatch._TRITON_OPS:
        names.append("triton")
    if op in _dispatch._NATIVE_OPS:
        names.append("native")
    return names
