"""DPO: every loss type's loss and adapter gradients equal a float64 twin's on materialised logits with the formula
written out here; on pairs ruled by one token the policy's preference margin grows on held-out pairs; precomputed
reference log-probs equal per-batch ones and are cached; a resumed run continues exactly; online DPO runs with
reward functions and with a reward-model folder; --ref_update_every moves the base; bad input is refused before
anything is written."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
import torch.nn.functional as F
from tiny_fixtures import float64_twin, materialised, next_token_logprobs, perturb, write_jsonl

from rlhf_fast.data.jsonl import DataError
from rlhf_fast.models import RoleModel
from rlhf_fast.rl.rewards import completion_texts
from rlhf_fast.trainers import ConfigError, DPOConfig, OptimConfig, RMConfig, train_dpo, train_rm
from rlhf_fast.trainers.dpo import collate_pairs, dpo_batch_loss, preference_pairs


def cfg(tiny_model, data, out, **kw):
    base = dict(model=tiny_model, data=data, out_dir=str(out), batch_size=4, max_steps=2, progress=False,
                optim=OptimConfig(lr=1e-2))
    return DPOConfig(**(base | kw))


def token_rule_pairs(n: int, seed: int, good: int = 10, bad: int = 11) -> list[dict]:
    """Rankings [chosen, rejected]: the same 3 random tokens with `good` (w7) or `bad` (w8) inserted somewhere."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(12, 60) for _ in range(rng.randrange(2, 5))]
        r, i = [rng.randrange(12, 60) for _ in range(rng.randrange(2, 5))], rng.randrange(3)
        out.append({"prompt_ids": prompt, "response_ids": [r[:i] + [good] + r[i:], r[:i] + [bad] + r[i:]]})
    return out


# ----------------------------------------------------------------------------------------- the float64 twin
def expected_loss(lt: str, pc, pr, rc, rr, beta: float, eps: float, gamma: float):
    """The papers' formulas in float64 (pc, pr: policy log-probs of chosen / rejected, summed or averaged;
    rc, rr: the reference's), each averaged over the batch."""
    h = (pc - rc) - (pr - rr)
    if lt == "sigmoid":  # DPO with cDPO's label smoothing (Rafailov et al. 2023; Mitchell 2023)
        return (-(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)).mean()
    if lt == "robust":  # rDPO (Chowdhury et al. 2024)
        return (((1 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)).mean()
    if lt == "hinge":  # SLiC
        return torch.relu(1 - beta * h).mean()
    if lt == "ipo":  # Azar et al. 2023, eq. 17
        return ((h - 1 / (2 * beta)) ** 2).mean()
    if lt == "simpo":  # Meng et al. 2024, eq. 6: gamma is the target margin
        z = beta * (pc - pr) - gamma
        return (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
    if lt == "orpo":  # Hong et al. 2024, eq. 6-7: log odds = log p - log(1 - p) on length-averaged log-probs
        log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
        return (-pc).mean() - beta * F.logsigmoid(log_odds).mean()
    raise AssertionError(lt)


@pytest.mark.parametrize("lt,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("hinge", 0.0),
                                    ("ipo", 0.0), ("simpo", 0.1), ("orpo", 0.0)])
def test_loss_and_gradients_match_a_float64_twin(tiny_model, lt, eps):
    model = RoleModel.from_pretrained(tiny_model).eval()
    perturb(model.role_parameters("policy"))
    twin = float64_twin(model, tiny_model)
    pairs, _ = preference_pairs(token_rule_pairs(3, seed=1), 64)
    batch = collate_pairs(pairs, 0)  # right-padded rows of several lengths: padding holes in the masks
    c = DPOConfig(loss_type=lt, label_smoothing=eps, beta=0.3 if lt != "simpo" else None)
    loss, stats = dpo_batch_loss(model, c, batch)
    loss.backward()

    ids, attn, m = batch["input_ids"], batch["attention_mask"], batch["loss_mask"].double()  # response tokens
    lp = next_token_logprobs(materialised(twin, ids, attn, "policy")[0], ids)  # (2B, T) float64
    with torch.no_grad():
        ref = next_token_logprobs(materialised(twin, ids, attn, "reference")[0], ids)
    averaged = lt in ("ipo", "simpo", "orpo")
    seq = lambda x: (x * m).sum(1) / (m.sum(1) if averaged else 1)  # noqa: E731
    (pc, pr), (rc, rr) = seq(lp).chunk(2), seq(ref).chunk(2)
    beta = c.resolved()["beta"]
    want = expected_loss(lt, pc, pr, rc, rr, beta, eps, c.gamma)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["logps/chosen"].double(), pc.mean(), rtol=1e-5, atol=1e-5)
    if lt not in ("simpo", "orpo"):
        torch.testing.assert_close(stats["rewards/margins"].double(), beta * ((pc - rc) - (pr - rr)).mean(),
                                   rtol=1e-4, atol=1e-5)
    got = {n: p.grad for n, p in model.named_parameters() if any(p is q for q in model.role_parameters("policy"))}
    twin_params = dict(twin.named_parameters())
    assert got and all(g is not None for g in got.values())
    for n, g in got.items():
        err = float((g.double() - twin_params[n].grad).abs().max())
        assert err <= 1e-7 + 1e-4 * float(twin_params[n].grad.abs().max()), (n, err)


