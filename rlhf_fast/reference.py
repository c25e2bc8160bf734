"""Independent float64 references for tests and benchmarks: the plain formulas, written for clarity, not speed.

Every function upcasts its inputs to float64 and returns float64 tensors (differentiable where torch ops are
used, so gradients can be compared too). They share no code with rlhf_fast.ops or the kernels: the point is a
second, obvious implementation of each formula. CPU only is fine; loops over time are Python loops.
"""

from __future__ import annotations

import torch

__all__ = [
    "ESTIMATOR_NAMES",
    "aggregate",
    "dpo",
    "gae_loop",
    "kl",
    "kl_penalized_gae_loop",
    "kl_rewards",
    "kto",
    "linear_kl",
    "linear_logprobs_entropy",
    "linear_ppo_loss",
    "logprobs_entropy",
    "masked_whiten",
    "orpo",
    "ppo_token_loss",
    "sequence_ppo_token_loss",
    "sequence_ratio",
    "simpo",
    "value_token_loss",
]

ESTIMATOR_NAMES = ("k1", "k2", "k3", "abs")  # index = the code rlhf_fast.ops._checks.ESTIMATORS gives


# ---------------------------------------------------------------- log-probs and entropy


def logprobs_entropy(logits, targets, temperature=1.0, ignore_index=-100):
    """log softmax(logits / temperature)[target] and the entropy -sum p log p, per row; 0 where ignored.
    logits (..., V), targets (...) int64."""
    z = logits.double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    lp = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def linear_logprobs_entropy(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100):
    """logprobs_entropy of the logits hidden @ weight.T (+ bias). hidden (..., H), weight (V, H)."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return logprobs_entropy(logits, targets, temperature, ignore_index)


# ---------------------------------------------------------------- KL estimators (Schulman 2020)


def kl(lp, ref, estimator):
    """Per-token estimator on d = lp - ref: "k1" d, "k2" d^2 / 2, "k3" exp(-d) - 1 + d, "abs" |d| (or the code
    0..3). k3 is written expm1(-d) + d: exp(-d) - 1 + d loses ~2e-16 / d^2 relative in float64 (2e-4 at
    d = 1e-6), expm1(-d) + d only ~2e-16 / |d| (2e-10 at d = 1e-6), far below any fp32 tolerance."""
    if not isinstance(estimator, str):
        estimator = ESTIMATOR_NAMES[estimator]
    d = lp.double() - ref.double()
    if estimator == "k1":
        return d
    if estimator == "k2":
        return d * d / 2
    if estimator == "k3":
        return torch.expm1(-d) + d
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"unknown estimator {estimator!r}")


# ---------------------------------------------------------------- GAE (Schulman et al. 2016)


def gae_loop(rewards, values, mask, gamma, lam):
    """The reverse loop over time, exactly as the spec words it. Per row, t = T-1 .. 0, next_value = 0,
    last = 0: where mask[t] != 0, delta = r[t] + gamma * next_value - v[t], last = delta + gamma * lam * last,
    adv[t] = last, next_value = v[t]; a masked step is skipped (adv[t] = 0). returns = adv + v where valid,
    else 0. Returns (advantages, returns), (B, T) float64."""
    B, T = rewards.shape
    r, v, m = rewards.double().tolist(), values.double().tolist(), mask.double().tolist()
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        next_value, last = 0.0, 0.0
        for t in reversed(range(T)):
            if m[b][t] != 0:
                delta = r[b][t] + gamma * next_value - v[b][t]
                last = delta + gamma * lam * last
                adv[b][t] = last
                ret[b][t] = last + v[b][t]
                next_value = v[b][t]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def kl_rewards(lp, ref, scores, mask, kl_coef, estimator):
    """The KL-penalised PPO reward (Ziegler et al. 2019): -kl_coef * kl(lp, ref) at valid positions (0 at
    masked ones), plus scores[b] at the last valid position of row b. (B, T) float64."""
    rewards = torch.where(mask != 0, -kl_coef * kl(lp, ref, estimator), 0.0)
    for b in range(rewards.shape[0]):
        idx = (mask[b] != 0).nonzero()
        if len(idx):
            rewards[b, idx[-1, 0]] += float(scores[b])
    return rewards


def kl_penalized_gae_loop(lp, ref, values, scores, mask, kl_coef, gamma, lam, estimator):
    """kl_rewards, then gae_loop on them: (advantages, returns, rewards), each (B, T) float64."""
    rewards = kl_rewards(lp, ref, scores, mask, kl_coef, estimator)
    adv, ret = gae_loop(rewards, values, mask, gamma, lam)
    return adv, ret, rewards


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the valid positions (unbiased var), + mean if not shift_mean; 0 at
    masked positions."""
    valid = mask != 0
    v = x[valid].double()
    out = (x.double() - v.mean()) / torch.sqrt(v.var(unbiased=True) + eps)
    if not shift_mean:
        out = out + v.mean()
    return torch.where(valid, out, 0.0)


