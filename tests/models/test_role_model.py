"""RoleModel on tiny Llama / Qwen2 / GPT-2 models built from configs: each role against an independent
materialised-logits reference, alignment, generation, save/load through peft, one base copy, bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.models import ADAPTERS, ROLES, LoraSettings, RoleModel
from rlhf_fast.models.role_model import position_ids, token_mask
from tests.tolerances import assert_close

ARCHS = ("llama", "qwen2", "gpt2")
LORA = LoraSettings(r=4, alpha=8.0)


def _randomize(model: RoleModel, *adapters: str, std: float = 0.3, seed: int = 1) -> None:
    """LoRA B starts at zero (adapter = identity); give adapters and heads random values so roles differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in adapters or ("policy", "critic", "reward"):
            for p in model._adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for head in (model.value_head, model.score_head):
            for p in head.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def _batch(b: int = 3, t: int = 9, vocab: int = 96, seed: int = 0):
    """Row 0 left-padded by 3, row 1 right-padded by 2, the rest full."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _logprobs_from_logits64(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The plain formula in float64 on materialised logits, with RoleModel's alignment written out longhand."""
    lp = torch.log_softmax(logits.double(), -1)  # (B, T, V)
    out = torch.zeros(ids.shape, dtype=torch.float64)
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[b, t] and mask[b, t - 1]:
                out[b, t] = lp[b, t - 1, ids[b, t]]
    return out