# ----------------------------------------------------------------------------------------- learning
def implicit_margin(model, pairs) -> tuple[float, float]:
    """Mean held-out margin (log pi/pi_ref of chosen minus rejected, summed log-probs) and the share > 0."""
    b = collate_pairs(pairs, 0)
    with torch.no_grad():
        d = dpo_batch_loss(model, DPOConfig(loss_type="sigmoid", beta=1.0), b)[1]
        h = []
        for role in ("policy", "reference"):
            lp = model.logprobs(b["input_ids"], b["attention_mask"], role=role)
            s = (lp * b["loss_mask"]).sum(1)
            h.append(s)
        logratio = h[0] - h[1]
        c, r = logratio.chunk(2)
    assert torch.isclose(d["rewards/margins"], (c - r).mean(), atol=1e-4)
    return float((c - r).mean()), float(((c - r) > 0).float().mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_raises_the_preference_margin_on_held_out_pairs(tiny_model, tmp_path, seed):
    model = RoleModel.from_pretrained(tiny_model)
    held_out, _ = preference_pairs(token_rule_pairs(16, seed=100 + seed), 64)
    assert implicit_margin(model, held_out)[0] == 0  # the policy starts at the reference (B = 0)
    train_dpo(cfg(tiny_model, "", tmp_path, seed=seed, max_steps=15, batch_size=8, beta=0.5), model=model,
              examples=token_rule_pairs(48, seed=seed))
    margin, acc = implicit_margin(model, held_out)
    # seeds 0-4 of this run reached held-out margins of 7.2-8.5 nats and accuracies of 0.94-1.0
    assert margin > 3.0 and acc >= 0.8, (margin, acc)
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens/s"):
        assert key in rows[-1], key
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "model" / "adapters" / "policy" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------------- reference cache, resume
def test_precomputed_reference_equals_per_batch_and_is_cached(tiny_model, tmp_path, monkeypatch):
    from rlhf_fast.trainers import dpo

    examples = token_rule_pairs(16, seed=3)
    runs = {}
    for pre in (False, True):
        runs[pre] = train_dpo(cfg(tiny_model, "", tmp_path / str(pre), precompute_ref_logprobs=pre,
                                  loss_type="ipo"), examples=examples)
    a, b = (dict(runs[k]["model"].named_parameters()) for k in (False, True))
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7, msg=n)
    assert runs[True]["metrics"]["loss"] == pytest.approx(runs[False]["metrics"]["loss"], rel=1e-5)
    path = tmp_path / "True" / "ref_logprobs.pt"
    assert path.is_file() and torch.load(path)["ref"].shape == (16, 2, 2)

    calls = []
    real = dpo.reference_logps
    monkeypatch.setattr(dpo, "reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    train_dpo(cfg(tiny_model, "", tmp_path / "True", precompute_ref_logprobs=True, loss_type="ipo", max_steps=3,
                  resume=True), examples=examples)
    assert calls == []  # the cache was reused: no reference pass at all
    train_dpo(cfg(tiny_model, "", tmp_path / "True", precompute_ref_logprobs=True, loss_type="ipo", overwrite=True),
              examples=examples[:8])
    assert len(calls) == 2 and torch.load(path)["ref"].shape == (8, 2, 2)  # other data: stale, recomputed


