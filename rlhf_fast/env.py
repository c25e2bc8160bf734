"""`python -m rlhf_fast.env`: versions, devices and which backend can run which op here."""

from __future__ import annotations

import os
import platform


def format_report() -> str:
    import torch

    from rlhf_fast import __version__
    from rlhf_fast.ops import _dispatch, _library, cpu_gemm

    lines = [f"rlhf_fast {__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})")
    except ImportError:
        lines.append("triton: not installed")
    for pkg in ("transformers", "peft", "flash_attn"):
        try:
            mod = __import__(pkg)
            lines.append(f"{pkg} {getattr(mod, '__version__', '?')}")
        except ImportError:
            lines.append(f"{pkg}: not installed")
    if torch.cuda.is_available():
        lines.append(f"cuda: {torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda})")
    else:
        lines.append("cuda: no device")
    mod = _dispatch.native_module()
    lines.append("rlhf_fast._C: " + ("built" + (" with CUDA" if _dispatch.native_has_cuda() else " (CPU only)")
                                      if mod is not None else "not built"))
    lines.append(f"backend: {_dispatch.requested_backend()} (from {_dispatch.request_source()}; "
                 "an op's backend= > use_backend() > RLHF_FAST_BACKEND > auto)")
    lines.append("float64 inputs: torch only (the triton and native kernels compute in fp32)")
    lines.append(f"CPU GEMMs (ops.cpu_gemm): {cpu_gemm.backend()} (fp32 calls of >= {cpu_gemm.MIN_ROWS} rows and "
                 f">= 2^{cpu_gemm.MIN_MACS.bit_length() - 1} multiply-adds; RLHF_FAST_CPU_GEMM=onednn|torch)")
    names = [n.split("::")[1] for n in _library.REGISTERED if not n.endswith("_backward")]
    lines.append(f"torch.compile: custom ops {_library.NAMESPACE}::{{{', '.join(names)}}} (+ _backward)")
    lines.append("")
    lines.append(f"{'op':36s} {'torch':6s} {'triton':28s} native")
    for op, row in _dispatch.report().items():
        lines.append(f"{op:36s} {row['torch']:6s} {row['triton'][:28]:28s} {row['native']}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_report())
