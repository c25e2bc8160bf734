"""PPO: the policy's probability of the rewarded tokens rises, only the policy and critic adapters and the value
head move; the minibatch loss (policy + value) and its gradients on the torch and Triton backends equal a
float64 reference from materialised logits with the clipped surrogate written out; a Triton run trains like a
torch run; bad options are refused, non-finite steps are skipped and counted."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_fixtures import (
    count_calls,
    float64_twin,
    materialised,
    moved,
    next_token_logprobs,
    perturb,
    require_triton_on_cpu,
    trainable_snapshot,
)

from rlhf_fast.models import RoleModel
from rlhf_fast.trainers import ConfigError, OptimConfig, PPOConfig, train_ppo
from rlhf_fast.trainers.ppo import minibatch_rows, ppo_minibatch_loss, ppo_policy_loss, ppo_value_loss
from tests.tolerances import assert_close

GOOD = torch.arange(3, 27)  # a quarter of the vocabulary: the toy reward is their share of the response


def cfg(tiny_model, data_files, out, **kw):
    base = dict(model=tiny_model, data=data_files["prompts"], out_dir=str(out), batch_size=8, max_steps=3,
                response_length=6, ppo_epochs=2, num_minibatches=2, progress=False, optim=OptimConfig(lr=1e-2))
    return PPOConfig(**(base | kw))


def share_of_good(seq, attn, resp):
    return (torch.isin(seq, GOOD) & (resp != 0)).sum(1).float() / resp.sum(1).clamp(min=1)


def good_mass(model) -> float:
    """Mean probability the policy gives the rewarded tokens as a first response token: a low-noise view of
    what PPO should raise (the sampled scores of a few small batches are too noisy to assert on)."""
    ids = torch.tensor([[10, 11, 12], [13, 14, 15], [16, 17, 18], [30, 31, 32]])
    with torch.no_grad(), model.role("policy"):
        p = model.lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].softmax(-1)
    return float(p[:, GOOD].sum(-1).mean())


def test_rewarded_tokens_become_likely_and_only_policy_and_critic_move(tiny_model, data_files, tmp_path):
    model = RoleModel.from_pretrained(tiny_model)
    before, mass0 = trainable_snapshot(model), good_mass(model)
    # all 24 prompts per step in 4 minibatches: seeds 0-9 (torch.manual_seed before the model, the config's seed)
    # moved the mass from 0.31 to 0.45-0.75 with the lean LoRA forward and 0.50-0.76 with PEFT's (2026-12-06; batches
    # of 16 in 2 minibatches: 0.47-0.92), so the bar is +0.10: an untrained policy stays at 0.31
    train_ppo(cfg(tiny_model, data_files, tmp_path, max_steps=8, batch_size=24, num_minibatches=4,
                  response_length=4, kl_coef=0.01, ppo_epochs=4, optim=OptimConfig(lr=3e-2)),
              model=model, reward_fn=share_of_good)
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert good_mass(model) > mass0 + 0.10, (mass0, good_mass(model))
    for key in ("objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
                "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                "val/clipfrac_avg", "val/ratio", "tokens/s", "peak_memory_mb", "skipped_steps"):
        assert key in rows[-1], key
    allowed = {n for n, p in model.named_parameters()
               if any(p is q for q in model.role_parameters("policy") + model.role_parameters("critic"))}
    changed = moved(before, model)
    assert changed and changed <= allowed
    assert any(".policy." in n for n in changed) and "value_head.weight" in changed


# A hand-made rollout batch: left-padded prompts, responses ending in <eos> (1) then right padding, a hole in
# row 1's response mask. T = 10, N = 40 rows for the Triton grid.
SEQ = torch.tensor([[0, 0, 10, 11, 20, 21, 22, 1, 0, 0],
                    [12, 13, 14, 15, 23, 24, 25, 26, 27, 28],
                    [0, 16, 17, 18, 29, 1, 0, 0, 0, 0],
                    [0, 0, 0, 19, 30, 31, 32, 33, 1, 0]])
ATTN = (SEQ != 0).long()
RESPONSE = torch.zeros_like(SEQ, dtype=torch.float32)
RESPONSE[:, 4:] = ATTN[:, 4:].float()
RESPONSE[1, 6] = 0.0
# (ratio, sign of the advantage) cycled over the response tokens so that every branch of the surrogate is
# taken: A > 0 below the clip, inside [1.2, 1.28] (clipped only if clip_high were clip_low), above it;
# A < 0 below it (clipped), inside, and above dual_clip = 3 (capped at -3 A).
BRANCHES = [(0.5, 1.0), (1.25, 1.0), (1.5, 1.0), (0.5, -1.0), (4.0, -1.0), (1.1, -1.0)]
PPO_OPTIONS = dict(temperature=0.7, entropy_coef=0.01, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                   value_clip=0.2, vf_coef=0.1, loss_agg="token-mean")


def rollout_batch(logprobs, values) -> dict:
    """old log-probs and values placed at known distances from the current ones (float64 (B, T) inputs)."""
    g = torch.Generator().manual_seed(0)
    old, adv = torch.zeros_like(logprobs), torch.zeros_like(logprobs)
    for k, (b, t) in enumerate(RESPONSE.nonzero().tolist()):
        ratio, sign = BRANCHES[k % len(BRANCHES)]
        old[b, t] = logprobs[b, t] - math.log(ratio)
        adv[b, t] = sign * (0.5 + float(torch.rand((), generator=g)))
    # old values 0.5 (beyond value_clip: clipped branch possible) or 0.1 (inside) away, random returns
    shift = torch.tensor([0.5, -0.1, -0.5, 0.1]).repeat(SEQ.numel() // 4).reshape(SEQ.shape)
    returns = values + torch.randn(SEQ.shape, generator=g, dtype=torch.float64)
    return {"seq": SEQ, "attn": ATTN, "mask": RESPONSE, "logprobs": (old * RESPONSE).float(),
            "values": ((values + shift) * RESPONSE).float(), "adv": (adv * RESPONSE).float(),
            "returns": (returns * RESPONSE).float()}


def reference_values(model64, seq, attn):
    """(B, T) float64: the value head on the critic's final hidden state at t - 1."""
    _, hidden = materialised(model64, seq, attn, "critic")
    return torch.nn.functional.pad(model64.value_head(hidden[:, :-1]).squeeze(-1), (1, 0))


