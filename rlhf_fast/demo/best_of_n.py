"""The demo's Best-of-N stage: gold score and KL of Best-of-N from the SFT model against N.

Best-of-N draws N responses from the SFT policy and keeps the one the reward model scores highest. Its KL to the
SFT policy has the well-known closed form log N - (N - 1) / N for continuous, tie-free rewards (Stiennon et al.
2020, appendix; Beirami et al. 2024 show it is an upper bound). The demo's language is small, so responses
repeat and the closed form need not hold: we measure instead. Per prompt, M samples give an empirical
distribution over distinct responses; with F the empirical CDF of their reward-model scores, Best-of-N picks a
response of score v with probability F(v)^N - F(v-)^N, shared among the responses of that score in proportion to
their counts. The gold score and the KL of Best-of-N follow exactly from those weights, for every N <= M at once.
"""

from __future__ import annotations

import math

import torch

from rlhf_fast.demo import task
from rlhf_fast.rl.best_of_n import best_of_n_weights


def curve(prompts: list[str], responses: list[list[str]], rm_scores: list[list[float]], ns: list[int]) -> list[dict]:
    """Gold score, reward-model score and KL to the sampling policy of Best-of-N for each N in `ns`.

    responses[i] / rm_scores[i]: the M samples of prompt i and their reward-model scores. Equal responses form
    one outcome (their mean score), so a repeated response is not counted as several.
    """
    rows = {n: {"n": n, "gold_score": 0.0, "proxy_reward": 0.0, "kl": 0.0} for n in ns}
    for prompt, resp, sc in zip(prompts, responses, rm_scores):
        groups: dict[str, list[float]] = {}
        for r, s in zip(resp, sc):
            groups.setdefault(r, []).append(s)
        texts = list(groups)
        count = torch.tensor([len(groups[t]) for t in texts], dtype=torch.float64)
        p = count / count.sum()                                         # the policy's (empirical) distribution
        score = torch.tensor([sum(groups[t]) / len(groups[t]) for t in texts], dtype=torch.float64)
        gold = torch.tensor(task.gold_scores([prompt] * len(texts), texts), dtype=torch.float64)
        # Expand to M equally likely draws so that best_of_n_weights sees each outcome's multiplicity.
        draws = torch.repeat_interleave(torch.arange(len(texts)), count.long())
        for n in ns:
            w_draw = best_of_n_weights(score[draws][None], n)[0]  # (M,)
            w = torch.zeros(len(texts), dtype=torch.float64).index_add_(0, draws, w_draw)  # per distinct response
            nz = w > 0
            rows[n]["gold_score"] += float((w * gold).sum())
            rows[n]["proxy_reward"] += float((w * score).sum())
            rows[n]["kl"] += float((w[nz] * (w[nz] / p[nz]).log()).sum())
    for r in rows.values():
        for k in ("gold_score", "proxy_reward", "kl"):
            r[k] /= len(prompts)
        r["kl_bound"] = math.log(r["n"]) - (r["n"] - 1) / r["n"]
    return [rows[n] for n in ns]


@torch.no_grad()
def sample_many(model, tokenizer, prompts: list[str], m: int, *, max_new_tokens: int, seed: int,
                batch_prompts: int = 64) -> tuple[list[list[str]], list[list[float]]]:
    """m samples per prompt from the policy (temperature 1; each prompt prefilled once for its m samples) and their
    reward-model scores."""
    from rlhf_fast.data.collate import collate_prompts
    from rlhf_fast.data.jsonl import encode_prompt

    g = torch.Generator().manual_seed(seed)
    responses, scores = [], []
    for i in range(0, len(prompts), batch_prompts):
        b = collate_prompts([{"prompt_ids": encode_prompt(tokenizer, p)} for p in prompts[i:i + batch_prompts]],
                            tokenizer.pad_token_id)
        out = model.generate(b["prompt_ids"], b["prompt_mask"], max_new_tokens=max_new_tokens, temperature=1.0,
                             eos_token_id=tokenizer.eos_token_id, generator=g, num_samples=m)
        seq, resp = out["sequences"], out["response_mask"]   # (B*m, T), row j from prompt j // m
        sc = model.scores(seq, out["attention_mask"]).float().view(-1, m)
        texts = [tokenizer.decode(row[r.bool()].tolist(), skip_special_tokens=False) for row, r in zip(seq, resp)]
        for j in range(sc.shape[0]):
            responses.append(texts[j * m:(j + 1) * m])
            scores.append(sc[j].tolist())
    return responses, scores
