"""models/decode_step.py against transformers' own forward: the same sampled tokens and log-probs in float64 (left
padding, several samples per prompt, rows leaving the batch at EOS, merged and live LoRA), the logits of one step,
and the models that must decode through transformers instead."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.models import LoraSettings, RoleModel, decode_step
from rlhf_fast.models.generation import KVBuffers, _cache_of


def _model(tiny_model_factory, arch):
    model = RoleModel.from_pretrained(tiny_model_factory(arch), lora=LoraSettings(r=3, alpha=5.0),
                                      dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and ".policy" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return model


def _prompts():
    ids = torch.tensor([[0, 0, 11, 12, 13], [14, 15, 16, 17, 18], [0, 19, 20, 21, 22]])
    return ids, (ids != 0).long()


def _generate(model, monkeypatch, lean: bool, **kw):
    calls = []
    real = decode_step.DecodeStep.wrap

    def wrap(lm, kv):
        step = real(lm, kv) if lean else None
        calls.append(step is not None)
        return step

    monkeypatch.setattr(decode_step.DecodeStep, "wrap", wrap)
    ids, mask = _prompts()
    out = model.generate(ids, mask, max_new_tokens=12, temperature=1.0, num_samples=2, return_logprobs=True,
                         generator=torch.Generator().manual_seed(5), **kw)
    monkeypatch.undo()
    return out, calls


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("merge", [True, False])
def test_generation_equals_the_transformers_forward(tiny_model_factory, monkeypatch, arch, merge):
    model = _model(tiny_model_factory, arch)
    want, calls_off = _generate(model, monkeypatch, False, merge=merge, eos_token_id=[3, 4, 5])
    got, calls_on = _generate(model, monkeypatch, True, merge=merge, eos_token_id=[3, 4, 5])
    assert calls_on == [True] and calls_off == [False]
    assert torch.equal(got["sequences"], want["sequences"])
    assert torch.equal(got["response_mask"], want["response_mask"])
    # some rows stopped early (they leave the decode batch), others ran to the end
    lengths = want["response_mask"].sum(1)
    assert int(lengths.min()) < 12 and int(lengths.max()) == 12, lengths
    torch.testing.assert_close(got["logprobs"], want["logprobs"], rtol=1e-10, atol=1e-10)


def test_one_step_logits_equal_the_model_forward(tiny_model_factory):
    model = _model(tiny_model_factory, "llama")
    lm = model.lm
    ids, mask = _prompts()
    with torch.no_grad(), model.role("policy"):
        out = lm(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
        cache = _cache_of(out)
        kv = KVBuffers.wrap(cache, 3)
        step = decode_step.DecodeStep.wrap(lm, kv)
        assert step is not None
        tok = torch.tensor([30, 31, 32])
        full_ids, full_mask = torch.cat([ids, tok[:, None]], 1), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        pos = mask.sum(1, keepdim=True)
        got = step(tok, pos, full_mask)
        want = lm(input_ids=full_ids, attention_mask=full_mask,
                  position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert kv.layers[0]._rf_len == 6 and kv.layers[0].keys.shape[2] == 6


def test_other_models_decode_through_transformers(tiny_model_factory):
    from transformers import MistralConfig, MistralForCausalLM

    gpt2 = _model(tiny_model_factory, "gpt2").lm
    mistral = MistralForCausalLM(MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=8)).eval()
    llama = _model(tiny_model_factory, "llama").lm
    for lm, want in ((gpt2, None), (mistral, None), (llama, "step")):
        ids = torch.tensor([[5, 6, 7]])
        with torch.no_grad():
            kv = KVBuffers.wrap(_cache_of(lm(input_ids=ids, use_cache=True)), 2)
        step = decode_step.DecodeStep.wrap(lm, kv)
        assert (step is None) == (want is None), type(lm).__name__
    mistral.config.sliding_window = None
    with torch.no_grad():
        kv = KVBuffers.wrap(_cache_of(mistral(input_ids=ids, use_cache=True)), 2)
    assert decode_step.DecodeStep.wrap(mistral, kv) is not None  # full attention: the same layers as Llama's
    handle = llama.model.layers[1].register_forward_pre_hook(lambda mod, args: None)
    try:
        assert decode_step.DecodeStep.wrap(llama, kv) is None  # a hook on a block (FSDP2, offload) must run
    finally:
        handle.remove()
    assert decode_step.DecodeStep.wrap(llama, None) is None
