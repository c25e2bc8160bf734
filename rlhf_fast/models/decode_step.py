"""One decode step of a Llama-family causal LM written out, for generation's KV-cached loop.

A token's forward through transformers' model class pays, at every layer and every step, for machinery a decode
step does not need: the causal-mask builder, the Cache object's bookkeeping, the attention-interface dispatch and
the output-capture plumbing. On the CPU at the bench's tiny model that is about a sixth of the rollout. Here the
step calls the model's own modules (embedding, rotary embedding, RMSNorms, MLPs, projections, lm head) and writes
only attention out: q, k, v projections, rotary positions, the new key and value into generation.KVBuffers' buffers,
then softmax(q k^T * scaling + padding bias) v over the filled part, grouped-query heads without repeating k and v.
The arithmetic is transformers' attention's (a 16-bit model's softmax in float32), so the logits equal the model's
forward up to float rounding (tests/models/test_decode_step.py, float64).

Only the classes whose layers are exactly that (LLAMA_FAMILY) with full attention everywhere take this path;
anything else (GPT-2, sliding windows, Qwen3's q/k norms) decodes through transformers as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class DecodeStep:
    """step(tokens (n,), positions (n, 1), mask (n, L + 1)) -> logits (n, V) of the next token, appending each
    layer's new key and value at column L of its KVBuffers buffer (L = the keys already held)."""

    def __init__(self, lm: nn.Module, layers: list):
        self.lm, self.model, self.kv_layers = lm, lm.model, layers
        cfg = lm.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads

    @classmethod
    def wrap(cls, lm: nn.Module, kv) -> DecodeStep | None:
        """A DecodeStep for `lm` decoding into `kv` (generation.KVBuffers), or None when lm is not one of
        LLAMA_FAMILY with full attention in every layer (the caller then runs the model's own forward)."""
        if kv is None or not full_attention_llama(lm):
            return None
        blocks = getattr(getattr(lm, "model", None), "layers", None)
        if blocks is None or len(blocks) != len(kv.layers):
            return None
        for block in blocks:
            # hooks on a block (FSDP2's all-gather, accelerate's offload) would be skipped by calling its parts
            if block._forward_pre_hooks or block._forward_hooks:
                return None
            a = getattr(block, "self_attn", None)
            if a is None or any(not hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling",
                                                            "head_dim")):
                return None
            if any(hasattr(a, n) for n in ("q_norm", "k_norm")):
                return None
        return cls(lm, kv.layers)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        model, n = self.model, tokens.shape[0]
        h = model.embed_tokens(tokens)  # (n, H)
        cos, sin = model.rotary_emb(h, positions)  # (n, 1, D) each
        cos, sin = cos[:, :, None], sin[:, :, None]  # (n, 1, 1, D): broadcast over (kv heads, group)
        g = self.heads // self.kv_heads
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=h.device).masked_fill_(mask == 0, float("-inf"))
        bias = bias[:, None, None]  # (n, 1, 1, L + 1)
        for block, cache in zip(model.layers, self.kv_layers):
            a = block.self_attn
            x = block.input_layernorm(h)
            d = a.head_dim
            q = _linear(a.q_proj, x).view(n, self.kv_heads, g, d)
            k = _linear(a.k_proj, x).view(n, self.kv_heads, 1, d)
            v = _linear(a.v_proj, x).view(n, self.kv_heads, 1, d)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            keys, values = cache.update(k, v)  # KVBuffers' in-place update: (n, kv heads, L + 1, D) views
            scores = torch.matmul(q, keys.transpose(-1, -2)) * a.scaling + bias  # (n, kv heads, g, L + 1)
            # 16-bit: the softmax in float32, as transformers' attention; float32 / float64 in their own precision
            probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype) if q.element_size() < 4 else scores.softmax(-1)
            o = torch.matmul(probs, values).reshape(n, self.heads * d)
            h = h + _linear(a.o_proj, o)
            h = h + block.mlp(block.post_attention_layernorm(h))
        return self.lm.lm_head(model.norm(h))


def full_attention_llama(lm: nn.Module) -> bool:
    """Whether `lm` is one of LLAMA_FAMILY with full attention in every layer (no sliding window)."""
    if type(lm).__name__ not in LLAMA_FAMILY:
        return False
    cfg = lm.config
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return False
    return all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or ()))


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # a plain nn.Linear (the merged rollout's) without the module call; anything else (a live LoRA layer) as itself
    return F.linear(x, module.weight, module.bias) if type(module) is nn.Linear else module(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

