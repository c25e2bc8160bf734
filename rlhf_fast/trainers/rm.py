"""Reward model: Bradley-Terry on preference pairs and K-way rankings.

Trains the `reward` LoRA adapter and score head of a RoleModel. A ranking of K responses to one prompt
gives all C(K, 2) ordered pairs; they go into the same batch and each prompt's pairs are averaged, so
each prompt weighs the same whatever K is (the 1/C(K, 2) weighting of InstructGPT, Ouyang et al. 2022,
section 3.5, which stops the model over-fitting prompts with many pairs). An optional per-pair margin
m gives loss -log sigmoid(r_chosen - r_rejected - m) (Llama 2, Touvron et al. 2023).

After training the scores on the validation split are shifted to mean 0 and the offset is saved with
the head (InstructGPT normalises its RM the same way before RL).

Pairs whose two responses are the same tokens (chosen == rejected, a response repeated in a ranking, or
equal once cut to max_length) are dropped before training, with a warning and the logged counts
data/dropped_pairs and data/val_dropped_pairs (data.jsonl.drop_tied_pairs); a data set of nothing else is a
DataError. Accuracy, in training and in validation alike, counts a pair scored exactly equal as 0.5: a
tie is a coin flip, as its Bradley-Terry loss log 2 says.

Ensembles (`--ensemble K`, docs/ensembles.md): K reward members on the one base (adapters "reward", "reward_1",
..., each with its own score head and init seed seed + k), trained together in one run. Member k reads a
bootstrap resample of the training prompts (drawn with replacement, seed + k) through the run's one shuffled
order, so all members advance in step and a checkpoint (hence --resume) holds them all. Each step makes one
forward and backward per member and one optimiser update of all of them (the gradient norm is clipped over the
whole ensemble). Each member's offset is normalised on validation; the ensemble is one out_dir/model folder.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from rlhf_fast.data.collate import collate_rankings
from rlhf_fast.data.jsonl import check_examples, drop_tied_pairs, encode_rankings, fit_context, load_rankings
from rlhf_fast.models.io import set_reward_offset
from rlhf_fast.trainers import checkpoint as ckpt
from rlhf_fast.trainers import distributed as D
from rlhf_fast.trainers import loop as L
from rlhf_fast.trainers.config import ConfigError, TrainConfig, option, quiet_unless_progress


@dataclass
class RMConfig(TrainConfig):
    """Reward-model training on {"prompt", "chosen", "rejected", "margin"?} or {"prompt", "responses"} JSONL."""

    # redeclared for its help: an example is a prompt with its responses, whatever K
    batch_size: int = option(8, "prompts per optimiser step: a pair counts once, and so does a K-way ranking "
                                "(with all its C(K, 2) pairs)")
    val_data: str = option("", "validation JSONL in the same formats (empty: hold out val_fraction of data)")
    val_fraction: float = option(0.1, "share of the prompts held out for validation when val_data is empty")
    eval_every: int = option(0, "evaluate on the validation split every N steps (0: only at the end)")
    normalize: bool = option(True, "shift rewards to mean 0 on the validation split; the offset is saved")
    ensemble: int = option(1, "train K reward models on the one base (K adapters + score heads, each on a "
                              "bootstrap resample of the pairs, seed + k), saved as one folder; 1: a single one")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.ensemble, bool) or not isinstance(self.ensemble, int) or self.ensemble < 1:
            raise ConfigError(f"ensemble must be an integer >= 1 (reward models on the base), got {self.ensemble!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0, got {self.eval_every}")


def rm_loss(model, batch: dict, member: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of a ranking batch (see collate_rankings), averaged per prompt, and metrics, of reward
    member `member` (0 unless the model holds an ensemble)."""
    from rlhf_fast.ops import bradley_terry_loss

    scores = model.scores(batch["input_ids"], batch["attention_mask"], member)  # (S,)
    c, r = scores[batch["chosen"]], scores[batch["rejected"]]  # (P,)
    margin, group = batch["margin"].to(scores.dtype), batch["group"]
    counts = torch.bincount(group, minlength=batch["n_groups"])
    if bool((counts == counts[0]).all()):  # same K everywhere: the mean over pairs is the mean over prompts
        loss = bradley_terry_loss(c, r, margin=margin)
    else:
        loss = torch.stack([bradley_terry_loss(c[group == g], r[group == g], margin=margin[group == g])
                            for g in range(batch["n_groups"])]).mean()
    with torch.no_grad():
        d = (c - r).float()
        metrics = {"accuracy": pair_accuracy(d) / max(d.numel(), 1), "margin_mean": d.mean(),
                   "reward_mean": scores.float().mean(), "reward_std": scores.float().std(unbiased=False)}
    return loss, metrics


