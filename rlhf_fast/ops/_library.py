"""torch.library registration of the fused ops, so that torch.compile (fullgraph) sees through them.

Each op is registered next to its implementation, under the namespace "rlhf_fast":
    torch.ops.rlhf_fast.fused_linear_logprobs (+ _backward)    ops/logprobs.py
    torch.ops.rlhf_fast.fused_linear_logprobs_frozen           ops/logprobs.py (torch backend, frozen head)
    torch.ops.rlhf_fast.logprobs_from_logits (+ _backward)     ops/logprobs.py
    torch.ops.rlhf_fast.fused_linear_ppo_loss                  ops/fused_ppo.py (Triton backend)
    torch.ops.rlhf_fast.gae, torch.ops.rlhf_fast.kl_penalized_gae   ops/gae.py

Conventions, the same for every op:
- The public Python function stays the only door. It checks its inputs, resolves the backend
  (_dispatch.select) and flattens; then it calls the custom op with the backend's name as a str argument.
  Eager calls take the same path as compiled ones.
- A custom op takes tensors, numbers, str, bool and None only, and returns fresh tensors. It never returns
  None: an output that was not asked for (entropy without need_entropy, a gradient nobody needs) is an
  empty (0,) tensor, and the flag that decided it is an argument, so the fake implementation knows it too.
- The fake implementation (register_fake) gives the shapes and dtypes only: that is what torch.compile
  traces with. Dtypes follow _checks.compute_dtype (fp32; float64 for float64 inputs on the torch backend).
- Differentiable ops register autograd with torch.library.register_autograd; the backward calls a
  `<op>_backward` custom op, so the compiled backward sees through it as well.
"""

from __future__ import annotations

import torch

NAMESPACE = "rlhf_fast"
REGISTERED: list[str] = []  # qualified names, in registration order (for `python -m rlhf_fast.env`)


def custom_op(name: str):
    """Decorator: a functional (mutates nothing) custom op rlhf_fast::<name> for every device."""
    REGISTERED.append(f"{NAMESPACE}::{name}")
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())


def none_as_empty(x: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An output that was not asked for, as the empty (0,) tensor a custom op returns instead of None."""
    return like.new_empty(0) if x is None else x
