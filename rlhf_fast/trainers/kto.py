"""KTO: Kahneman-Tversky optimisation of the policy adapter on unpaired feedback (Ethayarajh et al. 2024).

    rlhf-fast kto --model out/sft/model/base --data feedback.jsonl --out_dir out/kto

Data: {"prompt", "completion", "label": true | false} JSONL, one completion per line, desirable (true) or not
(false); no pairs needed. With r = log pi(y|x) - log pi_ref(y|x) (sums over the completion's tokens; pi_ref the
base with the adapters off) and z0 the reference point,

    loss(x, y) = desirable_weight   * (1 - sigmoid(beta (r - z0)))   when y is desirable
                 undesirable_weight * (1 - sigmoid(beta (z0 - r)))   when it is not,

averaged over the batch (ops.kto_loss). z0 estimates KL(pi || pi_ref) from mismatched pairs within the batch, as
the paper and TRL do: completion i is scored after prompt (i + 1) mod B, z0 = the mean over the batch of r of
those pairs, detached (no gradient) and clamped at 0 inside kto_loss. batch_size must be >= 2 for it.

Each step: one forward of the policy with gradients (the B matched rows), one without (the B mismatched rows),
one of the reference over all 2B. Metrics (TRL's names): loss, kl, rewards/chosen, rewards/rejected (beta r of
the desirable and undesirable completions), logps/chosen, logps/rejected; a side absent from the batch is not
logged at that step. Dropout is off (TRL's disable_dropout default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from rlhf_fast.data.collate import collate_sft
from rlhf_fast.data.jsonl import check_examples, encode_sft, fit_context, load_unpaired
from rlhf_fast.ops import kto_loss
from rlhf_fast.trainers import distributed as D
from rlhf_fast.trainers import loop as L
from rlhf_fast.trainers.config import ConfigError, TrainConfig, option, quiet_unless_progress
from rlhf_fast.trainers.dpo import policy_logps, reference_logps


@dataclass
class KTOConfig(TrainConfig):
    """KTO of the policy adapter on {"prompt", "completion", "label": true|false} JSONL."""

    batch_size: int = option(8, "completions per optimiser step (>= 2: the KL estimate pairs each completion "
                                "with another example's prompt)")
    beta: float = option(0.1, "temperature of the implicit reward")
    desirable_weight: float = option(1.0, "weight of the desirable completions' losses (lambda_D)")
    undesirable_weight: float = option(1.0, "weight of the undesirable completions' losses (lambda_U)")

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 for KTO's KL estimate, got {self.batch_size}")
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0 or \
                self.desirable_weight + self.undesirable_weight == 0:
            raise ConfigError("desirable_weight and undesirable_weight must be >= 0, not both 0, got "
                              f"{self.desirable_weight}, {self.undesirable_weight}")


def collate_kto(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, loss_mask (2B, T): the B examples, then the B mismatched rows (prompt i with
    completion (i - 1) mod B, i.e. completion i after prompt (i + 1) mod B); desirable (B,) bool."""
    B = len(examples)
    rows = examples + [{"prompt_ids": examples[i]["prompt_ids"], "completion_ids": examples[(i - 1) % B]["completion_ids"]}
                       for i in range(B)]
    out = collate_sft(rows, pad_id)
    out["desirable"] = torch.tensor([bool(e["label"]) for e in examples])
    return out


def kto_batch_loss(model, cfg: KTOConfig, batch: dict) -> tuple[torch.Tensor, dict]:
    """The KTO loss of a collate_kto batch and its metrics."""
    B = batch["desirable"].shape[0]
    rows = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    matched = {k: v[:B] for k, v in rows.items()}
    logps, _ = policy_logps(model, matched)  # (B,) with gradients
    with torch.no_grad():
        kl_logps, _ = policy_logps(model, {k: v[B:] for k, v in rows.items()})  # (B,) mismatched
        ref, _ = reference_logps(model, rows)  # (2B,)
    kl = (kl_logps - ref[B:]).mean().detach()
    ref_logps = ref[:B].to(logps.dtype)
    d = batch["desirable"]
    loss, stats = kto_loss(logps, ref_logps, d, kl, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                           undesirable_weight=cfg.undesirable_weight)
    metrics = {"kl": stats["kl"]}  # z0: the estimate clamped at 0, as the loss used it (TRL's "kl")
    with torch.no_grad():
        rewards = cfg.beta * (logps - ref_logps)  # (B,)
        for side, m in (("chosen", d), ("rejected", ~d)):
            if bool(m.any()):
                metrics[f"rewards/{side}"] = rewards[m].mean()
                metrics[f"logps/{side}"] = logps[m].mean()
    return loss, metrics


@quiet_unless_progress
def train_kto(cfg: KTOConfig, *, model=None, tokenizer=None, examples: list[dict] | None = None,
              callback=None) -> dict:
    """Run KTO. Returns {"model", "metrics": last logged row, "out"}.

    examples: token-id examples {"prompt_ids", "completion_ids", "label": bool} instead of reading cfg.data.
    callback(step, model) -> dict of extra metrics, called at every logged step.
    Every check (options, data, model folder) runs before anything is written to cfg.out_dir.
    """
    cfg.validate()
    D.refuse("kto (its KL reference point is a batch statistic, not yet all-reduced)")
    tokenizer = L.resolve_tokenizer(cfg, tokenizer, model, need=examples is None)
    if examples is None:
        records = load_unpaired(cfg.data)
        examples = [dict(e, label=r["label"]) for r, e in
                    zip(records, encode_sft(records, tokenizer, cfg.max_length, cfg.data))]
    check_examples(examples, ("prompt_ids", "completion_ids", "label"), "KTO examples")
    examples = fit_context(examples, cfg.max_length, "KTO examples")
    device = L.resolve_device(cfg.device)
    L.seed_everything(cfg.seed)
    model = L.load_role_model(cfg, device, model, tokenizer)
    pad_id = L.pad_id(tokenizer, model)
    model.eval()  # no dropout: the matched, mismatched and reference passes see the same network

    params = L.trainable_named_parameters(model, ["policy"])
    with L.Run(cfg, "kto", params, len(examples), callback=callback, model=model) as run:
        for _ in run:
            batch = collate_kto([examples[i] for i in run.sampler.next()], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, metrics = kto_batch_loss(model, cfg, batch)
            loss.backward()
            metrics.update(loss=loss.detach(), grad_norm=run.apply(loss))
            run.tokens += int(batch["attention_mask"].sum())
            if run.logging_now():
                run.log_row(metrics | run.common_metrics(device), ("loss", "kl"))
        run.finish()  # the final checkpoint; the out_dir stays locked until the model is saved
        model.trained_roles.add("policy")
        out = os.path.join(cfg.out_dir, "model")
        model.save(out, save_base=False)
    return {"model": model, "metrics": run.row, "out": out}