def pair_accuracy(d: torch.Tensor) -> torch.Tensor:
    """Correctly ordered pairs among score differences d = r_chosen - r_rejected (P,): 1 each where d > 0,
    0.5 where d == 0 (a tie), 0 where d < 0. A sum, so batches add up."""
    return (d > 0).float().sum() + 0.5 * (d == 0).float().sum()


@torch.no_grad()
def evaluate_rm(model, examples: list[dict], pad_id: int, device, batch_size: int = 16,
                member: int | None = 0) -> dict:
    """Pair accuracy, mean margin and reward mean/std over `examples` (the scores as the heads give them now) of
    reward member `member`; member=None: of the ensemble's mean score (a member's constant offset moves its
    reward mean, never a pair's order)."""
    model.eval()
    ok, pairs, margins, all_scores = 0.0, 0, [], []
    for i in range(0, len(examples), batch_size):
        b = collate_rankings(examples[i:i + batch_size], pad_id)
        ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        if member is None:
            s = model.ensemble_scores(ids, mask).float().cpu().mean(0)  # (S,)
        else:
            s = model.scores(ids, mask, member).float().cpu()
        d = s[b["chosen"]] - s[b["rejected"]]
        ok += float(pair_accuracy(d))
        pairs += d.numel()
        margins.append(d)
        all_scores.append(s)
    s, d = torch.cat(all_scores), torch.cat(margins)
    return {"accuracy": ok / max(pairs, 1), "margin_mean": float(d.mean()), "reward_mean": float(s.mean()),
            "reward_std": float(s.std(unbiased=False)), "pairs": pairs}