# ---------------------------------------------------------------- losses


def aggregate(l, mask, agg):
    """"token-mean" over all valid tokens, "seq-mean-token-sum" / "seq-mean-token-mean" over the rows that
    have a valid token; 0 (keeping the graph) when none has. "seq-mean-token-sum-norm" (Dr. GRPO): the sum
    over all valid tokens divided by B * T, the mask's number of rows times its time dimension."""
    m = (mask != 0).double()
    l = torch.where(mask != 0, l.double(), 0.0)
    if agg == "seq-mean-token-sum-norm":
        B, T = m.shape
        return (l * m).sum() / (B * T)
    if agg == "token-mean":
        return (l * m).sum() / m.sum() if m.sum() > 0 else l.sum() * 0
    rows = [b for b in range(m.shape[0]) if m[b].sum() > 0]
    if not rows:
        return l.sum() * 0
    if agg == "seq-mean-token-sum":
        return sum((l[b] * m[b]).sum() for b in rows) / len(rows)
    return sum((l[b] * m[b]).sum() / m[b].sum() for b in rows) / len(rows)


def ppo_token_loss(lp, old, adv, clip_low, clip_high=None, dual_clip=None):
    """PPO's clipped surrogate per token (Schulman et al. 2017), dual-clipped where A < 0 (Ye et al. 2020)."""
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(lp.double() - old.double())
    adv = adv.double()
    l = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        l = torch.where(adv < 0, torch.minimum(l, -adv * dual_clip), l)
    return l


def sequence_ratio(lp, old, mask):
    """GSPO's sequence ratio (Zheng et al. 2025), row by row: s_b = exp(mean of lp - old over the row's valid
    tokens), 1 for a row without one. lp, old, mask (B, T) -> (B,) float64, differentiable in lp."""
    out = []
    for b in range(lp.shape[0]):
        keep = mask[b] != 0
        if keep.any():
            out.append(torch.exp((lp[b].double() - old[b].double())[keep].mean()))
        else:
            out.append(torch.ones((), dtype=torch.float64))
    return torch.stack(out)


