"""Sampling from the policy role of a RoleModel: a KV-cached loop, with the policy LoRA merged into the base
for the rollout and the base restored bit for bit afterwards.

RoleModel.generate is the public door (it calls generate() here); merged() is also used by anything that must
run the policy at base speed for a while.
"""

from __future__ import annotations

import contextlib
import inspect
import types

import torch
from peft.tuners.lora import LoraLayer
from transformers.cache_utils import DynamicLayer

from rlhf_fast.models import decode_step
from rlhf_fast.models.conventions import check_inputs, position_ids


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, merge: bool = True,
             num_samples: int = 1, return_logprobs: bool = False) -> dict[str, torch.Tensor]:
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
        num_samples: n responses per prompt. Each prompt is prefilled once and its KV cache repeated for its n
            samples; row i of the output answers prompt i // n.
        return_logprobs: also return "logprobs", each generated token's log-probability under the policy at
            this temperature over the whole vocabulary, log softmax(logits / temperature)[token] (top_p and
            top_k do not change it; temperature 0 scores at 1), from the logits the loop samples from: what
            RoleModel.logprobs(sequences, attention_mask, temperature=temperature) gives on those tokens, up to
            float rounding (the KV-cached decode and, with merge, the merged weights round differently).
    Returns:
        {"sequences": (B*n, P + R'), "attention_mask": (B*n, P + R'), "response_mask": (B*n, P + R')} with
        R' <= R (generation stops early when every row has finished); response_mask is 1 on generated tokens up
        to and including the first EOS, attention_mask = prompt_mask followed by the response mask. With
        return_logprobs, "logprobs": (B*n, P + R') fp32, 0 outside response_mask.

    Rows that have finished leave the decode batch (their KV cache rows are dropped), so a batch of short answers
    does not pay for its longest. With a base sharded over processes (model.lockstep set, FSDP2) every process
    decodes until no process has a row left (a process whose rows are all done keeps feeding one finished row,
    whose tokens are discarded), because each forward gathers the sharded weights from all of them; and the policy
    LoRA runs live (merge is off: the sharded weights cannot take the merge). Tokens are drawn by inverse CDF (one
    uniform per row against the float64 cumulative probabilities), which picks token v with probability p_v, as
    torch.multinomial does (cheaper than it in a CPU profile).
    """
    check_inputs(prompt_ids, prompt_mask)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if not bool(prompt_mask.bool().any(1).all()):
        raise ValueError("every prompt needs at least one real token (a row of prompt_mask is all zeros)")
    eos = model.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = model.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    device = prompt_ids.device
    n = num_samples
    b = prompt_ids.shape[0] * n
    eos_t = torch.tensor(eos_ids, device=device, dtype=torch.long)
    prompt_mask = prompt_mask.long()
    tokens = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=device)  # (B*n, R)
    alive = torch.zeros(b, max_new_tokens, dtype=torch.long, device=device)
    logps = torch.zeros(b, max_new_tokens, dtype=torch.float32, device=device) if return_logprobs else None
    rows = torch.arange(b, device=device)  # the output rows still decoding
    length = 0
    lockstep = getattr(model, "lockstep", None)
    merge = merge and lockstep is None
    ghost = False  # lockstep: this process's rows are all done; it decodes a finished row for the others' sake
    with model._eval(), model.role("policy"), merged(model, "policy", merge) as lm:
        out = lm(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids(prompt_mask),
                 use_cache=True, logits_to_keep=1)
        cache, logits = _cache_of(out), out.logits[:, -1]  # (B, V)
        cache_arg = cache_kwarg(lm)
        mask = prompt_mask
        if n > 1:
            logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        kv = KVBuffers.wrap(cache, max_new_tokens, repeats=n)
        if kv is None and n > 1:  # a cache this loop does not know: transformers' own methods (same values)
            cache.batch_repeat_interleave(n)
        # Llama-family models decode through decode_step (the same logits without transformers' per-step
        # machinery); not with a sharded base, whose blocks gather their weights in forward hooks
        step_fn = decode_step.DecodeStep.wrap(lm, kv) if lockstep is None else None
        next_pos = mask.sum(1, keepdim=True)  # (B*n, 1) position of the first response token
        for step in range(max_new_tokens):
            tok = sample(logits.float(), temperature, top_p, top_k, generator)  # (rows,)
            if not ghost:
                tokens[rows, step] = tok
                alive[rows, step] = 1
                length = step + 1
                if logps is not None:
                    scaled = logits.float() / temperature if temperature > 0 else logits.float()
                    logps[rows, step] = scaled.log_softmax(-1).gather(1, tok[:, None]).squeeze(1)
            going = ~torch.isin(tok, eos_t) if eos_ids else torch.ones_like(tok, dtype=torch.bool)
            if ghost:
                going = torch.zeros_like(going)
            n_going = int(going.sum())  # the loop's one host synchronisation per token
            n_any = n_going if lockstep is None else lockstep(n_going)  # FSDP2: the most on any process
            if step == max_new_tokens - 1 or n_any == 0:
                break
            n_keep = n_going
            if n_going == 0:  # lockstep: keep one finished row decoding, its tokens never written
                ghost, going, n_keep = True, torch.zeros_like(going), 1
                going[0] = True
            if n_keep < going.numel():  # finished rows leave the batch
                keep = going.nonzero().squeeze(-1)
                kv.select(keep) if kv is not None else cache.batch_select_indices(keep)
                rows, tok, mask, next_pos = rows[keep], tok[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if step_fn is not None:
                logits = step_fn(tok, next_pos, mask)
            else:
                out = lm(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, **{cache_arg: cache},
                         use_cache=True, logits_to_keep=1)
                cache, logits = _cache_of(out), out.logits[:, -1]
            next_pos = next_pos + 1
    if n > 1:
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
    resp_mask = alive[:, :length]
    zeros = torch.zeros_like(prompt_mask)
    out = {"sequences": torch.cat([prompt_ids, tokens[:, :length]], 1),
           "attention_mask": torch.cat([prompt_mask, resp_mask], 1),
           "response_mask": torch.cat([zeros, resp_mask], 1)}
    if logps is not None:
        out["logprobs"] = torch.cat([zeros.float(), logps[:, :length] * resp_mask], 1)
    return out


class KVBuffers:
    """Preallocated keys and values for the decode loop: transformers' DynamicLayer grows its cache with torch.cat
    at every token, copying the whole cache each time (O(T^2) bytes per rollout; a quarter of a 48-token rollout's
    CPU time in a profile of the tiny bench model). Here each layer's keys and values live in a buffer with room
    for every new token, the layer's `update` writes in place and hands attention views of the filled part.

    Only plain DynamicLayers (full attention) are taken over; `wrap` returns None for anything else (sliding
    windows, other cache classes), which then run as transformers wrote them.
    """

    def __init__(self, layers: list, extra: int, repeats: int):
        self.layers = layers
        for layer in layers:
            k, v = layer.keys, layer.values  # (B, H, L, D)
            if repeats > 1:
                k, v = k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0)
            b, h, length, d = k.shape
            layer._rf_buf = (k.new_empty(b, h, length + extra, d), v.new_empty(b, h, length + extra, v.shape[-1]))
            layer._rf_buf[0][:, :, :length] = k
            layer._rf_buf[1][:, :, :length] = v
            layer._rf_len = length
            layer.keys, layer.values = layer._rf_buf[0][:, :, :length], layer._rf_buf[1][:, :, :length]
            layer.update = types.MethodType(_update_in_place, layer)

    @classmethod
    def wrap(cls, cache, extra: int, repeats: int = 1) -> KVBuffers | None:
        layers = plain_layers(cache)
        return None if layers is None else cls(layers, extra, repeats)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (batch indices) of every layer."""
        for layer in self.layers:
            layer._rf_buf = (layer._rf_buf[0][rows], layer._rf_buf[1][rows])
            n = layer._rf_len
            layer.keys, layer.values = layer._rf_buf[0][:, :, :n], layer._rf_buf[1][:, :, :n]


def _update_in_place(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
    # DynamicLayer.update with the buffers of KVBuffers: write the new positions, return views of the filled part
    kb, vb = self._rf_buf
    start, end = self._rf_len, self._rf_len + key_states.shape[-2]
    kb[:, :, start:end] = key_states
    vb[:, :, start:end] = value_states
    self._rf_len = end
    self.keys, self.values = kb[:, :, :end], vb[:, :, :end]
    return self.keys, self.values


def plain_layers(cache) -> list | None:
    """The layers of a cache whose every layer is a filled plain DynamicLayer (full attention, keys (B, H, L, D)),
    else None: the caches KVBuffers and RoleModel's shared-prefix pass know how to extend."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or layer.keys is None or layer.keys.dim() != 4
                         for layer in layers):
        return None
    return list(layers)


def cache_kwarg(module) -> str:
    # transformers >= 5.2x names the forward's cache argument `cache`; older releases `past_key_values`
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _cache_of(out):
    # transformers >= 5.2x names the returned cache `cache`; older releases `past_key_values`
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@contextlib.contextmanager
def merged(model, adapter: str, merge: bool):
    """Fold `adapter` into the base for the duration and yield the causal LM to call: with merge, the plain
    transformers model (every LoRA wrapper swapped for its base layer, so a forward pays no adapter bookkeeping:
    about 13% of a decode step on the CPU, bench/results/peers-grpo-cpu-2026-12-01.md); without, model.lm with
    the adapter live. The base is restored bit for bit after, and the wrappers put back.

    W - D after W + D is not W in floating point (about 0.4-11% of elements differ by an ulp, growing with
    |D| / |W|; see bench/results). So, one layer at a time, the elements that would not restore are
    recorded (flat index, original value) and written back after the subtraction: exact, and the stash is
    proportional to those elements only, not a copy of the base.
    """
    if not merge:
        yield model.lm
        return

    stash, swapped = [], []
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
        for parent in list(model.lm.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    swapped.append((parent, name, child))
                    setattr(parent, name, child.get_base_layer())
        yield model.lm
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
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
    # Inverse CDF, one uniform per row: the first token whose float64 cumulative probability exceeds u * total, so
    # token v is drawn with probability p_v (to float64 rounding; a p = 0 token has an empty interval). About 5x
    # cheaper per decode step on the CPU than a race over V random numbers (argmax(p / E), E ~ Exp(1)) and 15x
    # than torch.multinomial. u * total is kept strictly below total, whose first index is the last p > 0 token.
    cdf = probs.double().cumsum_(-1)  # (B, V)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=torch.float64) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)