def split_validation(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val) by prompt, from a seeded permutation."""
    n_val = int(round(len(examples) * fraction))
    if fraction > 0 and len(examples) >= 2:
        n_val = max(1, n_val)
    if n_val == 0:
        return examples, []
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in perm[n_val:]], [examples[i] for i in perm[:n_val]]


def bootstrap_indices(n: int, seed: int) -> list[int]:
    """n indices into n examples drawn uniformly with replacement (a bootstrap resample, Efron 1979), seeded."""
    return torch.randint(n, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _drop_ties(examples: list[dict], what: str) -> tuple[list[dict], int]:
    kept, dropped, total = drop_tied_pairs(examples, what)
    if dropped:
        warnings.warn(f"{what}: dropped {dropped} of {total} pairs whose two responses are identical (chosen == "
                      "rejected, a response repeated in a ranking, or equal once cut to max_length)", stacklevel=2)
    return kept, dropped


@quiet_unless_progress
def train_rm(cfg: RMConfig, *, model=None, tokenizer=None, examples: list[dict] | None = None,
             val_examples: list[dict] | None = None, callback=None) -> dict:
    """Train the reward adapter and head. Returns {"model", "metrics", "val", "offset", "out"}.

    examples / val_examples: token-id rankings {"prompt_ids", "response_ids": [best, ..., worst],
    "margin": float | None} instead of reading cfg.data / cfg.val_data (a pair is K = 2).
    callback(step, model) -> dict of extra metrics, called at every logged step.
    """
    cfg.validate()
    tokenizer = L.resolve_tokenizer(cfg, tokenizer, model, need=examples is None or bool(cfg.val_data))
    if examples is None:
        examples = encode_rankings(load_rankings(cfg.data), tokenizer, cfg.max_length, cfg.data)
    check_examples(examples, ("prompt_ids", "response_ids"), "RM examples")
    # ties are dropped before the split, so the held-out share is of usable pairs
    examples, dropped = _drop_ties(fit_context(examples, cfg.max_length, "RM examples"), "RM examples")
    if val_examples is None and cfg.val_data:
        val_examples = encode_rankings(load_rankings(cfg.val_data), tokenizer, cfg.max_length, cfg.val_data)
    val_dropped = 0
    if val_examples is None:
        examples, val_examples = split_validation(examples, cfg.val_fraction, cfg.seed)
    elif val_examples:
        val_examples, val_dropped = _drop_ties(fit_context(val_examples, cfg.max_length, "RM validation examples"),
                                               "RM validation examples")
    device = D.init_from_env(cfg)
    L.seed_everything(cfg.seed)
    model = L.load_role_model(cfg, device, model, tokenizer)
    pad_id = L.pad_id(tokenizer, model)
    K = cfg.ensemble
    if K > 1:  # members 1..K-1 join the reward adapter on the same base; each starts from its own seed
        model.set_reward_members(K)
        for k in range(K):
            model.reset_reward_member(k, cfg.seed + k)
    # member k's view of the training prompts: itself for a single model, a bootstrap resample in an ensemble
    views = [list(range(len(examples)))] if K == 1 else [bootstrap_indices(len(examples), cfg.seed + k)
                                                          for k in range(K)]

    ids = {id(p) for k in range(K) for p in model.member_parameters(k)}
    params = [(n, p) for n, p in model.named_parameters() if id(p) in ids]
    with L.Run(cfg, "rm", params, len(examples), callback=callback, model=model) as run:
        for step in run:
            model.train()
            rows, per_member = run.sampler.next(), []
            for k in range(K):
                batch = collate_rankings([examples[views[k][i]] for i in rows], pad_id)
                batch = {n: v.to(device) if torch.is_tensor(v) else v for n, v in batch.items()}
                loss_k, metrics = rm_loss(model, batch, k)
                # torchrun: this process's share of the mean over the global batch's prompts
                (loss_k * D.share(batch["n_groups"])).backward()  # member by member: one graph alive at a time
                per_member.append((loss_k.detach(), metrics))
                run.tokens += int(batch["attention_mask"].sum())
            loss = torch.stack([m[0] for m in per_member]).mean() * D.share(len(rows))
            gnorm = run.apply(loss)
            if run.logging_now():
                metrics = per_member[0][1] if K == 1 else _member_metrics(per_member)
                metrics.update({"loss": run.loss, "grad_norm": gnorm, **run.common_metrics(device)})
                if cfg.eval_every and step % cfg.eval_every == 0 and val_examples:
                    metrics.update(validation_metrics(model, val_examples, pad_id, device, K)[0])
                run.log_row(metrics, ("loss", "accuracy", "margin_mean"))
        run.finish()  # the final checkpoint, before the offset changes the score head; out_dir stays locked
        model.trained_roles.add("reward")

        row, vals = validation_metrics(model, val_examples, pad_id, device, K) if val_examples else ({}, [{}] * K)
        offsets = [-v["reward_mean"] if (cfg.normalize and v) else 0.0 for v in vals]  # each member to mean 0
        for k, offset in enumerate(offsets):
            set_reward_offset(model, offset, k)
        val, offset = vals[0], offsets[0]
        normalization = {"offset": offset, "validation": val}
        if K > 1:
            val = {k[4:]: v for k, v in row.items() if k.count("/") == 1} | {"members": vals}
            normalization = {"offsets": offsets, "validation": val}
            row |= {f"reward_offset/member_{j}": o for j, o in enumerate(offsets)}
        run.log.log(run.step, row | {"reward_offset": offset, "data/dropped_pairs": dropped,
                                     "data/val_dropped_pairs": val_dropped})
        out = os.path.join(cfg.out_dir, "model")
        D.save_model(model, out, also=lambda: ckpt.atomic_write_json(
            os.path.join(out, "reward_normalization.json"), normalization))
    return {"model": model, "metrics": run.row, "val": val, "offset": offset if K == 1 else offsets, "out": out}


def validation_metrics(model, val_examples: list[dict], pad_id: int, device, K: int) -> tuple[dict, list[dict]]:
    """(logged row, each member's evaluate_rm). One model: val/<metric>. An ensemble: val/<metric> is the
    members' average, val/ensemble_<metric> that of the ensemble's mean score, val/member_k/<metric> member k's."""
    vals = [evaluate_rm(model, val_examples, pad_id, device, member=k) for k in range(K)]
    if K == 1:
        return {f"val/{k}": v for k, v in vals[0].items()}, vals
    row = {f"val/{k}": sum(v[k] for v in vals) / K for k in vals[0]}
    row |= {f"val/ensemble_{k}": v for k, v in evaluate_rm(model, val_examples, pad_id, device, member=None).items()}
    row |= {f"val/member_{j}/{k}": v for j, vj in enumerate(vals) for k, v in vj.items()}
    return row, vals


def _member_metrics(per_member: list) -> dict:
    # the members' mean under the usual names (what the bar shows), and each member's own
    out = {k: torch.stack([m[k] for _, m in per_member]).mean() for k in per_member[0][1]}
    for j, (loss, m) in enumerate(per_member):
        out |= {f"member_{j}/loss": loss} | {f"member_{j}/{k}": v for k, v in m.items()}
    return out