def reference_ppo_loss(model64, b: dict, o: dict):
    """ppo_minibatch_loss written plainly in float64 from materialised logits (Schulman et al. 2017, eq. 9):
    token-mean over the response tokens of max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), capped at -3 A
    where A < 0, minus entropy_coef * entropy; plus vf_coef * the clipped value loss."""
    seq, attn = b["seq"], b["attn"]
    m = b["mask"].double()  # every response token has a real token before it
    logits, _ = materialised(model64, seq, attn, "policy")
    z = logits / o["temperature"]  # (B, T, V)
    lp = next_token_logprobs(z, seq)  # (B, T)
    logp = z.log_softmax(-1)[:, :-1]
    entropy = torch.nn.functional.pad(-(logp.exp() * logp).sum(-1), (1, 0))  # (B, T): of the distribution at t - 1
    old, adv = b["logprobs"].double(), b["adv"].double()
    ratio = torch.exp(lp - old)
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - o["clip_low"], 1 + o["clip_high"]))
    surrogate = torch.where(adv < 0, torch.minimum(surrogate, -adv * o["dual_clip"]), surrogate)
    mean = lambda x: (x * m).sum() / m.sum()  # noqa: E731
    policy = mean(surrogate) - o["entropy_coef"] * mean(entropy)

    v = reference_values(model64, seq, attn)
    old_v, ret = b["values"].double(), b["returns"].double()
    v_clipped = old_v + (v - old_v).clamp(-o["value_clip"], o["value_clip"])
    value = mean(0.5 * torch.maximum((v - ret) ** 2, (v_clipped - ret) ** 2))
    return policy, value, ratio


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_minibatch_loss_and_gradients_equal_float64_materialised_logits(tiny_model, data_files, tmp_path,
                                                                        backend, monkeypatch):
    if backend == "triton":
        require_triton_on_cpu()
    c = cfg(tiny_model, data_files, tmp_path, **PPO_OPTIONS)
    model = RoleModel.from_pretrained(tiny_model).eval()
    perturb(model.role_parameters("policy") + model.role_parameters("critic"))
    model64 = float64_twin(model, tiny_model)
    with torch.no_grad():
        lp_now = next_token_logprobs(materialised(model64, SEQ, ATTN, "policy")[0] / c.temperature, SEQ)
        v_now = reference_values(model64, SEQ, ATTN)
    b = rollout_batch(lp_now, v_now)

    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    if backend == "triton":
        from rlhf_fast.kernels import ppo_loss as kernels

        calls = count_calls(monkeypatch, kernels, "linear_ppo_loss_fwd")
    params = model.role_parameters("policy") + model.role_parameters("critic")
    loss, stats = ppo_minibatch_loss(model, c, b, torch.arange(SEQ.shape[0]))
    grads = torch.autograd.grad(loss, params)
    if backend == "triton":
        assert calls == {"linear_ppo_loss_fwd": 1}

    policy, value, ratio = reference_ppo_loss(model64, b, PPO_OPTIONS)
    ref = policy + c.vf_coef * value
    ref_grads = torch.autograd.grad(ref, model64.role_parameters("policy") + model64.role_parameters("critic"))
    assert_close(stats["loss/policy_avg"], policy, torch.float32)
    assert_close(stats["loss/value_avg"], value, torch.float32)
    assert_close(loss, ref, torch.float32)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, torch.float32)
    assert_close(stats["val/ratio"], ratio[b["mask"].bool()].mean(), torch.float32)
    # train_ppo's order: the policy term's backward, then the critic's forward and backward (one graph at a time)
    for p in params:
        p.grad = None
    rows = minibatch_rows(c, b, torch.arange(SEQ.shape[0]))
    pg, _ = ppo_policy_loss(model, c, b, rows)
    pg.backward()
    assert all(p.grad is None for p in model.role_parameters("critic"))  # the policy term never reaches the critic
    vl, _ = ppo_value_loss(model, c, b, rows)
    vl.backward()
    assert_close(pg.detach() + vl.detach(), ref, torch.float32)
    for p, r in zip(params, ref_grads, strict=True):
        assert_close(p.grad, r, torch.float32)
    # make_experience marks the first response column: the loss then runs the lm head from it on only
    for p in params:
        p.grad = None
    sliced = dict(b, first_response=4)
    pg, pst = ppo_policy_loss(model, c, sliced, rows)
    pg.backward()
    ppo_value_loss(model, c, sliced, rows)[0].backward()
    assert_close(pst["loss/policy_avg"], policy, torch.float32)
    for p, r in zip(params, ref_grads, strict=True):
        assert_close(p.grad, r, torch.float32)
    # 3 of the 6 branches clip (A > 0 above 1.28, A < 0 below 0.8, A < 0 above dual_clip): 8 of the 16 tokens
    assert float(stats["policy/clipfrac_avg"]) == 0.5
    assert 0 < float(stats["val/clipfrac_avg"]) < 1  # both branches of the value loss are taken


