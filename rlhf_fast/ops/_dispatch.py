"""Backend choice for every op: auto | torch | triton | native.

The backend of a call is, first to last: the op's `backend=` argument, then the innermost active
`use_backend(...)` block of this thread, then the environment variable RLHF_FAST_BACKEND (read at each
call), then "auto". auto: CUDA tensors go to the fastest kernel we have for the op, CPU tensors to native C++
where it exists, else torch; float64 inputs always go to torch (the kernels compute in fp32). An explicit
backend that cannot serve a call (no kernel for the op, not built, wrong device, float64 inputs) raises
NotImplementedError; there is no silent fallback that could change results.

Under torch.compile the choice is made when the function is traced: `backend=` and `use_backend` are guarded
(a different value retraces), RLHF_FAST_BACKEND is not (dynamo does not guard environment variables), so
set it before the first call or use the other two.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "torch", "triton", "native")

# Which backends implement which op. "torch" implements everything.
_TRITON_OPS = {"fused_linear_logprobs", "logprobs_from_logits", "gae", "kl_penalized_gae",
               "fused_linear_ppo_loss", "fused_linear_kl"}
_NATIVE_OPS = {"gae", "kl_penalized_gae"}
# auto on CUDA: preference order per op.
_CUDA_PREFERENCE = {
    "gae": ("native", "triton"),
    "kl_penalized_gae": ("native", "triton"),
}


class _Override(threading.local):
    # threading.local rather than a ContextVar: dynamo traces (and guards) attribute reads of a
    # threading.local, while ContextVar.get is a graph break (torch 2.13). An instance attribute set in
    # __init__ (run once per thread): dynamo does not notice changes to a class-level default.
    def __init__(self) -> None:
        self.backend: str | None = None


_override = _Override()


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str (one of {', '.join(BACKENDS)}), got {type(name).__name__}")
    key = name.strip().lower() or "auto"
    if key not in BACKENDS:
        raise ValueError(f"{what}={name!r} is not one of {', '.join(BACKENDS)}")
    return key


def use_backend(name: str) -> contextlib.AbstractContextManager[str]:
    """Run the ops of this thread on backend `name` inside a `with` block (or a decorated function).

    Overrides RLHF_FAST_BACKEND while active; an op's own `backend=` argument still wins. Blocks nest and
    the previous choice comes back on exit, also on an exception. The choice is per thread (other threads,
    e.g. data-loader workers, keep theirs; asyncio tasks on one thread share it). The name is checked here:
    ValueError for anything but auto | torch | triton | native. Yields the (lower-cased) name.

        with ops.use_backend("triton"):
            lp = ops.fused_linear_logprobs(hidden, weight, targets)
    """
    return _use_backend(_check_name(name, "backend"))


@contextlib.contextmanager
def _use_backend(name: str) -> Iterator[str]:
    prev = _override.backend
    _override.backend = name
    try:
        yield name
    finally:
        _override.backend = prev


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: `backend` if given, else use_backend's, else RLHF_FAST_BACKEND, else auto."""
    if backend is not None:
        return _check_name(backend, "backend")
    if _override.backend is not None:
        return _override.backend
    return _check_name(os.environ.get("RLHF_FAST_BACKEND", "auto"), "RLHF_FAST_BACKEND")


def request_source() -> str:
    """Where requested_backend() took its answer from (for `python -m rlhf_fast.env`)."""
    if _override.backend is not None:
        return "use_backend"
    return "RLHF_FAST_BACKEND" if os.environ.get("RLHF_FAST_BACKEND", "").strip() else "default"


def checks_enabled(checks: bool | None = None) -> bool:
    """Data-reading input checks (e.g. targets in range). Off with checks=False or RLHF_FAST_CHECKS=0."""
    if checks is not None:
        return bool(checks)
    return os.environ.get("RLHF_FAST_CHECKS", "1").strip() not in ("0", "false", "False", "no")


@functools.cache
def native_module():
    """rlhf_fast._C, or None when it was not built."""
    try:
        return importlib.import_module("rlhf_fast._C")
    except ImportError:
        return None


def native_has_cuda() -> bool:
    mod = native_module()
    return bool(mod is not None and getattr(mod, "with_cuda", lambda: False)())


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(device: torch.device) -> bool:
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


# assume_constant_result: under torch.compile this runs once at trace time and its answer is baked into the
# graph (dynamo cannot trace the cached imports it makes); it depends only on its arguments and on what is
# installed, built and set up (TRITON_INTERPRET) in this process, none of which changes between calls.
@torch.compiler.assume_constant_result
def _available(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """(True, "") if `backend` can run `op` on `device` tensors whose compute dtype is `dtype` (None: any
    the kernels take), else (False, why)."""
    if backend == "torch":
        return True, ""
    if backend == "triton":
        if op not in _TRITON_OPS:
            return False, f"no Triton kernel for {op}"
        if not triton_available():
            return False, "triton is not installed"
        if not triton_usable(device):
            return False, f"Triton on {device.type} tensors needs CUDA, or TRITON_INTERPRET=1 on the CPU"
    elif backend == "native":
        if op not in _NATIVE_OPS:
            return False, f"no native kernel for {op}"
        if native_module() is None:
            return False, "the extension rlhf_fast._C is not built"
        if device.type == "cuda" and not native_has_cuda():
            return False, "rlhf_fast._C was built without CUDA"
        if device.type not in ("cpu", "cuda"):
            return False, f"no native kernel for {device.type} tensors"
    else:
        raise AssertionError(backend)
    if dtype == torch.float64:
        return False, f'float64 inputs: the {backend} kernels compute in fp32; use backend="torch"'
    return True, ""


def select(op: str, device: torch.device, dtype: torch.dtype | None = None, backend: str | None = None) -> str:
    """The backend that runs `op` on `device` tensors of compute dtype `dtype`: `backend` if given, else
    use_backend's, else RLHF_FAST_BACKEND's, else auto's choice. Explicit and unable to serve: raises."""
    want = requested_backend(backend)
    if want != "auto":
        ok, why = _available(op, want, device, dtype)
        if not ok:
            raise NotImplementedError(f"{op}: backend {want!r} is not available ({why})")
        return want
    if device.type == "cuda":
        order = _CUDA_PREFERENCE.get(op, ("triton", "native"))
    else:
        order = ("native",)
    for name in order:
        if _available(op, name, device, dtype)[0]:
            return name
    return "torch"


def report() -> dict[str, dict[str, str]]:
    """{op: {backend: "yes" | reason it is not available}} for CPU and, when present, CUDA tensors
    (fp32/bf16/fp16 inputs; float64 always runs on torch)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    ops = sorted(_TRITON_OPS | _NATIVE_OPS)
    out: dict[str, dict[str, str]] = {}
    for dev in devices:
        for op in ops:
            row = {}
            for b in ("torch", "triton", "native"):
                ok, why = _available(op, b, dev)
                row[b] = "yes" if ok else why
            out[f"{op} [{dev.type}]"] = row
    return out
