"""The shared-prefix pass's last layer, at the one column whose output anyone reads.

RoleModel's shared-prefix forward (RoleModel.policy_forward) runs each distinct prompt once and keeps its keys and
values for the rows that continue it. When the caller scores only the columns from the prefix's end on (DPO's
sequence log-probs, `logprobs(start=...)`), the prefix's final hidden states are read at its last column only:
that one predicts the first token after it. The last decoder layer still has to give every prefix column its key
and value (the continuation attends to them), but its query, attention output, o_proj and MLP are needed at the
last column alone. `last_layer_at_last_column` does that for the duration of one backbone call:

    keys, values of columns 0 .. p-2:   input_layernorm -> k_proj, v_proj -> rotary -> cache.update
    column p-1:                         the layer's own forward, on that column, over the p keys

so the arithmetic of the column that matters is the model's own (the cache appends its key and value after the
others', as a decode step would), and the others' outputs come back as zeros: "not computed". At a prompt of P
columns that skips (P - 1) of the last layer's q_proj, attention, o_proj and MLP tokens, the larger part of a layer.

Only LLAMA_FAMILY classes (decode_step.full_attention_llama) with full attention, no q/k norms and no hooks on the last block take
it; `supported` says whether a model does.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from rlhf_fast.models.decode_step import _rotate_half, full_attention_llama


def _last_block(lm: nn.Module) -> nn.Module | None:
    blocks = getattr(getattr(lm, "model", None), "layers", None)
    return blocks[-1] if blocks else None


def supported(lm: nn.Module) -> bool:
    """Whether `lm` (the causal LM, adapters live inside it) has a last block this pass knows how to split."""
    if not full_attention_llama(lm):
        return False
    block = _last_block(lm)
    if block is None or block._forward_pre_hooks or block._forward_hooks:
        return False
    a = getattr(block, "self_attn", None)
    if a is None or any(not hasattr(a, n) for n in ("k_proj", "v_proj", "head_dim", "layer_idx")):
        return False
    return not any(hasattr(a, n) for n in ("q_norm", "k_norm"))


@contextlib.contextmanager
def last_layer_at_last_column(lm: nn.Module):
    """While active, a backbone call with a cache runs its last decoder layer in full at the last column only
    (see the module doc); the layer's outputs at the other columns are zeros. The caller checks `supported`."""
    block = _last_block(lm)
    own = block.forward

    def forward(hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        p = hidden_states.shape[1]
        mask = kwargs.get("attention_mask")
        if args or cache is None or p < 2 or not (mask is None or (torch.is_tensor(mask) and mask.dim() == 4)):
            return own(hidden_states, *args, **kwargs)
        a = block.self_attn
        cos, sin = kwargs["position_embeddings"]  # (B, p, D) each
        x = block.input_layernorm(hidden_states[:, :-1])  # (B, p - 1, H)
        shape = (*x.shape[:2], -1, a.head_dim)
        k = a.k_proj(x).view(shape).transpose(1, 2)  # (B, kv heads, p - 1, D)
        v = a.v_proj(x).view(shape).transpose(1, 2)
        c, s = cos[:, :-1, None].transpose(1, 2), sin[:, :-1, None].transpose(1, 2)  # (B, 1, p - 1, D)
        cache.update(k * c + _rotate_half(k) * s, v, a.layer_idx)
        last = dict(kwargs, position_embeddings=(cos[:, -1:], sin[:, -1:]))
        if mask is not None:
            last["attention_mask"] = mask[:, :, -1:]  # the last query's row: (B, 1, 1, p)
        for name in ("position_ids", "cache_position"):  # (B, p) / (p,): the last column's
            if torch.is_tensor(kwargs.get(name)):
                last[name] = kwargs[name][..., -1:]
        out = own(hidden_states[:, -1:], **last)
        h = out[0] if isinstance(out, tuple) else out  # (B, 1, H)
        full = torch.cat([h.new_zeros(h.shape[0], p - 1, h.shape[2]), h], 1)
        return (full, *out[1:]) if isinstance(out, tuple) else full

    patched_before = "forward" in vars(block)
    block.forward = forward
    try:
        yield
    finally:
        if patched_before:
            block.forward = own
        else:
            del block.forward  # the class's forward again
