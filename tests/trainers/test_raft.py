"""RAFT: rounds of Best-of-N then SFT on the picks. Two rounds write their picks and metrics, the policy adapter
moves, what SFT trains on is exactly each prompt's best sample, and bad options are refused before anything is
written."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_fixtures import moved, trainable_snapshot

import rlhf_fast.trainers.raft as raft
from rlhf_fast.models import RoleModel
from rlhf_fast.trainers import ConfigError, OptimConfig, RAFTConfig, train_raft


def count_w7(prompts, completions, **_):
    return [float(c.split().count("w7")) - 0.01 * len(c.split()) for c in completions]


def cfg(tiny_model, data, out, **kw):
    base = dict(model=tiny_model, data=data, out_dir=str(out), rounds=2, n=4, max_completion_length=4,
                batch_size=4, max_steps=2, progress=False, reward_funcs="(given)", prompts_per_round=6,
                optim=OptimConfig(lr=1e-2))
    return RAFTConfig(**(base | kw))


def test_two_rounds_train_on_the_best_picks(tiny_model, data_files, tmp_path, monkeypatch):
    seen = []
    real_sft = raft.train_sft

    def recording_sft(sft_cfg, **kw):
        seen.append((sft_cfg, kw["examples"]))
        return real_sft(sft_cfg, **kw)

    monkeypatch.setattr(raft, "train_sft", recording_sft)
    model = RoleModel.from_pretrained(tiny_model)
    before = trainable_snapshot(model)
    res = train_raft(cfg(tiny_model, data_files["prompts"], tmp_path), model=model, reward_funcs=[count_w7])

    changed = moved(before, model)
    assert changed and all(".policy." in n for n in changed), sorted(changed)[:5]
    assert len(seen) == 2 and seen[1][0].out_dir == str(tmp_path / "round_1" / "sft") and not seen[0][0].merge
    tok = model.tokenizer
    for k, (_, examples) in enumerate(seen):
        picks = [json.loads(ln) for ln in open(tmp_path / f"round_{k}" / "picks.jsonl")]
        assert len(picks) == 6 == len(examples) and all(p["rank"] == 0 and p["n"] == 4 for p in picks)
        for p, e in zip(picks, examples):
            # the SFT example is the pick: its prompt, and the sampled tokens of the best completion
            assert tok.decode(e["completion_ids"], skip_special_tokens=True) == p["completion"]
            assert p["score"] == pytest.approx(count_w7(None, [p["completion"]])[0])
        assert (tmp_path / f"round_{k}" / "sft" / "model").is_dir()
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [r["round"] for r in rows] == [0, 1] and rows == res["rounds"]
    for r in rows:
        assert r["raft/best_score_mean"] >= r["raft/score_mean"]
        assert r["raft/best_score_mean"] == pytest.approx(r["raft/pick_score_mean"])
        assert {"sft/loss", "sft/examples", "completions/mean_length"} <= set(r)
    assert (tmp_path / "model" / "adapters" / "policy" / "adapter_model.safetensors").is_file()
    # the saved policy is the trained one
    loaded = RoleModel.load(tmp_path / "model")
    ids = torch.tensor([[10, 11, 12, 13]])
    assert torch.allclose(loaded.logprobs(ids, torch.ones_like(ids)), model.logprobs(ids, torch.ones_like(ids)),
                          atol=1e-5)


def test_top_k_keeps_k_picks_per_prompt(tiny_model, data_files, tmp_path):
    train_raft(cfg(tiny_model, data_files["prompts"], tmp_path, rounds=1, keep="top-k", top_k=2, max_steps=1),
               reward_funcs=[count_w7])
    picks = [json.loads(ln) for ln in open(tmp_path / "round_0" / "picks.jsonl")]
    assert len(picks) == 12 and [p["rank"] for p in picks[:4]] == [0, 1, 0, 1]
    assert all(picks[i]["score"] >= picks[i + 1]["score"] for i in range(0, 12, 2))


@pytest.mark.parametrize("bad, needle", [(dict(n=0), "n (samples per prompt)"), (dict(rounds=0), "rounds"),
                                         (dict(reward_funcs=""), "exactly one of"),
                                         (dict(reward_model="x", reward_funcs="format"), "exactly one of"),
                                         (dict(resume=True), "resume")])
def test_bad_options_write_nothing(tiny_model, data_files, tmp_path, bad, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        train_raft(cfg(tiny_model, data_files["prompts"], tmp_path / "out", **bad))
    assert not (tmp_path / "out").exists()
