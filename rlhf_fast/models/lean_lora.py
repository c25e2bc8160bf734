"""A leaner forward for PEFT's LoRA Linear layers, installed on every adapter layer of a RoleModel.

PEFT computes a LoRA layer as

    y = base(x);  y = y + lora_B(lora_A(dropout(x))) * scaling

which, besides the GEMMs of the base and of A, runs a GEMM for B and two full-size elementwise passes over y's
shape (the scaling and the add), each one again in the backward. `LeanLoraLinear` computes the same value as one
addmm whose alpha carries the scaling:

    y = addmm(x W^T + b, x A^T, B^T, alpha=scaling)     # x (N, in), A (r, in), B (out, r), W (out, in)

so the scaling and the add ride inside the last GEMM. The value is PEFT's up to rounding (the sum is associated
differently; the tests hold it to 1e-12 in float64), so a run is not bit for bit the run PEFT's forward would
give. Forward + backward of whole backbones: bench/results/cpu-lean-lora-2026-12-06.md.

Only the plain case takes this path: one active adapter, vanilla LoRA (no DoRA or other variant), no dropout
(none configured, or the module in eval mode), an nn.Linear base, no LoRA bias, input, base and adapter in one
dtype, no per-call adapter_names. Anything else, and the adapters-off reference pass (just the base layer), goes
through PEFT's own forward unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn


class LeanLoraLinear(PeftLoraLinear):
    """peft.tuners.lora.Linear with the plain single-adapter forward fused as one addmm (see the module doc)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return super().forward(x, *args, **kwargs)
        name, base = self.active_adapters[0], self.base_layer
        if name not in self.lora_A or name in self.lora_variant or type(base) is not nn.Linear or self.fan_in_fan_out:
            return super().forward(x)
        drop, lora_b = self.lora_dropout[name], self.lora_B[name]
        a, b = self.lora_A[name].weight, lora_b.weight
        if (not (isinstance(drop, nn.Identity) or (type(drop) is nn.Dropout and not drop.training))
                or lora_b.bias is not None or not (x.dtype == a.dtype == b.dtype == base.weight.dtype)):
            return super().forward(x)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y = torch.addmm(F.linear(x2, base.weight, base.bias), F.linear(x2, a), b.t(), alpha=self.scaling[name])
        return y.view(*x.shape[:-1], y.shape[-1])


def install(module: nn.Module) -> int:
    """Switch every peft.tuners.lora.Linear inside `module` (exactly that class, not a subclass) to
    LeanLoraLinear, in place; returns how many. The layers keep their parameters, adapters and state."""
    n = 0
    for m in module.modules():
        if type(m) is PeftLoraLinear:
            m.__class__ = LeanLoraLinear
            n += 1
    return n
