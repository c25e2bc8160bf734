"""Rollouts: prompts -> n samples per prompt from the policy -> sequences, masks and scores.

Everything an on-policy algorithm (PPO, GRPO, RLOO, online DPO, Best-of-N) needs before its own maths. It
takes plain arguments and its own SamplingConfig, never a trainer's config (rl/ never imports trainers/).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""reward_fn(sequences (B, T), attention_mask (B, T), response_mask (B, T)) -> scores (B,)."""


@dataclass
class SamplingConfig:
    """How the policy samples (the same options as RoleModel.generate, plus n per prompt)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1  # samples per prompt; row i of a rollout comes from prompt i // n

    def __post_init__(self):
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1) or self.top_k < 0:
            raise ValueError(f"need 0 < top_p <= 1 and top_k >= 0, got {self.top_p}, {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {self.n}")


@dataclass
class Rollout:
    """One batch of samples. Every tensor has B * n rows; row i belongs to prompt i // n."""

    sequences: torch.Tensor       # (B*n, T) prompt + response tokens
    attention_mask: torch.Tensor  # (B*n, T) 1 on real tokens
    response_mask: torch.Tensor   # (B*n, T) 1 on generated tokens up to and including the first EOS
    has_eos: torch.Tensor         # (B*n,) bool: the response ended with EOS (all True when no EOS is defined)
    n: int

    @property
    def mask(self) -> torch.Tensor:
        """The response mask as fp32, the form the loss ops take."""
        return self.response_mask.float()


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig, *,
           eos_token_id: int | None, generator: torch.Generator | None = None) -> Rollout:
    """Sample `sampling.n` responses to each of the B left-padded prompts (prompt_ids, prompt_mask: (B, P))
    from the policy adapter of `model` (a RoleModel), in one batched generate call (each prompt prefilled once,
    its KV cache shared by its n samples)."""
    g = model.generate(prompt_ids, prompt_mask, max_new_tokens=sampling.max_new_tokens,
                       temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                       eos_token_id=eos_token_id, generator=generator, num_samples=sampling.n)
    seq, resp = g["sequences"], g["response_mask"]
    if eos_token_id is None:
        has_eos = torch.ones(seq.shape[0], dtype=torch.bool, device=seq.device)
    else:
        has_eos = ((seq == eos_token_id) & (resp != 0)).any(1)
    return Rollout(seq, g["attention_mask"], resp, has_eos, sampling.n)


def score(model, rollout: Rollout, reward_fn: RewardFn | None = None) -> torch.Tensor:
    """(B*n,) fp32 scores: reward_fn's when given, else the model's reward adapter and score head."""
    if reward_fn is not None:
        out = reward_fn(rollout.sequences, rollout.attention_mask, rollout.response_mask)
        if not isinstance(out, torch.Tensor) or out.shape != rollout.has_eos.shape:
            raise ValueError(f"reward_fn must return a ({rollout.has_eos.shape[0]},) tensor, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        return out.float()
    with torch.no_grad():
        return model.scores(rollout.sequences, rollout.attention_mask).float()