def test_old_logprobs_from_generation_equal_the_recomputed_ones(tiny_model, data_files, tmp_path):
    """make_experience with old_logprobs generation (the default) takes the ratio's old log-probs from the decode
    loop and runs no policy forward; recompute runs it. Same samples, same log-probs up to float rounding, and
    the lm head skips the prompt's columns (0 there) on both paths."""
    from rlhf_fast.data.collate import collate_prompts
    from rlhf_fast.rl import kl_control
    from rlhf_fast.trainers.ppo import kl_controller, make_experience

    model = RoleModel.from_pretrained(tiny_model).eval()
    perturb(model.role_parameters("policy"))
    prompts = collate_prompts([{"prompt_ids": p} for p in ([5, 6, 7], [8, 9], [10, 11, 12, 13])], 0)
    out = {}
    for how in ("generation", "recompute"):
        c = cfg(tiny_model, data_files, tmp_path / how, old_logprobs=how, temperature=0.7)
        torch.manual_seed(0)
        forwards = []  # (active adapter, columns) of every backbone forward
        hook = model.backbone.register_forward_pre_hook(
            lambda mod, a, k, seen=forwards: seen.append((model._active, k["input_ids"].shape[1])), with_kwargs=True)
        try:
            out[how] = make_experience(model, c, prompts, None, kl_controller(c), kl_control.RunningMoments())
        finally:
            hook.remove()
        out[how]["forwards"] = forwards
    gen, rec = out["generation"], out["recompute"]
    assert torch.equal(gen["seq"], rec["seq"]) and torch.equal(gen["mask"], rec["mask"])
    assert gen["rollout_stats"]["rollout/old_logprobs_from_generation"] == 1.0
    assert rec["rollout_stats"]["rollout/old_logprobs_from_generation"] == 0.0
    m = gen["mask"]
    assert (gen["logprobs"][m == 0] == 0).all() and (rec["logprobs"][m == 0] == 0).all()
    assert_close(gen["logprobs"], rec["logprobs"].double(), torch.float32)
    assert rec["first_response"] == gen["first_response"] == 4
    with torch.no_grad():
        full = model.logprobs(rec["seq"], rec["attn"], "policy", temperature=0.7)
    assert_close(rec["logprobs"][:, 4:], full[:, 4:].double(), torch.float32)
    # after the rollout's prefill (over the prompts): over the whole sequences, reference, critic and reward;
    # recompute adds the policy's
    t = gen["seq"].shape[1]
    for o, n in ((gen, 3), (rec, 4)):
        assert [w for _, w in o["forwards"]] == [4] + [t] * n, o["forwards"]
        assert [r for r, _ in o["forwards"][-2:]] == ["critic", "reward"]


