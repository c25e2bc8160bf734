"""VLLMEngine against the native rollout and RoleModel's fused log-probs: the same greedy tokens, the same
log-probs of sampled tokens, the adapter re-sent after an update, and the refusals."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.models import RoleModel
from rlhf_fast.rl import rollout
from rlhf_fast.rl.vllm_engine import VLLMEngine
from tests.vllm.conftest import needs_vllm

pytestmark = needs_vllm

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


def left_padded(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def perturbed(path, seed=1, std=0.1):
    """A RoleModel whose policy adapter is far from zero (B random), so adapter-off and adapter-on differ."""
    model = RoleModel.from_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if "lora_B.policy" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_and_engine(request):
    model = perturbed(request.getfixturevalue(request.param))
    with VLLMEngine(model, max_model_len=64, sampling=rollout.SamplingConfig(max_new_tokens=8)) as engine:
        yield model, engine


def test_greedy_rollout_equals_the_native_one(model_and_engine):
    model, engine = model_and_engine
    ids, mask = left_padded(PROMPTS)
    greedy = rollout.SamplingConfig(max_new_tokens=12, temperature=0.0, n=2)
    for eos in (1, 40):  # the tiny model's EOS, and a token it emits early (rows stop at different steps)
        native = rollout.sample(model, ids, mask, greedy, eos_token_id=eos)
        ours = rollout.sample(model, ids, mask, greedy, eos_token_id=eos, engine=engine)
        assert torch.equal(native.sequences, ours.sequences)
        assert torch.equal(native.attention_mask, ours.attention_mask)
        assert torch.equal(native.response_mask, ours.response_mask)
        assert torch.equal(native.has_eos, ours.has_eos)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_the_policy_logprobs(model_and_engine, temperature):
    model, engine = model_and_engine
    ids, mask = left_padded(PROMPTS)
    s = rollout.SamplingConfig(max_new_tokens=10, temperature=temperature, n=3)
    ro = rollout.sample(model, ids, mask, s, eos_token_id=1, engine=engine, generator=torch.Generator().manual_seed(0))
    assert ro.sequences.shape[0] == len(PROMPTS) * 3 and ro.logprobs.shape == ro.sequences.shape
    policy = model.logprobs(ro.sequences, ro.attention_mask, temperature=temperature)
    reference = model.logprobs(ro.sequences, ro.attention_mask, role="reference", temperature=temperature)
    m = ro.mask
    assert float(((policy - ro.logprobs) * m).abs().max()) <= 1e-4
    assert float(((reference - ro.logprobs) * m).abs().max()) > 1e-2  # the adapter is in use
    assert float((ro.logprobs * (1 - m)).abs().max()) == 0.0
    # the prompts' samples differ (one seed per prompt) and a seeded generator repeats them
    again = rollout.sample(model, ids, mask, s, eos_token_id=1, engine=engine,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.sequences, ro.sequences)


def test_top_k_at_temperature_one_gives_untruncated_logprobs(llama):
    model = perturbed(llama)
    s = rollout.SamplingConfig(max_new_tokens=8, top_k=5, top_p=0.9, n=2)
    with VLLMEngine(model, max_model_len=64, sampling=s) as engine:
        assert engine.mode == "raw_logprobs"
        ids, mask = left_padded(PROMPTS)
        ro = rollout.sample(model, ids, mask, s, eos_token_id=1, engine=engine)
    policy = model.logprobs(ro.sequences, ro.attention_mask)  # log softmax over the whole vocabulary
    assert float(((policy - ro.logprobs) * ro.mask).abs().max()) <= 1e-4


def test_the_next_rollout_uses_the_updated_adapter(llama):
    model = perturbed(llama)
    s = rollout.SamplingConfig(max_new_tokens=8, n=2)
    ids, mask = left_padded(PROMPTS)
    params = model.role_parameters("policy")
    opt = torch.optim.SGD(params, lr=0.5)
    with VLLMEngine(model, max_model_len=64, sampling=s) as engine:
        first = rollout.sample(model, ids, mask, s, eos_token_id=1, engine=engine)
        assert engine.syncs == 1
        rollout.sample(model, ids, mask, s, eos_token_id=1, engine=engine)
        assert engine.syncs == 1  # unchanged weights are not sent again
        old = {id(p): p.detach().clone() for p in params}
        loss = -model.logprobs(first.sequences, first.attention_mask).mul(first.mask).sum()
        loss.backward()
        opt.step()  # an optimiser step on the policy adapter
        assert any(not torch.equal(old[id(p)], p) for p in params)
        after = rollout.sample(model, ids, mask, s, eos_token_id=1, engine=engine)
        assert engine.syncs == 2 and engine.sync_seconds > 0
    new_lp = model.logprobs(after.sequences, after.attention_mask)
    with torch.no_grad():
        for p in params:
            p.copy_(old[id(p)])
    old_lp = model.logprobs(after.sequences, after.attention_mask)
    m = after.mask
    assert float(((new_lp - after.logprobs) * m).abs().max()) <= 1e-4
    assert float(((old_lp - after.logprobs) * m).abs().max()) > 1e-2


def test_refusals(llama):
    model = perturbed(llama)
    with pytest.raises(ValueError, match="never log softmax"):
        VLLMEngine(model, max_model_len=64, sampling=rollout.SamplingConfig(max_new_tokens=4, temperature=0.7,
                                                                            top_p=0.9))
    ids, mask = left_padded(PROMPTS)
    with VLLMEngine(model, max_model_len=64) as engine:  # no sampling config: no log-probs
        ro = rollout.sample(model, ids, mask, rollout.SamplingConfig(max_new_tokens=4), eos_token_id=1, engine=engine)
        assert ro.logprobs is None and ro.sequences.shape[0] == len(PROMPTS)
        with pytest.raises(ValueError, match="left-padded"):
            engine.sample(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), rollout.SamplingConfig(4),
                          eos_token_id=1)
        with pytest.raises(ValueError, match="another model"):
            rollout.sample(perturbed(llama), ids, mask, rollout.SamplingConfig(4), eos_token_id=1, engine=engine)
        model.merge_policy_into_base()  # the base vLLM loaded is no longer the model's
        with pytest.raises(RuntimeError, match="base weights changed"):
            rollout.sample(model, ids, mask, rollout.SamplingConfig(4), eos_token_id=1, engine=engine)
    with VLLMEngine(model, max_model_len=64, sampling=rollout.SamplingConfig(4)) as engine:
        with pytest.raises(ValueError, match="build the engine with these options"):
            engine.sample(ids, mask, rollout.SamplingConfig(4, top_k=3), eos_token_id=1)


def test_close_removes_the_exported_files(llama):
    import os

    engine = VLLMEngine(perturbed(llama), max_model_len=64)
    folder = engine.workdir
    assert os.path.isfile(os.path.join(folder, "base", "config.json"))
    engine.close()
    assert not os.path.exists(folder)


@pytest.mark.parametrize("temperature, top_p, top_k", [(0.7, 1.0, 0), (1.0, 1.0, 5), (1.0, 0.8, 0)])
def test_first_tokens_follow_the_same_truncated_distribution(llama, temperature, top_p, top_k):
    """vLLM and the native loop sample the first response token from the same distribution: softmax(z / T),
    cut to the top-k tokens or the top-p nucleus as models.generation.sample defines them (total variation
    distance to the exact distribution over 8000 draws, each side)."""
    from rlhf_fast.models.generation import sample as native_rule

    model = perturbed(llama)
    ids, mask = left_padded([[5, 6, 7]])
    with torch.no_grad(), model.role("policy"):
        z = model.lm(input_ids=ids, attention_mask=mask).logits[0, -1].float() / temperature  # (V,)
    exact = torch.zeros_like(z)
    if top_k:
        keep = z.topk(top_k).indices
    else:
        p, order = z.softmax(-1).sort(descending=True)
        keep = order[(p.cumsum(0) - p) < top_p]
    exact[keep] = z[keep].softmax(-1)
    s = rollout.SamplingConfig(max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k, n=8000)
    with VLLMEngine(model, max_model_len=64) as engine:
        ours = rollout.sample(model, ids, mask, s, eos_token_id=[], engine=engine).sequences[:, -1]
    g = torch.Generator().manual_seed(0)
    native = native_rule((z * temperature).expand(8000, -1), temperature, top_p, top_k, g)
    for draws in (ours, native):
        freq = torch.bincount(draws, minlength=z.numel()).float() / draws.numel()
        assert float((freq - exact).abs().sum() / 2) < 0.05  # seen: 0.007-0.022 at 8000 draws
        assert set(draws.unique().tolist()) <= set(keep.tolist())  # nothing outside the cut