def test_resume_continues_like_an_uninterrupted_run(tiny_model, tmp_path):
    examples = token_rule_pairs(24, seed=4)
    kw = dict(max_steps=4, checkpoint_every=2, precompute_ref_logprobs=True)
    train_dpo(cfg(tiny_model, "", tmp_path / "full", **kw), examples=examples)

    def crash(step, model):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dpo(cfg(tiny_model, "", tmp_path / "cut", **kw), examples=examples, callback=crash)
    train_dpo(cfg(tiny_model, "", tmp_path / "cut", resume=True, **kw), examples=examples)
    want, got = (torch.load(tmp_path / d / "checkpoints" / "step-00000004" / "trainable.pt") for d in ("full", "cut"))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    rows = [[json.loads(ln) for ln in open(tmp_path / d / "metrics.jsonl")] for d in ("full", "cut")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]


# ----------------------------------------------------------------------------------------- online
def mean_word(prompts, completions, **_):
    """A reward that rarely ties: the mean word index of the completion."""
    return [sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) / max(1, len(c.split())) for c in completions]


def test_online_dpo_with_reward_functions(tiny_model, data_files, tmp_path):
    r = train_dpo(cfg(tiny_model, data_files["prompts"], tmp_path, online=True, max_completion_length=4),
                  reward_funcs=[mean_word])
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2
    for row in rows:
        assert row["online/pairs"] + row["online/tied_pairs"] == 4
        assert "rewards/mean_word/mean" in row and "reward" in row
    assert any("loss" in row for row in rows)
    assert os.path.isfile(r["out"] + "/adapters/policy/adapter_model.safetensors")


GOOD = {f"w{i}" for i in range(3, 27)}  # a quarter of the tiny vocabulary


def good_share(prompts, completions, **_):
    """The verifiable reward of tests/trainers/test_grpo.py: the share of the completion's words in GOOD."""
    return [sum(w in GOOD for w in c.split()) / max(1, len(c.split())) for c in completions]


def sampled_share(model) -> float:
    """Mean good_share of 4 samples for each of 16 held-out prompts, with a fixed generator."""
    ids = torch.tensor([[40 + i, 41 + i, 42 + i] for i in range(16)]).repeat_interleave(4, 0)
    out = model.generate(ids, torch.ones_like(ids), max_new_tokens=4, temperature=1.0,
                         generator=torch.Generator().manual_seed(123))
    text = completion_texts(model.tokenizer, out["sequences"], out["response_mask"])
    return sum(good_share(None, text)) / len(text)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_online_dpo_learns_what_the_reward_pays_for(tiny_model, data_files, tmp_path, seed):
    model = RoleModel.from_pretrained(tiny_model)
    share0 = sampled_share(model)
    train_dpo(cfg(tiny_model, data_files["prompts"], tmp_path, online=True, max_completion_length=4, max_steps=16,
                  batch_size=16, seed=seed, beta=0.1, optim=OptimConfig(lr=2e-2)), model=model,
              reward_funcs=[good_share])
    # seeds 0-4 of this run took the held-out sampled share of rewarded words from 0.25 to 0.74-0.94 (with 8
    # prompts a step: 0.40-0.92, too noisy to test)
    assert sampled_share(model) > share0 + 0.3, (share0, sampled_share(model))


def test_sampled_pairs_put_the_higher_score_first_and_skip_ties(tiny_model):
    from rlhf_fast.rl.rewards import RewardFunctions
    from rlhf_fast.trainers.dpo_online import sample_pairs

    model = RoleModel.from_pretrained(tiny_model).eval()
    prompts = [{"prompt_ids": [10 + i, 20 + i], "text": f"w{10 + i} w{20 + i}", "columns": {}} for i in range(8)]
    tie = lambda prompts, completions, **_: [0.0] * len(completions)  # noqa: E731
    c = DPOConfig(max_completion_length=4, online=True, reward_funcs="x")
    batch, m = sample_pairs(model, c, model.tokenizer, prompts, RewardFunctions([tie]), 1, 0, torch.device("cpu"))
    assert batch is None and m["online/tied_pairs"] == 8 and m["online/pairs"] == 0
    batch, m = sample_pairs(model, c, model.tokenizer, prompts, RewardFunctions([mean_word]), 1, 0,
                            torch.device("cpu"))
    n = m["online/pairs"]
    assert n + m["online/tied_pairs"] == 8 and n >= 4 and batch["input_ids"].shape[0] == 2 * n
    text = completion_texts(model.tokenizer, batch["input_ids"], batch["loss_mask"])
    scores = mean_word(None, text)
    assert all(a > b for a, b in zip(scores[:n], scores[n:]))  # chosen (first half) scored higher
    # the loss mask covers the completion only: the two prompt columns are out of it
    assert int(batch["loss_mask"][:, :2].sum()) == 0 and bool((batch["loss_mask"][:, 2] == 1).all())