def _plain_model(path, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


@pytest.fixture
def model_of(tiny_model_factory):
    def make(arch="llama", **kwargs):
        return RoleModel.from_pretrained(tiny_model_factory(arch), lora=kwargs.pop("lora", LORA), **kwargs)

    return make


# ------------------------------------------------------------------------------------------- roles vs reference

@pytest.mark.parametrize("arch", ARCHS)
def test_reference_equals_plain_base_model(arch, tiny_model_factory, model_of):
    model = model_of(arch)
    _randomize(model)  # the reference must ignore every adapter
    ids, mask = _batch()
    with torch.no_grad():
        got = model.logprobs(ids, mask, role="reference")
        plain = _plain_model(tiny_model_factory(arch))
        # independent of any padding logic: each row's real tokens alone, unpadded, in float64
        want = torch.zeros(ids.shape, dtype=torch.float64)
        for b in range(ids.shape[0]):
            real = mask[b].nonzero().flatten()
            row = ids[b, real][None]
            lp = torch.log_softmax(plain(row).logits[0, :-1], -1).gather(-1, row[0, 1:, None])[:, 0]
            want[b, real[1:]] = lp
    assert got.dtype == torch.float32 and got.shape == ids.shape
    assert want.abs().sum() > 0
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_policy_matches_peft_logits_and_moves_with_its_adapter(arch, model_of):
    model = model_of(arch)
    ids, mask = _batch()
    with torch.no_grad():
        ref0 = model.logprobs(ids, mask, role="reference")
        pol0 = model.logprobs(ids, mask, role="policy")
        assert_close(pol0, ref0.double(), torch.float32)  # fresh adapter: B = 0, policy == base
        _randomize(model, "policy")
        pol1 = model.logprobs(ids, mask, role="policy")
        ref1 = model.logprobs(ids, mask, role="reference")
        model.peft.base_model.set_adapter("policy")
        logits = model.peft(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    assert (pol1 - pol0).abs().max() > 1e-2
    assert torch.equal(ref1, ref0)
    assert_close(pol1, _logprobs_from_logits64(logits, ids, mask), torch.float32)


def test_critic_and_reward_adapters_leave_policy_and_reference(model_of):
    model = model_of("llama")
    _randomize(model, "policy")
    ids, mask = _batch()
    with torch.no_grad():
        before = model.experience(ids, mask)
        _randomize(model, "critic", "reward", seed=5)
        after = model.experience(ids, mask)
    assert torch.equal(after["logprobs"], before["logprobs"])
    assert torch.equal(after["ref_logprobs"], before["ref_logprobs"])
    assert not torch.allclose(after["values"], before["values"])
    assert not torch.allclose(after["scores"], before["scores"])


@pytest.mark.parametrize("arch,mode", [("llama", "sequential"), ("llama", "mixed"), ("qwen2", "mixed"),
                                       ("gpt2", "mixed")])
def test_experience_equals_single_role_calls(arch, mode, model_of):
    model = model_of(arch)
    _randomize(model)
    ids, mask = _batch()
    exp = model.experience(ids, mask, mode=mode, temperature=0.7)
    with torch.no_grad():
        single = {"logprobs": model.logprobs(ids, mask, "policy", temperature=0.7),
                  "ref_logprobs": model.logprobs(ids, mask, "reference", temperature=0.7),
                  "values": model.values(ids, mask), "scores": model.scores(ids, mask)}
    for key, want in single.items():
        assert exp[key].shape == want.shape and exp[key].dtype == torch.float32, key
        assert_close(exp[key], want.double(), torch.float32, msg=key)
    # the four roles really differ, so the equality above is not vacuous
    assert (exp["logprobs"] - exp["ref_logprobs"]).abs().max() > 1e-2
    # from a start column: the lm head skips the columns before it (0 there), the rest as before
    part = model.experience(ids, mask, mode=mode, temperature=0.7, start=3)
    for key in ("logprobs", "ref_logprobs"):
        assert part[key].shape == single[key].shape and not part[key][:, :3].any(), key
        assert_close(part[key][:, 3:], single[key][:, 3:].double(), torch.float32, msg=key)
    assert torch.equal(part["values"], exp["values"]) and torch.equal(part["scores"], exp["scores"])
    # without the critic: no values, the other three as before
    no_critic = model.experience(ids, mask, mode=mode, temperature=0.7, critic=False)
    assert no_critic["values"] is None
    for key in ("logprobs", "ref_logprobs", "scores"):
        assert_close(no_critic[key], single[key].double(), torch.float32, msg=key)
    given = model.experience(ids, mask, temperature=0.7, policy_logprobs=single["logprobs"] + 1)
    assert torch.equal(given["logprobs"], single["logprobs"] + 1)  # the caller's, not a forward's
    with pytest.raises(ValueError, match="start"):
        model.experience(ids, mask, start=-1)
    with pytest.raises(ValueError, match="policy_logprobs"):
        model.experience(ids, mask, policy_logprobs=single["logprobs"][:, 1:])
    with pytest.raises(ValueError, match="policy_logprobs"):
        model.experience(ids, mask, mode="mixed", policy_logprobs=single["logprobs"])


def test_values_and_scores_against_hidden_states(model_of):
    """values[:, t] = value_head(h_critic[:, t-1]); scores = score_head(h_reward[last real token])."""
    model = model_of("qwen2")
    _randomize(model)
    ids, mask = _batch()
    with torch.no_grad():
        values, scores = model.values(ids, mask), model.scores(ids, mask)
        outs = {}
        for role in ("critic", "reward"):
            model.peft.base_model.set_adapter(role)
            outs[role] = model.peft(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                                    output_hidden_states=True).hidden_states[-1].double()
    w_v, b_v = model.value_head.weight.double(), model.value_head.bias.double()
    w_s, b_s = model.score_head.weight.double(), model.score_head.bias.double()
    want_v = torch.zeros(ids.shape, dtype=torch.float64)
    want_s = torch.zeros(ids.shape[0], dtype=torch.float64)
    for b in range(ids.shape[0]):
        real = mask[b].nonzero().flatten()
        want_s[b] = outs["reward"][b, real[-1]] @ w_s[0] + b_s[0]
        for t in range(1, ids.shape[1]):
            if mask[b, t] and mask[b, t - 1]:
                want_v[b, t] = outs["critic"][b, t - 1] @ w_v[0] + b_v[0]
    assert values.shape == ids.shape and scores.shape == (ids.shape[0],)
    assert_close(values, want_v, torch.float32)
    assert_close(scores, want_s, torch.float32)


def test_alignment_entry_t_reads_tokens_before_t(model_of):
    model = model_of("llama")
    _randomize(model)
    ids = torch.randint(3, 96, (2, 8))
    mask = torch.ones_like(ids)
    t = 4
    ids2 = ids.clone()
    ids2[:, t] = (ids[:, t] + 7) % 90 + 3
    with torch.no_grad():
        lp, lp2 = model.logprobs(ids, mask), model.logprobs(ids2, mask)
        v, v2 = model.values(ids, mask), model.values(ids2, mask)
    assert torch.equal(lp[:, :t], lp2[:, :t]) and (lp[:, t] != lp2[:, t]).all()  # target at t
    assert torch.equal(v[:, : t + 1], v2[:, : t + 1]) and (v[:, t + 1] != v2[:, t + 1]).all()  # state before t+1
    assert (lp[:, 0] == 0).all() and (v[:, 0] == 0).all()


def test_padding_does_not_change_outputs(model_of):
    """A sequence scores the same alone, left-padded and right-padded (positions follow the mask)."""
    model = model_of("gpt2")
    _randomize(model)
    seq = torch.randint(3, 96, (1, 6))
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    right = torch.cat([seq, torch.zeros(1, 3, dtype=torch.long)], 1)
    m_left = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1).long()
    m_right = m_left.flip(1)
    e = model.experience(seq, torch.ones_like(seq))
    el = model.experience(left, m_left)
    er = model.experience(right, m_right)
    for key in ("logprobs", "ref_logprobs", "values"):
        assert_close(el[key][:, 3:], e[key].double(), torch.float32, msg=key)
        assert_close(er[key][:, :6], e[key].double(), torch.float32, msg=key)
        assert (el[key][:, :4] == 0).all() and (er[key][:, 6:] == 0).all()
    assert_close(el["scores"], e["scores"].double(), torch.float32)
    assert_close(er["scores"], e["scores"].double(), torch.float32)


def test_entropy_and_single_token_rows(model_of):
    model = model_of("llama")
    ids, mask = _batch()
    with torch.no_grad():
        lp, ent = model.logprobs(ids, mask, "reference", return_entropy=True)
        logits = _plain_model_logits(model, ids, mask)
    p = torch.softmax(logits, -1)
    want = torch.nn.functional.pad(-(p * p.log()).sum(-1)[:, :-1], (1, 0)) * token_mask(mask)
    assert_close(ent, want, torch.float32)
    one = model.experience(ids[:, :1], mask[:, :1].clone().fill_(1))
    assert all((v == 0).all() for k, v in one.items() if k != "scores")


def _plain_model_logits(model, ids, mask):
    with model.peft.disable_adapter():
        return model.peft(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits.double()


# ------------------------------------------------------------------------------------------- training forwards

def _grads(model):
    named = {name: model._adapter_parameters(name) for name in ADAPTERS}
    named["value_head"] = list(model.value_head.parameters())
    named["score_head"] = list(model.score_head.parameters())
    return {k: any(p.grad is not None and p.grad.abs().sum() > 0 for p in v) for k, v in named.items()}


def test_each_role_trains_only_its_adapter_and_head(model_of):
    model = model_of("llama")
    _randomize(model)
    model.train()
    ids, mask = _batch()
    base = [p for n, p in model.named_parameters() if "lora_" not in n and "_head" not in n]
    assert base and not any(p.requires_grad for p in base)

    f = model.policy_forward(ids, mask)
    assert f.hidden.shape == (*ids.shape, f.weight.shape[1])
    lp = ops.fused_linear_logprobs(f.hidden, f.weight, f.targets, f.bias)
    assert_close(lp, model.logprobs(ids, mask).double(), torch.float32)
    lp.sum().backward()
    assert _grads(model) == {"policy": True, "critic": False, "reward": False, "value_head": False,
                             "score_head": False}
    model.zero_grad(set_to_none=True)
    # policy and critic forwards first, one backward after: both adapters must still receive gradients
    loss = model.policy_forward(ids, mask).hidden.sum() + model.values(ids, mask).sum()
    loss.backward()
    assert _grads(model) == {"policy": True, "critic": True, "reward": False, "value_head": True,
                             "score_head": False}
    model.zero_grad(set_to_none=True)
    # a reference pass (adapters off) between a critic forward and its backward must not cut the critic off
    values = model.values(ids, mask)
    with torch.no_grad():
        model.logprobs(ids, mask, role="reference")
        model.generate(ids, mask, max_new_tokens=1)
    values.sum().backward()
    assert _grads(model)["critic"] and _grads(model)["value_head"]
    model.zero_grad(set_to_none=True)
    model.scores(ids, mask).sum().backward()
    assert _grads(model) == {"policy": False, "critic": False, "reward": True, "value_head": False,
                             "score_head": True}
    assert all(p.grad is None for p in base)
    assert {id(p) for p in model.role_parameters("critic")} == (
        {id(p) for p in model._adapter_parameters("critic")} | {id(p) for p in model.value_head.parameters()})


def test_gradient_checkpointing_gives_the_same_gradients(model_of):
    grads = []
    for gc in (False, True):
        model = model_of("qwen2", gradient_checkpointing=gc)
        _randomize(model)
        model.train()
        ids, mask = _batch()
        model.values(ids, mask).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.role_parameters("critic")]))
    assert_close(grads[1], grads[0].double(), torch.float32)


