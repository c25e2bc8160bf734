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
    logprobs: torch.Tensor | None = None  # (B*n, T) fp32: the rollout engine's log-prob of each sampled token
    #                                       (vLLM's), 0 elsewhere; None for the native loop
    policy_logprobs: torch.Tensor | None = None  # (B*n, T) fp32: the native loop's log-prob of each sampled token
    #                                              under the policy at the temperature (sample(policy_logprobs=True))

    @property
    def mask(self) -> torch.Tensor:
        """The response mask as fp32, the form the loss ops take."""
        return self.response_mask.float()


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig, *,
           eos_token_id: int | None, generator: torch.Generator | None = None, engine=None,
           policy_logprobs: bool = False) -> Rollout:
    """Sample `sampling.n` responses to each of the B left-padded prompts (prompt_ids, prompt_mask: (B, P))
    from the policy adapter of `model` (a RoleModel), in one batched generate call (each prompt prefilled once,
    its KV cache shared by its n samples).

    engine: an rl.vllm_engine.VLLMEngine serving `model` (--rollout vllm): it samples instead of the native
    loop, after pushing the policy adapter if it changed, and the rollout carries vLLM's log-probs.
    policy_logprobs: the native loop also returns each sampled token's log-prob from the logits it sampled from
    (RoleModel.generate's return_logprobs) in Rollout.policy_logprobs; ignored with an engine."""
    if engine is not None:
        if engine.model is not model:
            raise ValueError("the vLLM engine serves another model than the one given")
        g = engine.sample(prompt_ids, prompt_mask, sampling, eos_token_id=eos_token_id, generator=generator)
    else:
        g = model.generate(prompt_ids, prompt_mask, max_new_tokens=sampling.max_new_tokens,
                           temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                           eos_token_id=eos_token_id, generator=generator, num_samples=sampling.n,
                           return_logprobs=policy_logprobs)
    seq, resp = g["sequences"], g["response_mask"]
    if eos_token_id is None:
        has_eos = torch.ones(seq.shape[0], dtype=torch.bool, device=seq.device)
    else:
        has_eos = ((seq == eos_token_id) & (resp != 0)).any(1)
    lp = g.get("logprobs")
    return Rollout(seq, g["attention_mask"], resp, has_eos, sampling.n, lp if engine is not None else None,
                   None if engine is not None else lp)


def first_response_column(response_mask: torch.Tensor) -> int:
    """The first column of a (B, T) response mask that holds a response token in any row (0 when none does): the
    columns before it are prompt or padding in every row, and a loss over the responses can skip them (one host
    synchronisation)."""
    cols = response_mask.any(0).nonzero()
    return int(cols[0]) if cols.numel() else 0


def importance_correction(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, *,
                          mode: str = "tis", cap: float = 2.0) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Correct for a rollout engine whose numerics differ from the trainer's (vLLM vs the fused log-probs).

    Args:
        logprobs: (B, T) the trainer's log-probs of the sampled tokens (the PPO ratio's old log-probs).
        rollout_logprobs: (B, T) the engine's log-probs of the same tokens.
        mask: (B, T) 1 on response tokens.
        mode: "tis" (truncated importance sampling, Yao et al. 2025: weight each token's policy-gradient term by
            w = min(exp(logprobs - rollout_logprobs), cap)) or "none" (only the statistics).
        cap: the truncation C of the weights (> 0).
    Returns:
        (weights (B, T) fp32 detached, 0 off the mask, or None for "none"; statistics: rollout/logprob_diff_mean
        and rollout/logprob_diff_max of |logprobs - rollout_logprobs| over the response tokens, and for "tis"
        rollout/is_weight_mean and rollout/is_clipped_frac). Multiplying the advantages by w is the same as
        weighting the clipped surrogate, since w >= 0.
    """
    if mode not in ("tis", "none"):
        raise ValueError(f"rollout importance-sampling correction must be 'tis' or 'none', got {mode!r}")
    if not cap > 0:
        raise ValueError(f"the importance-sampling cap must be > 0, got {cap}")
    if logprobs.shape != rollout_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, rollout_logprobs {tuple(rollout_logprobs.shape)} and "
                         f"mask {tuple(mask.shape)} must have one shape")
    m = mask.float()
    diff = (logprobs.float() - rollout_logprobs.float()).detach() * m
    count = m.sum().clamp(min=1)
    stats = {"rollout/logprob_diff_mean": float(diff.abs().sum() / count),
             "rollout/logprob_diff_max": float(diff.abs().max()) if diff.numel() else 0.0}
    if mode == "none":
        return None, stats
    raw = diff.exp()
    w = raw.clamp(max=cap) * m
    stats["rollout/is_weight_mean"] = float(w.sum() / count)
    stats["rollout/is_clipped_frac"] = float(((raw > cap) & (m > 0)).sum() / count)
    return w, stats


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
