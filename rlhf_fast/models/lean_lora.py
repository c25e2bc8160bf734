"""A leaner forward for PEFT's LoRA Linear layers, installed on every adapter layer of a RoleModel.

PEFT computes a LoRA layer as

    y = base(x);  y = y + lora_B(lora_A(dropout(x))) * scaling

which, besides the GEMMs of the base and of A, runs a GEMM for B and two full-size elementwise passes over y's
shape (the scaling and the add), each one again in the backward. `LeanLoraLinear` computes the same value as one
addmm whose alpha carries the scaling:

    y = addmm(x W^T + b, x A^T, B^T, alpha=scaling)     # x (N, in), A (r, in), B (out, r), W (out, in)

so the scaling and the add ride inside the last GEMM.

The adapter's GEMMs are skinny (r = 1-64 columns) and run far below the base GEMM's efficiency: on SmolLM2-135M
at r = 16 they add about 5% to the multiply-adds of a forward, and the reward forward (its adapter on) took 4.1 s
against a plain model's 3.4 s (bench/results/peers-ppo-cpu-2026-12-07-smollm2-critic-from-update.md). When a call
has many rows
(N >= MERGE_ROWS_PER_RANK x r) the layer merges the adapter into the weight for that call instead:

    no grad:    y = x (W + s B A)^T + b                                   # one GEMM over x; W + s B A: (out, in)
    with grad:  y = x (W + s B A)^T + b,  and x A^T kept for dB
                backward:  [dx | g B] = g [W + s B A | B]                 # one GEMM gives dx and the g B that dA needs
                           dA = s (g B)^T x,  dB = s g^T (x A^T)

The merged weight is built per call (out x in floats, freed when the call returns; the backward builds it again,
next to B, rather than holding a second copy of every weight), at out x in x r multiply-adds: 1/16 of the call's
GEMM at the threshold, where the two paths measured even in a one-off microbenchmark of one layer's seven
projections (CPU, SmolLM2 shapes, r = 16: 256 rows; not in bench/results). Decode steps
(a few rows) keep the addmm path. (The forward could take x A^T from the same GEMM, [W + s B A ; A], but y would
then be a strided view, which autograd forbids to modify in place.)

Every path computes PEFT's value up to rounding (the sums are associated differently; the tests hold values and
gradients to 1e-10 - 1e-12 in float64), so a run is not bit for bit the run PEFT's forward would give. Whole
backbones (bench/results/cpu-lean-lora-2026-12-07.md): the merge against the addmm path 1.17x forward and 1.04x
forward + backward on a tiny Llama, 1.00x and 1.01x on SmolLM2-135M (within that run's noise); in the SmolLM2 PPO
step the reward forward went from 4.1 to 3.7 s (peers-ppo-cpu-2026-12-07-smollm2-merged-lora.md).

The GEMMs over the call's rows (x against the merged weight, the backward's [dx | g B], and the base alone when
the adapters are off or merged by PEFT) go through ops.cpu_gemm: oneDNN's GEMM for large fp32 calls on the CPU,
torch's linear otherwise. The base layer's weight and bias are used directly (as on the adapter paths), so forward
hooks registered on the base nn.Linear itself do not run.

Only the plain case takes these paths: one active adapter, vanilla LoRA (no DoRA or other variant), no dropout
(none configured, or the module in eval mode), an nn.Linear base, no LoRA bias, input, base and adapter in one
dtype, no per-call adapter_names, and for a merged call with gradients a frozen base. Anything else goes through
PEFT's own forward unchanged; so does the base alone when the call has extra arguments or the base is not an
nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from rlhf_fast.ops import cpu_gemm


class LeanLoraLinear(PeftLoraLinear):
    """peft.tuners.lora.Linear with the plain single-adapter forward as one addmm, or with the adapter merged into
    the weight for calls with many rows (see the module doc)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        if not (args or kwargs) and self.disable_adapters != self.merged and type(base) is nn.Linear:
            # the base alone (adapters off: the reference pass; or merged into the weight by PEFT's merge_adapter),
            # as PEFT's forward computes it, with the GEMM through cpu_gemm
            y = cpu_gemm.linear(x.reshape(-1, x.shape[-1]), base.weight, base.bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return super().forward(x, *args, **kwargs)
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or type(base) is not nn.Linear or self.fan_in_fan_out:
            return super().forward(x)
        drop, lora_b = self.lora_dropout[name], self.lora_B[name]
        a, b = self.lora_A[name].weight, lora_b.weight
        if (not (isinstance(drop, nn.Identity) or (type(drop) is nn.Dropout and not drop.training))
                or lora_b.bias is not None or not (x.dtype == a.dtype == b.dtype == base.weight.dtype)):
            return super().forward(x)
        x2, s = x.reshape(-1, x.shape[-1]), self.scaling[name]  # (N, in)
        if x2.shape[0] < MERGE_ROWS_PER_RANK * a.shape[0]:
            y = torch.addmm(F.linear(x2, base.weight, base.bias), F.linear(x2, a), b.t(), alpha=s)
        elif not torch.is_grad_enabled() or not (x2.requires_grad or a.requires_grad or b.requires_grad):
            y = cpu_gemm.linear(x2, torch.addmm(base.weight, b, a, alpha=s), base.bias)
        elif base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return super().forward(x)  # a trainable base: PEFT's forward gives its gradient
        else:
            y = _MergedLora.apply(x2, base.weight, base.bias, a, b, s)
        return y.view(*x.shape[:-1], y.shape[-1])


# A call merges the adapter into its weight when it has at least this many rows per unit of rank (module doc).
MERGE_ROWS_PER_RANK = 16


class _MergedLora(torch.autograd.Function):
    """y = x (W + s B A)^T + bias with gradients for x, A and B (W and bias frozen); shapes in the module doc."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling):
        y = cpu_gemm.linear(x, torch.addmm(weight, b, a, alpha=scaling), bias)  # (N, out)
        ctx.save_for_backward(x, weight, a, b, F.linear(x, a) if ctx.needs_input_grad[4] else None)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, a, b, xa = ctx.saved_tensors
        s, (out, n_in), r = ctx.scaling, weight.shape, a.shape[0]
        need_x, _, _, need_a, need_b, _ = ctx.needs_input_grad
        dx = da = db = None
        if need_x:
            m = g.new_empty(out, n_in + r)  # [W + s B A | B]
            torch.addmm(weight, b, a, alpha=s, out=m[:, :n_in])
            m[:, n_in:] = b
            dxg = cpu_gemm.matmul(g, m)  # (N, in + r)
            dx, gb = dxg[:, :n_in], dxg[:, n_in:]
        else:
            gb = g @ b
        if need_a:
            da = (gb.t() @ x).mul_(s)
        if need_b:  # (xa^T g)^T: 1.1 vs 1.8 ms for g^T xa at SmolLM2's gate/up shape (one-off CPU timing)
            db = (xa.t() @ g).mul_(s).t()
        return dx, None, None, da, db, None


def install(module: nn.Module) -> int:
    """Switch every peft.tuners.lora.Linear inside `module` (exactly that class, not a subclass) to
    LeanLoraLinear, in place; returns how many. The layers keep their parameters, adapters and state."""
    n = 0
    for m in module.modules():
        if type(m) is PeftLoraLinear:
            m.__class__ = LeanLoraLinear
            n += 1
    return n
