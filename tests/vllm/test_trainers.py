"""The trainers with --rollout vllm: PPO and GRPO train, log vLLM's log-prob differences and resume exactly (the
engine rebuilt, the adapter re-sent); online DPO, RAFT and the best-of-n command sample through vLLM."""

from __future__ import annotations

import json
import os

import torch

from rlhf_fast.rl.best_of_n import main as best_of_n_main
from rlhf_fast.trainers import (
    DPOConfig,
    GRPOConfig,
    OptimConfig,
    PPOConfig,
    RAFTConfig,
    train_dpo,
    train_grpo,
    train_ppo,
    train_raft,
)
from tests.tiny import write_jsonl
from tests.vllm.conftest import needs_vllm

pytestmark = needs_vllm

GOOD = torch.arange(3, 27)  # a quarter of the tiny vocabulary


def share_of_good(seq, attn, resp):
    return (torch.isin(seq, GOOD) & (resp != 0)).sum(1).float() / resp.sum(1).clamp(min=1)


def good_words(prompts, completions, **_):
    return [sum(int(w[1:]) in range(3, 27) for w in c.split() if w[1:].isdigit()) / max(1, len(c.split()))
            for c in completions]


def policy_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.peft.named_parameters() if ".policy." in n}


def rows(out) -> list[dict]:
    return [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]


def check_resume_is_exact(train, make_cfg, tmp_path):
    """2 steps straight vs 1 step, then --resume to 2: the same policy adapter."""
    straight = train(make_cfg(tmp_path / "a", max_steps=2))
    train(make_cfg(tmp_path / "b", max_steps=1))
    resumed = train(make_cfg(tmp_path / "b", max_steps=2, resume=True))
    a, b = policy_state(straight["model"]), policy_state(resumed["model"])
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    return rows(tmp_path / "a"), rows(tmp_path / "b")


def test_ppo_trains_logs_the_logprob_gap_and_resumes(llama, data_files, tmp_path):
    def make_cfg(out, **kw):
        return PPOConfig(**dict(model=llama, data=data_files["prompts"], out_dir=str(out), batch_size=4,
                                response_length=5, ppo_epochs=2, num_minibatches=2, progress=False,
                                max_length=64, rollout="vllm", checkpoint_every=1,
                                optim=OptimConfig(lr=1e-2)) | kw)

    full, resumed = check_resume_is_exact(lambda c: train_ppo(c, reward_fn=share_of_good), make_cfg, tmp_path)
    assert [r["step"] for r in full] == [1, 2] and [r["step"] for r in resumed] == [1, 2]
    for r in full:
        assert 0 <= r["rollout/logprob_diff_max"] <= 1e-4  # fp32 on both sides
        assert abs(r["rollout/is_weight_mean"] - 1) < 1e-3
    # the rollout of step 2 came from the adapter after step 1's updates: pushed again
    assert [r["rollout/adapter_syncs"] for r in full] == [1, 2]
    assert resumed[-1]["rollout/adapter_syncs"] == 1  # a rebuilt engine, the checkpoint's adapter sent


def test_grpo_trains_logs_the_logprob_gap_and_resumes(llama, data_files, tmp_path):
    def make_cfg(out, **kw):
        return GRPOConfig(**dict(model=llama, data=data_files["prompts"], out_dir=str(out), batch_size=2,
                                 num_generations=4, max_completion_length=5, progress=False, max_length=64,
                                 rollout="vllm", checkpoint_every=1, reward_funcs="(given)",
                                 optim=OptimConfig(lr=1e-2)) | kw)

    full, _ = check_resume_is_exact(lambda c: train_grpo(c, reward_funcs=[good_words]), make_cfg, tmp_path)
    for r in full:
        assert 0 <= r["rollout/logprob_diff_max"] <= 1e-4
    assert [r["rollout/adapter_syncs"] for r in full] == [1, 2]


