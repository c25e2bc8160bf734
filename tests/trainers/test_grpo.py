"""GRPO: the policy learns what a verifiable reward pays for; presets set defaults that flags override; beta = 0
runs no reference pass and beta > 0 does; DAPO's dynamic sampling drops flat groups; bad input is refused
before training."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_fixtures import write_jsonl

from rlhf_fast.models import RoleModel
from rlhf_fast.rl.rewards import completion_texts
from rlhf_fast.trainers import ConfigError, OptimConfig
from rlhf_fast.trainers.grpo import GRPOConfig, fill_unscored, overlong_shaping, train_grpo

GOOD = {f"w{i}" for i in range(3, 27)}  # a quarter of the tiny vocabulary


def good_share(prompts, completions, **_):
    """The verifiable reward: the share of the completion's words that are in GOOD."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(w in GOOD for w in words) / max(1, len(words)))
    return out


def sampled_share(model, tokenizer) -> float:
    """Mean reward of 4 samples for each of 16 held-out prompts, with a fixed generator: what GRPO raises."""
    ids = torch.tensor([[40 + i, 41 + i, 42 + i] for i in range(16)]).repeat_interleave(4, 0)
    g = torch.Generator().manual_seed(123)
    out = model.generate(ids, torch.ones_like(ids), max_new_tokens=4, temperature=1.0, generator=g)
    text = completion_texts(tokenizer, out["sequences"], out["response_mask"])
    return sum(good_share(None, text)) / len(text)


def cfg(tiny_model, data, out, **kw):
    base = dict(model=tiny_model, data=data, out_dir=str(out), batch_size=4, num_generations=4, max_steps=2,
                max_completion_length=4, progress=False, reward_funcs="test_grpo:good_share",
                optim=OptimConfig(lr=1e-2))
    return GRPOConfig(**(base | kw))


def test_policy_learns_the_rewarded_tokens(tiny_model, data_files, tmp_path):
    model = RoleModel.from_pretrained(tiny_model)
    share0 = sampled_share(model, model.tokenizer)
    # seeds 0-4 of this run took the held-out share from 0.30 to 0.87-0.96
    train_grpo(cfg(tiny_model, data_files["prompts"], tmp_path, max_steps=12, batch_size=8, num_generations=4,
                   optim=OptimConfig(lr=2e-2)), model=model, reward_funcs=[good_share])
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert sampled_share(model, model.tokenizer) > share0 + 0.3, (share0, sampled_share(model, model.tokenizer))
    assert rows[-1]["reward"] > rows[0]["reward"]
    for key in ("reward", "reward_std", "rewards/good_share/mean", "frac_reward_zero_std", "entropy",
                "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "completions/mean_length", "completions/clipped_ratio", "tokens/s",
                "peak_memory_mb", "loss"):
        assert key in rows[-1], key
    assert (tmp_path / "model" / "adapters" / "policy" / "adapter_model.safetensors").is_file()


def test_presets_set_defaults_that_flags_override():
    c = GRPOConfig(loss_type="dr_grpo")
    assert c.resolved()["loss_agg"] == "seq-mean-token-sum-norm" and c.resolved()["scale_rewards"] == "none"
    d = GRPOConfig(loss_type="dapo", max_completion_length=64, clip_high=0.3)
    r = d.resolved()
    assert r["clip_high"] == 0.3 and r["dynamic_sampling"] and r["overlong_buffer"] == 16
    g = GRPOConfig(loss_type="gspo")
    assert g.resolved()["ratio_level"] == "sequence" and g.resolved()["clip_low"] == 3e-4
    assert GRPOConfig(loss_type="rloo").resolved()["advantage_estimator"] == "rloo"
    assert GRPOConfig(loss_type="reinforce_pp").resolved()["scale_rewards"] == "batch"
    assert GRPOConfig().resolved()["clip_low"] == 0.2