def test_online_dpo_with_a_reward_model_folder(tiny_model, data_files, tmp_path):
    rm = train_rm(RMConfig(model=tiny_model, data=data_files["pairs"], out_dir=str(tmp_path / "rm"), max_steps=2,
                           batch_size=4, progress=False))
    train_dpo(cfg(tiny_model, data_files["prompts"], tmp_path / "dpo", online=True, max_completion_length=4,
                  reward_model=rm["out"]))
    rows = [json.loads(ln) for ln in open(tmp_path / "dpo" / "metrics.jsonl")]
    assert len(rows) == 2 and "rewards/reward_model/mean" in rows[-1]
    assert sum(r["online/pairs"] for r in rows) > 0  # real-valued scores: ties are rare


def test_ref_update_moves_the_base_and_restarts_the_adapter(tiny_model, data_files, tmp_path):
    model = RoleModel.from_pretrained(tiny_model)
    base0 = {k: v.clone() for k, v in model.base_state_dict().items()}
    r = train_dpo(cfg(tiny_model, data_files["prompts"], tmp_path, online=True, max_completion_length=4,
                      max_steps=1, ref_update_every=1), model=model, reward_funcs=[mean_word])
    moved = [k for k, v in model.base_state_dict().items() if not torch.equal(v, base0[k])]
    assert moved  # the reference (the base) is now the trained policy
    lora_b = [p for n, p in model.named_parameters() if ".policy." in n and "lora_B" in n]
    assert lora_b and all(bool((p == 0).all()) for p in lora_b)  # the adapter restarted from zero
    assert (tmp_path / "reference_updates" / "step-00000001.pt").is_file()
    assert os.path.isfile(os.path.join(r["out"], "base", "config.json"))  # the changed base is saved