# ------------------------------------------------------------------------------------------- SFT -> reference

def test_merge_policy_into_base_makes_reference_the_sft_model(model_of):
    model = model_of("gpt2")
    _randomize(model)
    ids, mask = _batch()
    with torch.no_grad():
        sft = model.logprobs(ids, mask, "policy")
        critic = model.values(ids, mask)
        model.merge_policy_into_base()
        ref = model.logprobs(ids, mask, "reference")
        pol = model.logprobs(ids, mask, "policy")
    assert_close(ref, sft.double(), torch.float32)
    assert torch.equal(pol, ref)  # fresh policy adapter: B = 0
    assert all((p == 0).all() for n, p in model.peft.named_parameters() if "lora_B.policy" in n)
    assert not torch.allclose(model.values(ids, mask), critic)  # the critic now sits on the SFT base


# ------------------------------------------------------------------------------------------- generation

def _policy_and_left_padded_prompts(model_of, arch):
    """A model with a random policy adapter and three 5-token prompts: row 0 left-padded, rows 1 and 2 full."""
    model = model_of(arch)
    _randomize(model, "policy", std=0.1)
    ids, mask = _batch(t=5)
    mask[1] = 1
    ids[1] = ids[1].clamp(min=3)
    return model, ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_the_policy_argmax(arch, model_of):
    """KV cache + left padding: every greedy token is the argmax of the policy on the returned sequence."""
    model, ids, mask = _policy_and_left_padded_prompts(model_of, arch)
    out = model.generate(ids, mask, max_new_tokens=6, temperature=0, eos_token_id=[])
    seq, am, rm = out["sequences"], out["attention_mask"], out["response_mask"]
    assert seq.shape == (3, 11) and am.shape == rm.shape == seq.shape
    assert torch.equal(am[:, :5], mask) and (rm[:, :5] == 0).all() and (rm[:, 5:] == 1).all()
    with torch.no_grad():
        model.peft.base_model.set_adapter("policy")
        logits = model.peft(input_ids=seq, attention_mask=am, position_ids=position_ids(am)).logits
    assert torch.equal(logits[:, 4:-1].argmax(-1), seq[:, 5:])