@pytest.mark.parametrize("beta,passes", [(0.0, 0), (0.1, 1)])
def test_reference_pass_only_with_beta(tiny_model, data_files, tmp_path, beta, passes, monkeypatch):
    model = RoleModel.from_pretrained(tiny_model)
    roles = []
    real = model.logprobs

    def logprobs(*a, role="policy", **kw):
        roles.append(role)
        return real(*a, role=role, **kw)

    monkeypatch.setattr(model, "logprobs", logprobs)
    train_grpo(cfg(tiny_model, data_files["prompts"], tmp_path, max_steps=1, beta=beta), model=model,
               reward_funcs=[good_share])
    assert roles.count("reference") == passes
    row = json.loads(open(tmp_path / "metrics.jsonl").readlines()[-1])
    assert ("kl" in row) == (beta > 0)


def test_exact_kl_runs(tiny_model, data_files, tmp_path):
    train_grpo(cfg(tiny_model, data_files["prompts"], tmp_path, max_steps=1, beta=0.1, kl_estimator="full"),
               reward_funcs=[good_share])
    row = json.loads(open(tmp_path / "metrics.jsonl").readlines()[-1])
    assert row["kl"] >= 0


def test_dynamic_sampling_drops_flat_groups(tiny_model, tmp_path):
    # half the prompts get a constant reward (their groups carry no signal), the rest a varying one
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"w{10 + i} w11", "flat": i % 2} for i in range(16)])

    def reward(prompts, completions, flat, **_):
        return [0.5 if f else good_share([p], [c])[0] for p, c, f in zip(prompts, completions, flat)]

    train_grpo(cfg(tiny_model, data, tmp_path / "out", loss_type="dapo", max_steps=2, batch_size=4),
               reward_funcs=[reward])
    rows = [json.loads(ln) for ln in open(tmp_path / "out" / "metrics.jsonl")]
    assert all(0 <= r["frac_reward_zero_std"] <= 1 for r in rows)
    assert any(r["frac_reward_zero_std"] > 0 for r in rows)  # flat groups were drawn ...
    assert all(r["dynamic_sampling/kept_groups"] == 4 for r in rows)  # ... and replaced by resampled ones


def test_overlong_shaping_and_unscored_samples():
    lengths = torch.tensor([10, 12, 14, 16])
    torch.testing.assert_close(overlong_shaping(lengths, 16, 4, 1.0), torch.tensor([0.0, 0.0, -0.5, -1.0]))
    assert torch.all(overlong_shaping(lengths, 16, 0, 1.0) == 0)
    r = torch.tensor([1.0, float("nan"), 3.0, float("nan"), float("nan"), float("nan")])
    torch.testing.assert_close(fill_unscored(r, 2), torch.tensor([1.0, 1.0, 3.0, 3.0, 0.0, 0.0]))


@pytest.mark.parametrize("kw,needle", [
    (dict(num_generations=1), "num_generations"),
    (dict(loss_type="ppo"), "loss_type"),
    (dict(beta=-1.0), "beta"),
    (dict(clip_low=float("inf")), "clip_low"),
    (dict(reward_funcs=""), "reward_funcs"),
    (dict(max_completion_length=0), "max_completion_length"),
])
def test_bad_options(tiny_model, data_files, tmp_path, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        train_grpo(cfg(tiny_model, data_files["prompts"], tmp_path, **kw))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_column_is_refused_before_training(tiny_model, data_files, tmp_path):
    with pytest.raises(ConfigError, match="answer"):
        train_grpo(cfg(tiny_model, data_files["prompts"], tmp_path, reward_funcs="accuracy"))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_on_policy_step_takes_old_logprobs_from_its_own_forward(tiny_model):
    """With one update per rollout the loss reads the old log-probs off its own forward; loss and gradients equal
    those with the old log-probs from a separate no-grad pass (model.logprobs), as num_iterations > 1 uses."""
    from rlhf_fast.trainers.grpo import grpo_minibatch_loss

    model = RoleModel.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        for p in model.role_parameters("policy"):
            p.normal_(0.0, 0.05)
    seq = torch.tensor([[0, 10, 11, 20, 21, 1], [12, 13, 14, 22, 23, 24]])
    attn = (seq != 0).long()
    mask = torch.zeros(2, 6)
    mask[:, 3:] = attn[:, 3:].float()
    b = {"seq": seq, "attn": attn, "mask": mask, "adv": torch.tensor([0.7, -1.3])}
    c = GRPOConfig(reward_funcs="x")
    params = model.role_parameters("policy")
    grads = []
    for old in (None, model.logprobs(seq, attn).detach()):
        loss, st = grpo_minibatch_loss(model, c, b | {"old": old}, torch.arange(2))
        grads.append((loss.detach(), torch.autograd.grad(loss, params)))
        assert float(st["clip_ratio/region_mean"]) == 0.0
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-6)