def test_tis_weights_scale_the_policy_gradient(llama, data_files, tmp_path, monkeypatch):
    """With a cap below every weight, each token's weight is the cap: the update equals the uncorrected one with
    the advantages times the cap (none), so the correction really reaches the loss."""
    from rlhf_fast.trainers import ppo

    seen = []
    real = ppo.ppo_policy_loss

    def record(model, cfg, b, rows):
        seen.append(b["adv"][rows.idx].clone())
        return real(model, cfg, b, rows)

    monkeypatch.setattr(ppo, "ppo_policy_loss", record)
    common = dict(model=llama, data=data_files["prompts"], batch_size=4, response_length=5, ppo_epochs=1,
                  num_minibatches=1, progress=False, max_length=64, rollout="vllm", max_steps=1,
                  optim=OptimConfig(lr=1e-2))
    train_ppo(PPOConfig(out_dir=str(tmp_path / "none"), rollout_is_correction="none", **common),
              reward_fn=share_of_good)
    train_ppo(PPOConfig(out_dir=str(tmp_path / "cap"), rollout_is_cap=0.5, **common), reward_fn=share_of_good)
    plain, capped = seen
    torch.testing.assert_close(capped, plain * 0.5, rtol=1e-5, atol=1e-7)  # every weight ~1 > 0.5: capped


def test_online_dpo_samples_pairs_through_vllm(llama, data_files, tmp_path):
    train_dpo(DPOConfig(model=llama, data=data_files["prompts"], out_dir=str(tmp_path), batch_size=4, max_steps=2,
                        online=True, max_completion_length=4, max_length=64, rollout="vllm", progress=False,
                        optim=OptimConfig(lr=1e-2)), reward_funcs=[good_words])
    r = rows(tmp_path)
    assert [x["online/pairs"] + x["online/tied_pairs"] for x in r] == [4, 4]
    assert [x["rollout/adapter_syncs"] for x in r] == [1, 2]


def test_raft_rounds_sample_through_vllm(llama, data_files, tmp_path):
    res = train_raft(RAFTConfig(model=llama, data=data_files["prompts"], out_dir=str(tmp_path), rounds=2, n=4,
                                max_completion_length=4, batch_size=4, max_steps=2, prompts_per_round=6,
                                max_length=64, progress=False, reward_funcs="(given)", rollout="vllm",
                                optim=OptimConfig(lr=1e-2)), reward_funcs=[good_words])
    assert [r["rollout/adapter_syncs"] for r in res["rounds"]] == [1, 2]  # round 1's SFT pushed again
    picks = [json.loads(ln) for ln in open(tmp_path / "round_1" / "picks.jsonl")]
    assert len(picks) == 6 and all(p["score"] is not None for p in picks)


def test_best_of_n_command(llama, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w5 w6 w7"}, {"prompt": "w8 w9"}])
    out = tmp_path / "picks.jsonl"
    code = best_of_n_main(["--model", llama, "--data", data, "--n", "4", "--reward_funcs",
                           "tests.vllm.test_trainers:good_words", "--out", str(out), "--max_new_tokens", "4",
                           "--max_length", "64", "--rollout", "vllm", "--no-progress"])
    assert code == 0
    picks = [json.loads(ln) for ln in open(out)]
    assert len(picks) == 2 and all(len(p["all"]) == 4 for p in picks)
    assert all(p["score"] == max(s["score"] for s in p["all"]) for p in picks)



def test_grpo_dynamic_sampling_concatenates_vllm_logprobs(llama, data_files, tmp_path, monkeypatch):
    """DAPO's resampling joins several rollouts: vLLM's log-probs are padded and selected with them (a reward that
    is flat for most groups forces the resampling)."""
    from rlhf_fast.trainers import grpo

    def rare(prompts, completions, **_):  # 1 for completions holding w5, else 0: most groups are flat
        return [float("w5" in c.split()) for c in completions]

    calls = []
    real = grpo.make_groups
    monkeypatch.setattr(grpo, "make_groups", lambda *a, **k: calls.append(1) or real(*a, **k))

    train_grpo(GRPOConfig(model=llama, data=data_files["prompts"], out_dir=str(tmp_path), batch_size=2,
                          num_generations=4, max_completion_length=5, progress=False, max_length=64, max_steps=2,
                          loss_type="dapo", max_resample_batches=3, rollout="vllm", reward_funcs="(given)",
                          optim=OptimConfig(lr=1e-2)), reward_funcs=[rare])
    r = rows(tmp_path)
    assert len(r) == 2 and all(0 <= x["rollout/logprob_diff_max"] <= 1e-4 for x in r)
    assert all("dynamic_sampling/kept_groups" in x for x in r)
    assert len(calls) > 2  # some step resampled: its rollouts were concatenated