def test_lockstep_generation_keeps_decoding_for_the_other_processes(model_of):
    """model.lockstep (set under FSDP2) reports rows still decoding on another process: this one keeps running
    forwards (on a finished row, its tokens discarded) until none is left anywhere, and returns what it would alone."""
    model = model_of("llama")
    ids, mask = _batch(t=5)
    free = model.generate(ids, mask, max_new_tokens=8, temperature=0, eos_token_id=[])
    eos = sorted(set(free["sequences"][:, 5].tolist()))  # every row stops at its first token
    alone = model.generate(ids, mask, max_new_tokens=8, temperature=0, eos_token_id=eos, pad_token_id=0)
    calls, forwards = [], []
    hook = model.lm.register_forward_pre_hook(lambda m, a, k: forwards.append(k["input_ids"].shape[0]),
                                              with_kwargs=True)
    model.lockstep = lambda n: calls.append(n) or (n if len(calls) >= 5 else 1)  # another process: 5 steps
    try:
        stepped = model.generate(ids, mask, max_new_tokens=8, temperature=0, eos_token_id=eos, pad_token_id=0)
    finally:
        model.lockstep = None
        hook.remove()
    assert alone["sequences"].shape[1] == 6  # alone: one token each, then done
    for k in alone:
        assert torch.equal(alone[k], stepped[k]), k
    assert calls == [0] * 5  # nothing left here after the first token
    assert forwards == [3, 1, 1, 1, 1]  # the prefill, then 4 decode steps on one finished row for the others


