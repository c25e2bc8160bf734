"""Integrations with peer libraries. Each submodule imports its peer lazily, so importing this package
costs nothing when the peer is not installed.

- `rlhf_fast.integrations.trl`: `patch_trl()` makes TRL's trainers (GRPOTrainer, DPOTrainer, ...) score
  tokens with `rlhf_fast.ops.fused_linear_logprobs`.
"""