def test_shared_prompt_pass_trains_as_the_plain_pass(tiny_model, data_files, tmp_path, monkeypatch):
    """shared_prefix (the default) runs each group's prompt once in the loss forward and the old-log-prob and
    reference passes, and keeps a group's samples in one micro-batch; a step of it (micro-batches of 4, two
    iterations, beta > 0) has the plain passes' loss and gradient norm."""
    calls = []
    real = RoleModel._hidden_shared_prefix
    monkeypatch.setattr(RoleModel, "_hidden_shared_prefix", lambda self, *a: calls.append(a[2]) or real(self, *a))
    rows = {}
    for share in (False, True):
        out = tmp_path / str(share)
        # lr 1e-12: the second iteration sees (all but) the same weights on both sides, see below
        train_grpo(cfg(tiny_model, data_files["prompts"], out, shared_prefix=share, micro_batch_size=4,
                       num_iterations=2, beta=0.05, seed=3, max_steps=1, optim=OptimConfig(lr=1e-12)),
                   reward_funcs=[good_share])
        rows[share] = json.loads(open(out / "metrics.jsonl").readline())
    # the old log-probs, the reference, then 2 iterations x 4 micro-batches of 4 samples (one group each)
    assert len(calls) == 2 + 8 and min(calls) > 0
    # (not the trained parameters: Adam moves every element by about lr whatever its gradient's size, so
    # rounding-level differences in a near-zero gradient become lr-sized ones; nor "kl", a statistic averaged per
    # micro-batch and weighted by rows, which moves with which samples share a micro-batch)
    for k in ("loss", "grad_norm", "reward"):
        assert rows[True][k] == pytest.approx(rows[False][k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_micro_batches_and_completion_columns_give_the_minibatch_loss(tiny_model, agg):
    """Gradient accumulation over micro-batches (shares from micro_batches) and scoring only the completion columns
    give the loss and gradients of the whole minibatch at once, for every aggregation; rows of unequal length, one
    row with no completion token."""
    from rlhf_fast.trainers.grpo import grpo_minibatch_loss, micro_batches

    model = RoleModel.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        for p in model.role_parameters("policy"):
            p.normal_(0.0, 0.05)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(3, 30, (5, 8), generator=g)
    attn = torch.ones_like(seq)
    attn[1, :2] = 0  # left padding
    mask = torch.zeros(5, 8)
    mask[:, 4:] = 1.0
    mask[2, 6:] = 0  # a short completion
    mask[3] = 0      # no completion token at all
    old = model.logprobs(seq, attn).detach() + 0.1 * torch.randn(5, 8, generator=g)
    b = {"seq": seq, "attn": attn, "mask": mask, "adv": torch.randn(5, generator=g), "old": old}
    c = GRPOConfig(reward_funcs="x", loss_agg=agg)
    params = model.role_parameters("policy")
    idx = torch.tensor([4, 0, 3, 1, 2])
    whole, _ = grpo_minibatch_loss(model, c, b, idx)
    want = torch.autograd.grad(whole, params)
    for size, first in ((1, 0), (2, 4), (0, 4)):
        parts = micro_batches(mask, idx, size, agg)
        assert abs(sum(s for _, s in parts) - 1.0) < 1e-12 and len(parts) == (5 if size == 1 else 3 if size else 1)
        loss = sum(grpo_minibatch_loss(model, c, b | {"first_completion": first}, sub)[0] * share
                   for sub, share in parts)
        got = torch.autograd.grad(loss, params)
        torch.testing.assert_close(loss, whole, rtol=1e-5, atol=1e-7)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