def test_generation_stops_at_eos_and_masks_after(model_of):
    model = model_of("llama")
    ids, mask = _batch(t=5)
    free = model.generate(ids, mask, max_new_tokens=8, temperature=0, eos_token_id=[])
    eos = int(free["sequences"][0, 7])  # row 0's third greedy token becomes the stop token
    out = model.generate(ids, mask, max_new_tokens=8, temperature=0, eos_token_id=eos, pad_token_id=0)
    seq, rm, am = out["sequences"], out["response_mask"], out["attention_mask"]
    for b in range(3):
        resp = free["sequences"][b, 5:]
        hits = (resp == eos).nonzero().flatten()
        n = int(hits[0]) + 1 if len(hits) else 8
        assert (rm[b, 5:5 + n] == 1).all() and (rm[b, 5 + n:] == 0).all()
        assert torch.equal(seq[b, 5:5 + n], resp[:n])
        assert (seq[b, 5 + n:] == 0).all()
    assert rm[0, 5:].sum() <= 3 and seq[0, 5 + int(rm[0].sum()) - 1] == eos
    assert torch.equal(am[:, 5:], rm[:, 5:])
    if bool((rm[:, -1] == 0).all()):  # every row stopped early: generation stopped early too
        assert seq.shape[1] < 13


def test_sampling_is_reproducible_and_honours_top_k(model_of):
    model = model_of("qwen2")
    ids, mask = _batch(t=4)
    kw = dict(max_new_tokens=5, temperature=1.3, top_p=0.9, eos_token_id=[])
    a = model.generate(ids, mask, generator=torch.Generator().manual_seed(3), **kw)["sequences"]
    b = model.generate(ids, mask, generator=torch.Generator().manual_seed(3), **kw)["sequences"]
    assert torch.equal(a, b)
    g = model.generate(ids, mask, top_k=1, max_new_tokens=5, temperature=2.0, eos_token_id=[],
                       generator=torch.Generator().manual_seed(4))["sequences"]
    greedy = model.generate(ids, mask, temperature=0, max_new_tokens=5, eos_token_id=[])["sequences"]
    assert torch.equal(g, greedy)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("merge", [True, False])