def test_one_minibatch_takes_the_old_values_from_the_first_critic_forward(tiny_model, data_files, tmp_path):
    """With one minibatch train_ppo skips the experience step's critic forward (make_experience(critic=False)):
    the first update's critic forward, over the whole batch at the rollout's weights, gives the old values, and
    with them the same advantages, returns, losses and gradients as the experience step's no-grad forward."""
    from rlhf_fast.data.collate import collate_prompts
    from rlhf_fast.rl import kl_control
    from rlhf_fast.trainers.ppo import kl_controller, make_experience

    model = RoleModel.from_pretrained(tiny_model).eval()
    perturb(model.role_parameters("policy") + model.role_parameters("critic"))
    prompts = collate_prompts([{"prompt_ids": p} for p in ([5, 6, 7], [8, 9], [10, 11, 12, 13], [14])], 0)
    c = cfg(tiny_model, data_files, tmp_path, num_minibatches=1, kl_coef=0.3, temperature=0.7)
    policy, critic = model.role_parameters("policy"), model.role_parameters("critic")
    out = {}
    for with_critic in (True, False):
        torch.manual_seed(0)
        forwards = []  # the active adapter of every backbone forward
        hook = model.backbone.register_forward_pre_hook(
            lambda mod, a, k, seen=forwards: seen.append(model._active), with_kwargs=True)
        try:
            b = make_experience(model, c, prompts, None, kl_controller(c), kl_control.RunningMoments(),
                                critic=with_critic)
            experience_forwards = list(forwards)
            rows = minibatch_rows(c, b, torch.tensor([2, 0, 3, 1]))  # a permutation, as D.minibatches draws it
            if not with_critic:
                assert b["values"] is None and b["adv"] is None
                with pytest.raises(ValueError, match="no advantages yet"):
                    ppo_policy_loss(model, c, b, rows)
                with pytest.raises(ValueError, match="whole rollout batch"):
                    ppo_value_loss(model, c, b, minibatch_rows(c, b, torch.tensor([0, 1])))
                assert b["values"] is None  # the refused call left the batch as it was
            vl, vst = ppo_value_loss(model, c, b, rows)
            critic_grads = torch.autograd.grad(vl, critic)
            pg, pst = ppo_policy_loss(model, c, b, rows)
            policy_grads = torch.autograd.grad(pg, policy)
        finally:
            hook.remove()
        out[with_critic] = dict(b=b, forwards=experience_forwards, vl=vl, pg=pg, grads=critic_grads + policy_grads,
                                clipfrac=vst["val/clipfrac_avg"])
    full, deferred = out[True], out[False]
    assert full["forwards"].count("critic") == 1 and "critic" not in deferred["forwards"]
    assert len(deferred["forwards"]) == len(full["forwards"]) - 1
    assert torch.equal(full["b"]["seq"], deferred["b"]["seq"])
    m = full["b"]["mask"].bool()
    for k in ("values", "adv", "returns"):
        assert_close(deferred["b"][k][m], full["b"][k][m].double(), torch.float32)
    assert_close(deferred["b"]["kl"], full["b"]["kl"].double(), torch.float32)
    assert float(full["b"]["kl"].abs().sum()) > 0  # a perturbed policy: the KL term shapes the advantages
    assert_close(deferred["vl"], full["vl"].double(), torch.float32)
    assert_close(deferred["pg"], full["pg"].double(), torch.float32)
    for g, r in zip(deferred["grads"], full["grads"], strict=True):
        assert_close(g, r.double(), torch.float32)
    assert float(deferred["clipfrac"]) == 0.0  # values equal to the old ones: the value clip is inactive