def sequence_ppo_token_loss(lp, old, adv, mask, clip_low, clip_high=None, dual_clip=None):
    """The clipped surrogate with GSPO's sequence ratio: every token of row b uses
    max(-A s_b, -A clip(s_b, 1 - clip_low, 1 + clip_high)), dual-clipped where A < 0 the same way as the token
    ratio. adv (B, T) or (B,) (broadcast over the row). (B, T) float64."""
    clip_high = clip_low if clip_high is None else clip_high
    s = sequence_ratio(lp, old, mask)[:, None].expand(lp.shape)  # (B, T)
    adv = adv.double()
    adv = adv[:, None].expand(lp.shape) if adv.dim() == 1 else adv
    l = torch.maximum(-adv * s, -adv * s.clamp(1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        l = torch.where(adv < 0, torch.minimum(l, -adv * dual_clip), l)
    return l


def value_token_loss(v, old, ret, clip):
    """0.5 (v - ret)^2, or with clip the max of it and the clipped-value version."""
    v, old, ret = v.double(), old.double(), ret.double()
    if clip is None:
        return 0.5 * (v - ret) ** 2
    return 0.5 * torch.maximum((v - ret) ** 2, (old + (v - old).clamp(-clip, clip) - ret) ** 2)


def linear_ppo_loss(hidden, weight, targets, old, adv, mask, bias=None, ref_lp=None, *, kl_coef=0.0,
                    kl_estimator="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None,
                    temperature=1.0, ratio_level="token", agg="token-mean", ignore_index=-100):
    """The unfused composition fused_linear_ppo_loss computes: per token ppo_token_loss (ratio_level="token")
    or sequence_ppo_token_loss ("sequence", GSPO) + kl_coef * kl(lp, ref) - entropy_coef * entropy on the
    log-probs of hidden @ weight.T (+ bias), aggregated over mask and the non-ignored targets. adv (B, T) or
    (B,). A 0-dim float64 tensor, differentiable in hidden, weight and bias."""
    lp, ent = linear_logprobs_entropy(hidden, weight, targets, bias, temperature, ignore_index)
    valid = (mask != 0) & (targets != ignore_index)
    if ratio_level == "sequence":
        l = sequence_ppo_token_loss(lp, old, adv, valid, clip_low, clip_high, dual_clip)
    elif ratio_level == "token":
        adv = adv[:, None].expand(lp.shape) if adv.dim() == 1 else adv
        l = ppo_token_loss(lp, old, adv, clip_low, clip_high, dual_clip)
    else:
        raise ValueError(f"unknown ratio_level {ratio_level!r}")
    if ref_lp is not None and kl_coef != 0:
        l = l + kl_coef * kl(lp, ref_lp, kl_estimator)
    l = l - entropy_coef * ent
    return aggregate(l, valid, agg)


# ---------------------------------------------------------------- exact KL between two softmaxes


def linear_kl(hidden, ref_hidden, weight, mask, bias=None, temperature=1.0):
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per token over the materialised vocabulary, p = softmax((hidden
    @ weight.T + bias) / temperature), q the same with ref_hidden; 0 where mask is 0. The reference side is a
    constant (q is detached: no gradient to ref_hidden, nor to weight and bias through q). hidden, ref_hidden
    (..., H), weight (V, H), mask (...). (...) float64, differentiable in hidden, weight and bias."""
    def log_softmax(h, w, b):
        z = h.double() @ w.double().T
        if b is not None:
            z = z + b.double()
        return torch.log_softmax(z / temperature, dim=-1)

    logp = log_softmax(hidden, weight, bias)
    logq = log_softmax(ref_hidden.detach(), weight.detach(), None if bias is None else bias.detach())
    kl_tok = (logp.exp() * (logp - logq)).sum(-1)
    return torch.where(mask != 0, kl_tok, 0.0)


# ---------------------------------------------------------------- preference losses (one value per example)


def _softplus(x):
    """log(1 + exp(x)), written x + log(1 + exp(-x)) for x > 0 so that exp never overflows (each branch sees
    only its own side of 0, so the unused one cannot put inf or NaN into the gradient; at x = 0 the gradient is
    the true 1/2). -log sigmoid(z) = softplus(-z)."""
    x = x.double()
    pos = x > 0
    x_pos, x_neg = torch.where(pos, x, 0.0), torch.where(pos, 0.0, x)
    return torch.where(pos, x_pos + torch.log1p(torch.exp(-x_pos)), torch.log1p(torch.exp(x_neg)))


def _reward_stats(chosen_rewards, rejected_rewards):
    """TRL's metrics: the means of the chosen and rejected rewards, of their difference, and the share of
    examples whose chosen reward is strictly larger. float64 0-dim tensors, no gradient."""
    cr, rr = chosen_rewards.detach().double(), rejected_rewards.detach().double()
    return {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (cr - rr).mean(),
            "rewards/accuracies": (cr > rr).double().mean()}


def dpo(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
    """DPO (Rafailov et al. 2023) and its variants on (B,) log-probs: with h = (chosen - ref_chosen) -
    (rejected - ref_rejected), z = beta h, e = label_smoothing, the mean over the batch of
    sigmoid (cDPO): (1 - e) softplus(-z) + e softplus(z);  hinge (SLiC): max(0, 1 - z);
    ipo: (h - 1 / (2 beta))^2;  robust (rDPO): ((1 - e) softplus(-z) - e softplus(z)) / (1 - 2e).
    Returns (loss, reward stats(beta (chosen - ref_chosen), beta (rejected - ref_rejected)))."""
    wins = chosen.double() - ref_chosen.double()
    losses_ = rejected.double() - ref_rejected.double()
    h = wins - losses_
    z = beta * h
    e = label_smoothing
    if loss_type == "sigmoid":
        per_pair = (1 - e) * _softplus(-z) + e * _softplus(z)
    elif loss_type == "hinge":
        per_pair = torch.clamp(1 - z, min=0)
    elif loss_type == "ipo":
        per_pair = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        per_pair = ((1 - e) * _softplus(-z) - e * _softplus(z)) / (1 - 2 * e)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return per_pair.sum() / len(per_pair), _reward_stats(beta * wins, beta * losses_)


def simpo(chosen, rejected, beta=2.0, gamma=0.5, label_smoothing=0.0):
    """SimPO (Meng et al. 2024) on length-averaged log-probs: z = beta (chosen - rejected) - gamma,
    mean of (1 - e) softplus(-z) + e softplus(z). Returns (loss, reward stats(beta chosen, beta rejected))."""
    c, r = chosen.double(), rejected.double()
    z = beta * (c - r) - gamma
    e = label_smoothing
    per_pair = (1 - e) * _softplus(-z) + e * _softplus(z)
    return per_pair.sum() / len(per_pair), _reward_stats(beta * c, beta * r)


def orpo(chosen, rejected, chosen_nll, beta=0.1):
    """ORPO (Hong et al. 2024) on length-averaged log-probs x < 0: odds(p) = p / (1 - p), log odds = x -
    log(1 - exp(x)); log_odds = log odds(chosen) - log odds(rejected); loss = mean(nll) - beta mean(log
    sigmoid(log_odds)). Returns (loss, stats with TRL's ORPO names)."""
    c, r, nll = chosen.double(), rejected.double(), chosen_nll.double()
    log_odds = (c - torch.log1p(-torch.exp(c))) - (r - torch.log1p(-torch.exp(r)))
    log_sig = -_softplus(-log_odds)
    loss = nll.mean() - beta * log_sig.mean()
    stats = _reward_stats(beta * c, beta * r)
    stats.update({"log_odds_ratio": log_sig.detach().mean(), "log_odds_chosen": log_odds.detach().mean(),
                  "nll_loss": nll.detach().mean()})
    return loss, stats


def kto(policy, ref, desirable, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024), example by example: r = policy - ref, z0 = max(kl, 0) (a constant);
    desirable: desirable_weight (1 - 1 / (1 + exp(-beta (r - z0)))), else undesirable_weight (1 - 1 / (1 +
    exp(-beta (z0 - r)))); the loss is the mean. Returns (loss, {"rewards/chosen": mean of beta r over the
    desirable examples (0 if none), "rewards/rejected": over the others, "kl": z0})."""
    z0 = max(float(kl), 0.0)
    per_example, chosen_rewards, rejected_rewards = [], [], []
    for i in range(len(policy)):
        r = policy[i].double() - ref[i].double()
        if bool(desirable[i]):
            per_example.append(desirable_weight * (1 - 1 / (1 + torch.exp(-beta * (r - z0)))))
            chosen_rewards.append(beta * float(r.detach()))
        else:
            per_example.append(undesirable_weight * (1 - 1 / (1 + torch.exp(-beta * (z0 - r)))))
            rejected_rewards.append(beta * float(r.detach()))
    loss = torch.stack(per_example).sum() / len(per_example)

    def mean(xs):
        return torch.tensor(sum(xs) / len(xs) if xs else 0.0, dtype=torch.float64)

    return loss, {"rewards/chosen": mean(chosen_rewards), "rewards/rejected": mean(rejected_rewards),
                  "kl": torch.tensor(z0, dtype=torch.float64)}
