"""Sampling from the policy role of a RoleModel: a KV-cached loop, with the policy LoRA merged into the base
for the rollout and the base restored bit for bit afterwards.

RoleModel.generate is the public door (it calls generate() here); merged() is also used by anything that must
run the policy at base speed for a while.
"""

from __future__ import annotations

import contextlib

import torch
from peft.tuners.lora import LoraLayer

from rlhf_fast.models.conventions import check_inputs, position_ids


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, merge: bool = True) -> dict[str, torch.Tensor]:
    """Sample responses from the policy with a KV cache.

    Args:
        prompt_ids: (B, P) int64 prompts, left-padded (right padding also works: positions follow the mask).
        prompt_mask: (B, P) 0/1, 1 on prompt tokens; every row needs at least one.
        max_new_tokens: response length limit R.
        temperature: logits / temperature before sampling; 0 means greedy.
        top_p: nucleus sampling, keep the smallest set of tokens with probability >= top_p (1 = off).
        top_k: keep the k most likely tokens (0 = off).
        eos_token_id: stop token(s) of a row; default the model's EOS.
        pad_token_id: fills each row after its EOS; default the model's pad (or EOS).
        generator: a torch.Generator for reproducible sampling.
        merge: fold the policy LoRA into the base weights for the rollout and restore them bit for bit
            after (default), instead of running the adapter live: 1.1-1.2x the new tokens/s on the CPU
            (bench/results/cpu-role-model-2026-11-22.md). With a 16-bit base the merged weights are rounded
            to that dtype, so sampling differs from the live policy by that rounding; merge=False samples
            from exactly the policy that logprobs() scores.
    Returns:
        {"sequences": (B, P + R'), "attention_mask": (B, P + R'), "response_mask": (B, P + R')} with R' <= R
        (generation stops early when every row has finished); response_mask is 1 on generated tokens up to
        and including the first EOS, attention_mask = prompt_mask followed by the response mask.
    """
    check_inputs(prompt_ids, prompt_mask)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if not bool(prompt_mask.bool().any(1).all()):
        raise ValueError("every prompt needs at least one real token (a row of prompt_mask is all zeros)")
    eos = model.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = model.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    device = prompt_ids.device
    b = prompt_ids.shape[0]
    eos_t = torch.tensor(eos_ids, device=device, dtype=torch.long)
    mask = prompt_mask.long()
    pos = position_ids(mask)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    tokens, alive = [], []
    with model._eval(), model.role("policy"), merged(model, "policy", merge):
        out = model.lm(input_ids=prompt_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                      logits_to_keep=1)
        next_pos = mask.sum(1, keepdim=True)  # (B, 1) position of the first response token
        for step in range(max_new_tokens):
            tok = sample(out.logits[:, -1].float(), temperature, top_p, top_k, generator)  # (B,)
            tok = tok.masked_fill(finished, pad)
            alive.append(~finished)
            tokens.append(tok)
            if eos_ids:
                finished = finished | torch.isin(tok, eos_t)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, alive[-1].long()[:, None]], dim=1)  # the token fed now is real iff alive
            out = model.lm(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                          past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
            next_pos = next_pos + 1
    response = torch.stack(tokens, 1)  # (B, R')
    resp_mask = torch.stack(alive, 1).long()
    zeros = torch.zeros_like(prompt_mask, dtype=torch.long)
    return {"sequences": torch.cat([prompt_ids, response], 1),
            "attention_mask": torch.cat([prompt_mask.long(), resp_mask], 1),
            "response_mask": torch.cat([zeros, resp_mask], 1)}

@contextlib.contextmanager
def merged(model, adapter: str, merge: bool):
    """Fold `adapter` into the base for the duration (the LM then runs with adapters off), restoring the
    base bit for bit after.

    W - D after W + D is not W in floating point (about 0.4-11% of elements differ by an ulp, growing with
    |D| / |W|; see bench/results). So, one layer at a time, the elements that would not restore are
    recorded (flat index, original value) and written back after the subtraction: exact, and the stash is
    proportional to those elements only, not a copy of the base.
    """
    if not merge:
        yield
        return

    stash = []
    try:
        with torch.no_grad():
            for module in model.peft.modules():
                if isinstance(module, LoraLayer) and adapter in module.lora_A:
                    # .data: no version bump, so a graph that saved W stays usable (W is restored exactly)
                    w = module.get_base_layer().weight.data
                    d = module.get_delta_weight(adapter).to(w.dtype)
                    merged = w + d
                    wrong = ((merged - d) != w).view(-1).nonzero().squeeze(-1)  # (K,) flat indices
                    stash.append((module, d, wrong, w.view(-1)[wrong].clone()))
                    w.copy_(merged)
                    del merged
        with model.peft.disable_adapter():
            yield
    finally:
        model.refresh_trainable()
        with torch.no_grad():
            for module, d, wrong, original in stash:
                w = module.get_base_layer().weight.data
                w.sub_(d)
                w.view(-1)[wrong] = original


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
            generator: torch.Generator | None) -> torch.Tensor:
    # logits (B, V) fp32 -> (B,) int64 token ids.
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
