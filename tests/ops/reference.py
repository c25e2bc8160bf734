"""Independent float64 references: the plain formulas, written for clarity, not speed."""

import torch


def logprobs_entropy(logits, targets, temperature=1.0, ignore_index=-100):
    z = logits.double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    lp = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def linear_logprobs_entropy(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return logprobs_entropy(logits, targets, temperature, ignore_index)


def kl(lp, ref, estimator):
    d = lp.double() - ref.double()
    return {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) - 1 + d, "abs": d.abs()}[estimator]


def gae_loop(rewards, values, mask, gamma, lam):
    """The reverse loop over time, exactly as the spec words it."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_value, last = 0.0, 0.0
        for t in reversed(range(T)):
            if mask[b, t] != 0:
                delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
                last = delta + gamma * lam * last
                adv[b, t] = last
                next_value = float(values[b, t])
    returns = torch.where(mask != 0, adv + values.double(), 0.0)
    return adv, returns


def kl_rewards(lp, ref, scores, mask, kl_coef, estimator):
    rewards = torch.where(mask != 0, -kl_coef * kl(lp, ref, estimator), 0.0)
    for b in range(rewards.shape[0]):
        idx = (mask[b] != 0).nonzero()
        if len(idx):
            rewards[b, idx[-1, 0]] += float(scores[b])
    return rewards


def aggregate(l, mask, agg):
    m = (mask != 0).double()
    l = torch.where(mask != 0, l.double(), 0.0)
    if agg == "token-mean":
        return (l * m).sum() / m.sum() if m.sum() > 0 else l.sum() * 0
    rows = [b for b in range(m.shape[0]) if m[b].sum() > 0]
    if not rows:
        return l.sum() * 0
    if agg == "seq-mean-token-sum":
        return sum((l[b] * m[b]).sum() for b in rows) / len(rows)
    return sum((l[b] * m[b]).sum() / m[b].sum() for b in rows) / len(rows)


def ppo_token_loss(lp, old, adv, clip_low, clip_high=None, dual_clip=None):
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(lp.double() - old.double())
    adv = adv.double()
    l = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        l = torch.where(adv < 0, torch.minimum(l, -adv * dual_clip), l)
    return l


def value_token_loss(v, old, ret, clip):
    v, old, ret = v.double(), old.double(), ret.double()
    if clip is None:
        return 0.5 * (v - ret) ** 2
    return 0.5 * torch.maximum((v - ret) ** 2, (old + (v - old).clamp(-clip, clip) - ret) ** 2)