def test_generation_logprobs_equal_the_policy_forward(arch, merge, model_of):
    """return_logprobs: each sampled token's log-prob from the decode loop's logits (KV cache, merged weights)
    equals logprobs() recomputed over the returned sequences in one forward, up to float rounding; 0 elsewhere
    (prompt, padding after EOS). top_k narrows the sampling but not the distribution the log-prob is taken under.
    Left-padded prompts, as the trainers collate them (logprobs() leaves a token after padding undefined)."""
    model, ids, mask = _policy_and_left_padded_prompts(model_of, arch)
    free = model.generate(ids, mask, max_new_tokens=6, temperature=0, eos_token_id=[])
    eos = int(free["sequences"][0, 7])  # row 0 stops after its third token: rows of several lengths
    out = model.generate(ids, mask, max_new_tokens=6, temperature=0.8, top_k=5, eos_token_id=eos, pad_token_id=0,
                         num_samples=2, merge=merge, generator=torch.Generator().manual_seed(1),
                         return_logprobs=True)
    seq, am, rm, lp = out["sequences"], out["attention_mask"], out["response_mask"], out["logprobs"]
    assert lp.shape == seq.shape and lp.dtype == torch.float32
    assert (lp[rm == 0] == 0).all() and (lp[rm == 1] < 0).all()
    assert 0 < int((rm[:, 5:] == 0).sum()) < rm[:, 5:].numel()  # some rows stopped early
    with torch.no_grad():
        want = model.logprobs(seq, am, "policy", temperature=0.8)
    assert_close(lp, (want * rm).double(), torch.float32)
    assert (lp - want * rm).abs().max() < 1e-4
    plain = model.generate(ids, mask, max_new_tokens=6, temperature=0.8, top_k=5, eos_token_id=eos, pad_token_id=0,
                           num_samples=2, merge=merge, generator=torch.Generator().manual_seed(1))
    assert "logprobs" not in plain and torch.equal(plain["sequences"], seq)  # asking for them changes no sample


@pytest.mark.parametrize("arch", ARCHS)
def test_num_samples_shares_the_prefill(arch, model_of):
    """n samples per prompt from one prefill (its KV cache repeated) equal sampling from the prompts repeated n
    times with the same generator, row for row; the samples of one prompt differ."""
    from transformers.cache_utils import DynamicCache

    from rlhf_fast.models.generation import KVBuffers

    model = model_of(arch)
    _randomize(model, "policy", std=0.1)
    ids, mask = _batch(t=5)
    kw = dict(max_new_tokens=6, temperature=1.0, eos_token_id=[])
    a = model.generate(ids, mask, num_samples=3, generator=torch.Generator().manual_seed(5), **kw)
    b = model.generate(ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0),
                       generator=torch.Generator().manual_seed(5), **kw)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["sequences"].shape == (9, 11)
    assert not torch.equal(a["sequences"][0], a["sequences"][1])
    with torch.no_grad():  # the preallocated cache takes over this architecture's cache (not the slow path)
        out = model.lm(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert isinstance(cache, DynamicCache) and KVBuffers.wrap(cache, 4) is not None
    with pytest.raises(ValueError, match="num_samples"):
        model.generate(ids, mask, num_samples=0, **kw)


def test_generation_puts_the_lora_layers_back(model_of):
    """The merged rollout runs the plain base layers; afterwards (also after an error) the LoRA wrappers, the
    adapters and their trainable parameters are back."""
    from peft.tuners.lora import LoraLayer

    model = model_of("llama")
    _randomize(model, "policy", std=0.1)
    ids, mask = _batch(t=5)
    layers = [n for n, m in model.lm.named_modules() if isinstance(m, LoraLayer)]
    params = [id(p) for p in model.role_parameters("policy")]
    with torch.no_grad():
        before = model.logprobs(ids, mask, "policy")
    model.generate(ids, mask, max_new_tokens=3, temperature=0, eos_token_id=[])
    with pytest.raises(TypeError):  # an error inside the merged rollout
        model.generate(ids, mask, max_new_tokens=3, temperature=1.0, eos_token_id=[], generator="not a generator")
    assert [n for n, m in model.lm.named_modules() if isinstance(m, LoraLayer)] == layers
    assert [id(p) for p in model.role_parameters("policy")] == params
    assert all(p.requires_grad for p in model.role_parameters("policy"))
    with torch.no_grad():
        assert torch.equal(model.logprobs(ids, mask, "policy"), before)


def test_sampling_draws_from_the_softmax(monkeypatch):
    """Inverse-CDF sampling draws token v with probability p_v; top-k and top-p never draw an excluded token, nor
    does a row whose uniform lands at the very top of its CDF (n = 40000: the largest frequency error allowed is
    about 4 standard deviations)."""
    from rlhf_fast.models.generation import sample

    n = 40000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(n, 1)
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5):
        p = (logits[0] / temperature).softmax(-1).double()
        freq = torch.bincount(sample(logits, temperature, 1.0, 0, g), minlength=5).double() / n
        assert (freq - p).abs().max() < 4 * (0.25 / n) ** 0.5, (freq, p)
    assert set(sample(logits, 1.0, 1.0, 2, g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, 0.7, 0, g).tolist()) == {0, 1}  # p = 0.64, 0.24, ...: 0.64 < 0.7 <= 0.88

    # every uniform the largest float64 below 1: u * total may round up to total
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, 1.0 - 2.0 ** -53, dtype=kw["dtype"]))
    assert sample(logits[:4], 1.0, 1.0, 2, None).tolist() == [1, 1, 1, 1]  # not the masked tokens 2-4
    assert sample(logits[:4], 1.0, 1.0, 0, None).tolist() == [4, 4, 4, 4]  # p_4 > 0: the top is its


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_restores_base_weights_bit_for_bit(dtype, model_of):
    model = model_of("gpt2", dtype=dtype)  # GPT-2: Conv1D layers, transposed deltas
    _randomize(model, "policy", std=0.3)
    before = {k: v.clone() for k, v in model.base_state_dict().items()}
    ids, mask = _batch(t=4)
    live = model.generate(ids, mask, max_new_tokens=4, temperature=0, eos_token_id=[])
    after = model.base_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a naive merge + unmerge does not restore the weights: the exact path has work to do
    w = model.lm.transformer.h[0].attn.c_attn.base_layer.weight
    d = model.lm.transformer.h[0].attn.c_attn.get_delta_weight("policy").to(w.dtype)
    assert not torch.equal((w + d) - d, w)
    merged = model.generate(ids, mask, max_new_tokens=4, temperature=0, eos_token_id=[], merge=True)
    after = model.base_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    if dtype == torch.float32:  # the merged weights compute the same policy (bf16 rounding may flip an argmax)
        assert torch.equal(live["sequences"], merged["sequences"])
    with torch.no_grad():
        lp = model.logprobs(merged["sequences"], merged["attention_mask"])
    assert torch.isfinite(lp).all()