def test_triton_run_trains_like_a_torch_run(tiny_model, data_files, tmp_path, monkeypatch):
    """One PPO step (rollout, experience, GAE, 2 epochs x 2 minibatches) with every op on Triton lands where the
    torch backend lands."""
    require_triton_on_cpu()
    from rlhf_fast.kernels import ppo_loss as kernels

    calls = count_calls(monkeypatch, kernels, "linear_ppo_loss_fwd")
    finals, rows = [], []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
        torch.manual_seed(0)  # the LoRA A matrices are drawn from the global RNG
        model = RoleModel.from_pretrained(tiny_model)
        r = train_ppo(cfg(tiny_model, data_files, tmp_path / backend, max_steps=1), model=model)
        finals.append([p.detach().clone() for p in model.role_parameters("policy") + model.role_parameters("critic")])
        rows.append(r["metrics"])
    assert calls["linear_ppo_loss_fwd"] == 4  # the Triton run's 4 updates, none of the torch run's
    # 4 Adam updates divide by sqrt(v): fp32 rounding differences of near-zero gradients grow to ~1e-5
    for a, b in zip(*finals, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    for k in ("loss/policy_avg", "loss/value_avg", "objective/kl"):
        assert rows[0][k] == pytest.approx(rows[1][k], rel=1e-4, abs=1e-6)


def test_adaptive_kl_ptx_and_score_options(tiny_model, data_files, tmp_path):
    r = train_ppo(model=RoleModel.from_pretrained(tiny_model), cfg=cfg(tiny_model, data_files, tmp_path, max_steps=2, kl_controller="adaptive", kl_target=0.01,
                      kl_horizon=100, ptx_data=data_files["ptx"], ptx_coef=0.5, normalize_scores=True,
                      score_clip=1.0, missing_eos_penalty=1.0, whiten_advantages=False, kl_estimator="k3"))
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert rows[1]["objective/kl_coef"] != 0.05  # the controller moved beta after the first batch
    assert rows[-1]["loss/ptx_avg"] > 0
    assert r["metrics"]["skipped_steps"] == 0


def test_non_finite_steps_are_skipped_and_counted(tiny_model, data_files, tmp_path):
    model = RoleModel.from_pretrained(tiny_model)
    before = trainable_snapshot(model)
    r = train_ppo(cfg(tiny_model, data_files, tmp_path, max_steps=1, whiten_advantages=False), model=model,
                  reward_fn=lambda s, a, m: torch.full((s.shape[0],), float("nan")))
    assert r["metrics"]["skipped_steps"] == 4  # 2 epochs x 2 minibatches, all refused
    assert not moved(before, model)


@pytest.mark.parametrize("field, value, needle", [
    ("kl_coef", -0.1, "kl_coef must be >= 0"),
    ("clip_low", 0.0, "clip_low must be > 0"),
    ("lam", 1.5, "lam must lie in [0, 1]"),
    ("gamma", -0.1, "gamma must lie in [0, 1]"),
    ("dual_clip", 0.9, "dual_clip must be > 1"),
    ("response_length", 600, "response_length must lie in"),
    ("num_minibatches", 9, "num_minibatches must lie in"),
    ("old_logprobs", "engine", "old_logprobs"),
])
def test_bad_options_are_refused_before_anything_is_written(data_files, tmp_path, field, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        train_ppo(PPOConfig(model="unused", data=data_files["prompts"], out_dir=str(tmp_path / "o"),
                            **{field: value}))
    assert not (tmp_path / "o").exists()
