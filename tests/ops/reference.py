"""The float64 references, re-exported: they live in rlhf_fast.reference so that benchmarks can use them too."""

from rlhf_fast.reference import *  # noqa: F403
from rlhf_fast.reference import __all__  # noqa: F401