# ------------------------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("arch", ["gpt2"])
def test_save_load_round_trip_through_peft(arch, tiny_model_factory, model_of, tmp_path):
    from peft import PeftModel

    model = model_of(arch)
    _randomize(model)
    ids, mask = _batch()
    want = model.experience(ids, mask)
    out = model.save(tmp_path / "ckpt")
    assert not (out / "base").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"ckpt"}  # no temp folders left behind
    settings = json.loads((out / "role_model.json").read_text())
    assert settings["lora"]["r"] == LORA.r

    back = RoleModel.load(out)
    got = back.experience(ids, mask)
    for key in want:
        assert torch.equal(got[key], want[key]), key

    plain = _plain_model(tiny_model_factory(arch), torch.float32)
    peft_policy = PeftModel.from_pretrained(plain, str(out / "adapters" / "policy"), adapter_name="policy").eval()
    with torch.no_grad():
        logits = peft_policy(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    assert_close(want["logprobs"], _logprobs_from_logits64(logits, ids, mask), torch.float32)


def test_save_base_after_merge_and_overwrite(model_of, tmp_path):
    model = model_of("qwen2")
    _randomize(model)
    model.merge_policy_into_base()
    ids, mask = _batch()
    want = model.experience(ids, mask)
    model.save(tmp_path / "ckpt", save_base=True)
    model.save(tmp_path / "ckpt", save_base=True)  # overwriting an existing checkpoint works
    assert (tmp_path / "ckpt" / "base" / "config.json").is_file()
    assert (tmp_path / "ckpt" / "base" / "tokenizer.json").is_file()
    back = RoleModel.load(tmp_path / "ckpt")
    got = back.experience(ids, mask)
    for key in want:
        assert_close(got[key], want[key].double(), torch.float32, msg=key)
    assert back.merged_into_base == 1


# ------------------------------------------------------------------------------------------- memory, dtypes

def _storages(module):
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in list(module.parameters()) + list(module.buffers())}


