"""Backend choice for every op: torch | triton | native, read from RLHF_FAST_BACKEND at each call.

auto (default): CUDA tensors go to the fastest kernel we have for the op, CPU tensors to native C++ where
it exists, else torch. An explicit backend without a kernel for the op raises NotImplementedError; there is
no silent fallback that could change results.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "torch", "triton", "native")

# Which backends implement which op. "torch" implements everything.
_TRITON_OPS = {"fused_linear_logprobs", "logprobs_from_logits", "gae", "kl_penalized_gae",
               "fused_linear_ppo_loss"}
_NATIVE_OPS = {"gae", "kl_penalized_gae"}
# auto on CUDA: preference order per op.
_CUDA_PREFERENCE = {
    "gae": ("native", "triton"),
    "kl_penalized_gae": ("native", "triton"),
}


def requested_backend() -> str:
    name = os.environ.get("RLHF_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"RLHF_FAST_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


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


def _available(op: str, backend: str, device: torch.device) -> tuple[bool, str]:
    if backend == "torch":
        return True, ""
    if backend == "triton":
        if op not in _TRITON_OPS:
            return False, f"no Triton kernel for {op}"
        if not triton_available():
            return False, "triton is not installed"
        if not triton_usable(device):
            return False, f"Triton on {device.type} tensors needs CUDA, or TRITON_INTERPRET=1 on the CPU"
        return True, ""
    if backend == "native":
        if op not in _NATIVE_OPS:
            return False, f"no native kernel for {op}"
        if native_module() is None:
            return False, "the extension rlhf_fast._C is not built"
        if device.type == "cuda" and not native_has_cuda():
            return False, "rlhf_fast._C was built without CUDA"
        if device.type not in ("cpu", "cuda"):
            return False, f"no native kernel for {device.type} tensors"
        return True, ""
    raise AssertionError(backend)


def select(op: str, device: torch.device) -> str:
    """The backend that runs `op` on tensors of `device` under the current RLHF_FAST_BACKEND."""
    want = requested_backend()
    if want != "auto":
        ok, why = _available(op, want, device)
        if not ok:
            raise NotImplementedError(f"{op}: backend {want!r} is not available ({why})")
        return want
    if device.type == "cuda":
        order = _CUDA_PREFERENCE.get(op, ("triton", "native"))
    else:
        order = ("native",)
    for name in order:
        if _available(op, name, device)[0]:
            return name
    return "torch"


def report() -> dict[str, dict[str, str]]:
    """{op: {backend: "yes" | reason it is not available}} for CPU and, when present, CUDA tensors."""
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
