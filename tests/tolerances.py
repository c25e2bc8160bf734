"""The one tolerance table, by dtype of the inputs. Loosen only with a written reason."""

import torch

# (rtol, atol) for comparisons against the float64 reference.
TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-5),
    # bf16/fp16 inputs are upcast and computed in fp32; the reference sees the same rounded inputs,
    # so only fp32 accumulation error remains. Gradients come back in the input dtype (one rounding).
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or actual.dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=msg or None)
