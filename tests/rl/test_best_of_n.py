"""Best-of-N: the pick is the argmax of the N scores, keep modes, reward functions vs a reward-model folder, N = 1,
scores of the shared-prefill samples equal the reward model's on each sample alone; and the exact KL of Best-of-N
on M samples against brute-force enumeration and the closed form log n - (n - 1)/n."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from rlhf_fast.models import RoleModel
from rlhf_fast.rl.best_of_n import best_of_n, best_of_n_kl, best_of_n_kl_bound
from rlhf_fast.rl.rollout import SamplingConfig
from tests.tiny import build_tiny_model, words

PROMPTS = [words([10, 11, 12]), words([20, 21]), words([30, 31, 32, 33]), words([15])]
SAMPLING = SamplingConfig(max_new_tokens=5, temperature=1.0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("bon-llama"), "llama"))


@pytest.fixture(scope="module")
def rm_folder(tiny_model, tmp_path_factory):
    """A reward-model folder as `rlhf-fast rm` writes it: a random (non-zero) reward adapter and score head."""
    model = RoleModel.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.role_parameters("reward"):
            p.normal_(0.0, 0.3)
    model.trained_roles.add("reward")
    out = tmp_path_factory.mktemp("rm") / "model"
    model.save(out)
    return str(out)


def n_words(prompts, completions, **_):
    """A reward with many ties: the number of words of the completion."""
    return [float(len(c.split())) for c in completions]


def count_w7(prompts, completions, **_):
    return [float(c.split().count("w7")) for c in completions]


def test_best_is_the_argmax_of_all_n_scores(tiny_model, rm_folder):
    model = RoleModel.from_pretrained(tiny_model)
    rows = best_of_n(model, PROMPTS, 6, reward_model=rm_folder, sampling=SAMPLING, batch_size=3, seed=3)
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        scores = torch.tensor([s["score"] for s in r["all"]])
        assert len(r["all"]) == r["n"] == 6 and r["rank"] == 0
        assert r["score"] == scores.max().item()
        assert r["completion"] == r["all"][int(scores.argmax())]["completion"]
    # the samples differ: otherwise "best" would be trivially any of them
    assert any(len({s["completion"] for s in r["all"]}) > 1 for r in rows)


def test_ties_pick_the_first_sample_and_keep_modes(tiny_model):
    model = RoleModel.from_pretrained(tiny_model)
    kw = dict(reward_funcs=[n_words], sampling=SAMPLING, seed=5)
    best = best_of_n(model, PROMPTS, 5, **kw)
    for r in best:  # the first sample of the largest score
        scores = [s["score"] for s in r["all"]]
        assert r["completion"] == r["all"][scores.index(max(scores))]["completion"]
    top = best_of_n(model, PROMPTS, 5, keep="top-k", top_k=3, **kw)
    every = best_of_n(model, PROMPTS, 5, keep="all", **kw)
    assert len(top) == 3 * len(PROMPTS) and len(every) == 5 * len(PROMPTS)
    assert all("all" not in r for r in top + every)
    for i, r in enumerate(best):
        mine = every[5 * i:5 * (i + 1)]
        assert [x["rank"] for x in mine] == [0, 1, 2, 3, 4]
        # every sample once, best first, ties in sampling order (a stable sort)
        order = sorted(range(5), key=lambda k: -r["all"][k]["score"])
        assert [(x["completion"], x["score"]) for x in mine] == [
            (r["all"][k]["completion"], r["all"][k]["score"]) for k in order]
        assert top[3 * i:3 * (i + 1)] == mine[:3]
    assert best_of_n(model, PROMPTS[:1], 2, keep="top-k", top_k=9, **kw)[-1]["rank"] == 1  # at most n rows


def test_reward_funcs_and_reward_model_paths(tiny_model, rm_folder):
    model = RoleModel.from_pretrained(tiny_model)
    by_func = best_of_n(model, PROMPTS, 4, reward_funcs=[count_w7], sampling=SAMPLING, seed=1, keep="all")
    assert all(r["score"] == r["completion"].split().count("w7") for r in by_func)
    # the same samples (same seed), scored by the reward model: the folder's adapter is loaded into the model
    by_rm = best_of_n(model, PROMPTS, 4, reward_model=rm_folder, sampling=SAMPLING, seed=1, keep="all",
                      return_ids=True)
    assert "reward" in model.trained_roles
    assert sorted(r["completion"] for r in by_rm) == sorted(r["completion"] for r in by_func)
    # "reward_model" in a spec string is the model's (now trained) reward adapter: the same scores
    by_spec = best_of_n(model, PROMPTS, 4, reward_funcs="reward_model", sampling=SAMPLING, seed=1, keep="all")
    assert [r["score"] for r in by_spec] == pytest.approx([r["score"] for r in by_rm], abs=1e-5)
    # the samples shared their prompt's prefill; each scored alone (no padding, no other row) gives the same score
    for r in by_rm:
        ids = torch.tensor([r["prompt_ids"] + r["completion_ids"]])
        alone = model.scores(ids, torch.ones_like(ids)).item()
        assert r["score"] == pytest.approx(alone, abs=1e-4)


def test_shared_prefill_samples_are_the_separate_calls_samples_greedy(tiny_model):
    """At temperature 0 each of the N shared-prefill samples is what one generate call per prompt gives."""
    model = RoleModel.from_pretrained(tiny_model)
    greedy = SamplingConfig(max_new_tokens=5, temperature=0.0)
    rows = best_of_n(model, PROMPTS, 3, reward_funcs=[n_words], sampling=greedy, keep="all", return_ids=True)
    one = best_of_n(model, PROMPTS, 1, reward_funcs=[n_words], sampling=greedy, keep="all", return_ids=True,
                    batch_size=1)
    for i, r in enumerate(one):
        assert [x["completion_ids"] for x in rows[3 * i:3 * (i + 1)]] == [r["completion_ids"]] * 3


def test_n_equals_1_and_reproducible(tiny_model):
    model = RoleModel.from_pretrained(tiny_model)
    a = best_of_n(model, PROMPTS, 1, reward_funcs=[n_words], sampling=SAMPLING, seed=7)
    b = best_of_n(model, PROMPTS, 1, reward_funcs=[n_words], sampling=SAMPLING, seed=7)
    assert a == b and all(len(r["all"]) == 1 and r["completion"] == r["all"][0]["completion"] for r in a)


def test_unscorable_samples_rank_last(tiny_model):
    model = RoleModel.from_pretrained(tiny_model)

    def only_first_prompt(prompts, completions, **_):
        return [1.0 if p == PROMPTS[0] else None for p in prompts]

    rows = best_of_n(model, PROMPTS[:2], 3, reward_funcs=[only_first_prompt], sampling=SAMPLING)
    assert rows[0]["score"] == 1.0 and rows[1]["score"] is None
    assert rows[1]["completion"] == rows[1]["all"][0]["completion"]


@pytest.mark.parametrize("bad, needle", [
    (dict(n=0), "n (samples per prompt)"), (dict(keep="worst"), "keep"), (dict(keep="top-k", top_k=0), "top_k"),
    (dict(reward_model="x", reward_funcs=[n_words]), "not both"), (dict(reward_funcs=None), "never trained"),
])
def test_bad_input(tiny_model, bad, needle):
    model = RoleModel.from_pretrained(tiny_model)
    kw = dict(n=2, reward_funcs=[n_words], sampling=SAMPLING) | bad
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        best_of_n(model, PROMPTS, **kw)


# ------------------------------------------------------------------------------------------------------ KL
def brute_force_kl(scores: list[float], n: int) -> float:
    """Enumerate all M^n draws (with replacement), each with probability M^-n: the distribution of the max score."""
    M = len(scores)
    p_bon = Counter()
    for draw in itertools.product(range(M), repeat=n):
        p_bon[max(scores[i] for i in draw)] += 1 / M**n
    p = Counter(scores)
    return sum(q * math.log(q / (p[v] / M)) for v, q in p_bon.items() if q > 0)


@pytest.mark.parametrize("scores", [[0.1, 0.5, 0.2, 0.9], [1.0, 2.0, 2.0, 3.0], [3.0, 3.0, 3.0, 3.0],
                                    [5.0, 1.0, 1.0, 5.0], [2.0, -1.0, 2.0, 2.0]])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_kl_matches_brute_force(scores, n):
    got = best_of_n_kl(torch.tensor([scores], dtype=torch.float64), n)
    assert got.dtype == torch.float64 and got.shape == (1,)
    assert got.item() == pytest.approx(brute_force_kl(scores, n), abs=1e-12)


def test_kl_rows_are_independent_and_n1_is_zero():
    s = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3], [1.0, 1.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    both = best_of_n_kl(s, 3)
    assert both[0].item() == pytest.approx(brute_force_kl(s[0].tolist(), 3), abs=1e-12)
    assert both[1].item() == pytest.approx(brute_force_kl(s[1].tolist(), 3), abs=1e-12)
    assert torch.equal(best_of_n_kl(s, 1), torch.zeros(2, dtype=torch.float64))
    assert best_of_n_kl(s.float(), 3).dtype == torch.float32


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_kl_approaches_the_bound_for_many_distinct_scores(n):
    g = torch.Generator().manual_seed(0)
    kl = [best_of_n_kl(torch.rand(1, M, generator=g, dtype=torch.float64), n).item() for M in (10, 100, 100_000)]
    bound = best_of_n_kl_bound(n)
    assert kl[0] < kl[1] < kl[2] <= bound  # from below, rising with M
    assert kl[2] == pytest.approx(bound, abs=1e-3)


def test_kl_bad_input():
    with pytest.raises(ValueError, match="n must be"):
        best_of_n_kl(torch.zeros(1, 3), 0)
    with pytest.raises(ValueError, match="finite"):
        best_of_n_kl(torch.tensor([[1.0, float("nan")]]), 2)
    with pytest.raises(ValueError, match=r"\(P, M\)"):
        best_of_n_kl(torch.zeros(3), 2)
    assert best_of_n_kl_bound(1) == 0.0 and best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)


def _brute_force_best_of_n(scores: list[float], n: int) -> list[float]:
    """P(Best-of-n picks item i): enumerate every ordered n-tuple of draws; ties broken uniformly."""
    import itertools

    m = len(scores)
    p = [0.0] * m
    for draw in itertools.product(range(m), repeat=n):
        top = max(scores[i] for i in draw)
        winners = [i for i in draw if scores[i] == top]
        for i in winners:
            p[i] += 1.0 / len(winners) / m ** n
    return p


@pytest.mark.parametrize("scores, n", [([0.3, 1.2, -0.5, 0.9], 3), ([1.0, 1.0, 0.0, 2.0, 1.0], 3),
                                       ([5.0, 5.0, 5.0], 2), ([0.1], 4), ([2.0, -1.0, 2.0, 0.5], 1)])
def test_best_of_n_weights_match_enumeration(scores, n):
    from rlhf_fast.rl.best_of_n import best_of_n_weights

    got = best_of_n_weights(torch.tensor([scores], dtype=torch.float64), n)[0]
    assert got.tolist() == pytest.approx(_brute_force_best_of_n(scores, n), abs=1e-12)