@pytest.mark.parametrize("arch", ARCHS)
def test_exactly_one_copy_of_the_base_weights(arch, tiny_model_factory, model_of):
    plain = _plain_model(tiny_model_factory(arch), torch.float32)
    model = model_of(arch)
    base = {n.replace(".base_layer.", "."): p for n, p in model.lm.named_parameters() if "lora_" not in n}
    plain_params = dict(plain.named_parameters())
    assert base.keys() == plain_params.keys()
    # as many unique base storages as the plain model has (tied embeddings stay tied), no more
    assert len({p.untyped_storage().data_ptr() for p in base.values()}) == len(_storages(plain)) - len(
        [b for b in plain.buffers()])
    extra = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n or "_head" in n)
    base_bytes = sum(_storages(plain).values())
    assert sum(_storages(model).values()) <= base_bytes + extra
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for r in ("policy", "critic", "reward") for p in model.role_parameters(r)}


def test_bf16(tiny_model_factory, model_of):
    model = model_of("llama", dtype=torch.bfloat16)
    _randomize(model)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for r in ("policy", "critic") for p in model.role_parameters(r))
    ids, mask = _batch()
    exp = model.experience(ids, mask)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in exp.values())
    plain = _plain_model(tiny_model_factory("llama"), torch.bfloat16)
    with torch.no_grad():
        logits = plain(ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    # same bf16 forward; only the head's accumulation order differs (fused fp32 vs bf16 GEMM)
    assert_close(exp["ref_logprobs"], _logprobs_from_logits64(logits, ids, mask), torch.bfloat16)
    out = model.generate(ids, mask, max_new_tokens=3)
    assert out["sequences"].shape == (3, 12)


# ------------------------------------------------------------------------------------------- bad input

def test_bad_input_errors(model_of, tiny_model_factory, tmp_path):
    model = model_of("llama")
    ids, mask = _batch()
    with pytest.raises(ValueError, match="policy, reference, critic, reward"):
        model(ids, mask, role="actor")
    with pytest.raises(ValueError, match="'policy' or 'reference'"):
        model.logprobs(ids, mask, role="critic")
    with pytest.raises(ValueError, match="does not match"):
        model.values(ids, mask[:, :-1])
    with pytest.raises(ValueError, match="empty batch"):
        model.experience(ids[:0], mask[:0])
    with pytest.raises(TypeError, match="integer"):
        model.scores(ids.float(), mask)
    with pytest.raises(ValueError, match="mode"):
        model.experience(ids, mask, mode="parallel")
    with pytest.raises(ValueError, match="at least one real token"):
        model.generate(ids, torch.zeros_like(mask), max_new_tokens=2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RoleModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        RoleModel.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a RoleModel folder"):
        RoleModel.load(tmp_path / "empty")
    with pytest.raises(TypeError, match="model_or_path"):
        RoleModel.from_pretrained(42)
    assert set(ROLES) == {"policy", "reference", "critic", "reward"}


def test_missing_pad_token_falls_back_to_eos_with_one_warning(tiny_model_factory):
    path = tiny_model_factory("llama", with_pad=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = RoleModel.from_pretrained(path, lora=LORA)
        ids, mask = _batch()
        model.generate(ids, mask, max_new_tokens=2)
        model.experience(ids, mask)
    pad_warnings = [w for w in caught if "pad" in str(w.message)]
    assert len(pad_warnings) == 1 and "EOS" in str(pad_warnings[0].message)
    assert model.pad_token_id == model.eos_token_id == 1


def test_built_model_object_is_used_in_place(tiny_model_factory):
    plain = _plain_model(tiny_model_factory("llama"), torch.float32)
    ptr = plain.get_input_embeddings().weight.data_ptr()
    model = RoleModel.from_pretrained(plain, lora=LORA)
    assert model.lm.get_input_embeddings().weight.data_ptr() == ptr