def test_ref_updates_resume_like_an_uninterrupted_run(tiny_model, data_files, tmp_path):
    kw = dict(online=True, max_completion_length=3, max_steps=4, checkpoint_every=2, ref_update_every=2,
              batch_size=2)

    def crash(step, model):
        if step == 3:
            raise KeyboardInterrupt

    train_dpo(cfg(tiny_model, data_files["prompts"], tmp_path / "full", **kw), reward_funcs=[mean_word])
    with pytest.raises(KeyboardInterrupt):
        train_dpo(cfg(tiny_model, data_files["prompts"], tmp_path / "cut", **kw), reward_funcs=[mean_word],
                  callback=crash)
    r = train_dpo(cfg(tiny_model, data_files["prompts"], tmp_path / "cut", resume=True, **kw),
                  reward_funcs=[mean_word])
    want = RoleModel.load(tmp_path / "full" / "model").base_state_dict()
    got = r["model"].base_state_dict()
    base0 = RoleModel.from_pretrained(tiny_model).base_state_dict()
    assert any(not torch.equal(want[k], base0[k]) for k in want)  # the reference did move
    for k in want:
        assert torch.equal(want[k], got[k]), k
    for d in ("full", "cut"):
        assert sorted(os.listdir(tmp_path / d / "reference_updates")) == ["step-00000002.pt", "step-00000004.pt"]
    want, got = (torch.load(tmp_path / d / "checkpoints" / "step-00000004" / "trainable.pt") for d in ("full", "cut"))
    for k in want:
        assert torch.equal(want[k], got[k]), k


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,needle", [
    (dict(loss_type="kto"), "loss_type"),
    (dict(beta=0.0), "beta"),
    (dict(beta=-1.0), "beta"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(label_smoothing=0.6), "label_smoothing"),
    (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_type="simpo", precompute_ref_logprobs=True), "not needed"),
    (dict(online=True), "--online needs"),
    (dict(reward_funcs="format"), "need --online"),
    (dict(online=True, reward_funcs="format", ref_update_every=-1), "ref_update_every"),
    (dict(online=True, reward_funcs="reward_model"), "needs --reward_model"),
    (dict(online=True, reward_model="rm", ref_update_every=1), "reward model too"),
    (dict(online=True, reward_funcs="format", precompute_ref_logprobs=True), "does not apply to --online"),
])
def test_bad_options_are_refused_before_writing(tiny_model, data_files, tmp_path, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        train_dpo(cfg(tiny_model, data_files["pairs"], tmp_path / "out", **kw))
    assert not (tmp_path / "out").exists()


def test_preference_file_without_chosen_is_a_data_error(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w10", "chosen": "w7", "rejected": "w8"},
                                             {"prompt": "w11", "chosen": "w7"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2.*rejected"):
        train_dpo(cfg(tiny_model, data, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_shared_prompt_pass_equals_the_plain_pass(tiny_model, monkeypatch):
    """shared_prefix (the default) runs each pair's prompt once for its chosen and rejected rows, in the policy and
    the reference pass; loss, statistics and gradients equal those of the plain pass."""
    model = RoleModel.from_pretrained(tiny_model).eval()
    perturb(model.role_parameters("policy"))
    pairs, _ = preference_pairs(token_rule_pairs(4, seed=2), 64)
    batch = collate_pairs(pairs, 0)
    calls = []
    real = RoleModel._hidden_shared_prefix
    monkeypatch.setattr(RoleModel, "_hidden_shared_prefix", lambda self, *a: calls.append(a[2]) or real(self, *a))
    params = model.role_parameters("policy")
    out = {}
    for share in (False, True):
        loss, stats = dpo_batch_loss(model, DPOConfig(beta=0.3, shared_prefix=share), batch)
        out[share] = (loss.detach(), stats, torch.autograd.grad(loss, params))
    shortest = min(len(p["prompt_ids"]) for p in pairs)
    assert calls == [shortest, shortest]  # the policy and the reference pass, over the batch's common prompt part
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    for k in out[False][1]:
        torch.testing.assert_close(out[True][1][k], out[False][1][k], rtol=1e-5, atol=1e-5, msg=k)
    for a, b in zip(out[True][2], out[False][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lt,pre", [("sigmoid", False), ("ipo", True), ("simpo", False)])
def test_micro_batches_make_the_whole_batch_update(tiny_model, tmp_path, monkeypatch, lt, pre):
    """micro_batch_size splits each batch into parts of that many pairs (here 3 of 8: parts of 3, 3 and 2, each
    with its own padding width) and accumulates their gradients: the weights and the logged metrics equal the
    whole batch's up to float rounding, with every loss type's part of the reference (none, per part, cached)."""
    from rlhf_fast.trainers import dpo

    examples = token_rule_pairs(16, seed=5)
    sizes = []
    real = dpo.dpo_batch_loss
    monkeypatch.setattr(dpo, "dpo_batch_loss", lambda m, c, b, r=None: sizes.append(tuple(b["input_ids"].shape))
                        or real(m, c, b, r))
    runs = {}
    for mb in (0, 3):
        sizes.clear()
        runs[mb] = train_dpo(cfg(tiny_model, "", tmp_path / str(mb), batch_size=8, micro_batch_size=mb,
                                 loss_type=lt, precompute_ref_logprobs=pre), examples=examples)
        runs[mb]["sizes"] = list(sizes)
    assert [s[0] for s in runs[0]["sizes"]] == [16, 16]
    assert [s[0] for s in runs[3]["sizes"]] == [6, 6, 4] * 2  # 2 steps x (3 + 3 + 2 pairs)
    assert any(s[1] < runs[0]["sizes"][0][1] for s in runs[3]["sizes"])  # a part cut to its own padding
    a, b = (dict(runs[k]["model"].named_parameters()) for k in (0, 3))
    for n in a:  # Adam's first steps are about lr (1e-2) per weight whatever the gradient's size: rounding in a
        # near-zero gradient moves a weight by up to a few 1e-6, a part left out would by about 1e-2
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=2e-5, msg=n)
    rows = [[json.loads(ln) for ln in open(tmp_path / str(k) / "metrics.jsonl")] for k in (0, 3)]
    for r0, r1 in zip(*rows):
        for k in ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert r1[k] == pytest.approx(r0[k], rel=1e-5, abs=1e-6), k
    # step 1: the policy is the reference, every margin a rounding-level tie; step 2's are real
    assert rows[1][1]["rewards/accuracies"] == rows[0][1]["rewards/accuracies"]


def test_micro_batches_refuse_online(tiny_model, data_files, tmp_path):
    with pytest.raises(ConfigError, match="micro_batch_size"):
        train_dpo(cfg(tiny_model, data_files["pairs"], tmp_path / "out", online=True, reward_funcs="format",
                      micro_batch_size=2))
    with pytest.raises(ConfigError, match="micro_batch_size must be >= 0"):
        train_dpo(cfg(tiny_model, data_files["pairs"], tmp_path / "out", micro_batch_size=-1))
    assert not (tmp_path / "out").exists()
