"""Supervised fine-tuning: next-token loss on the completion tokens only, through the fused log-prob op.

Trains the `policy` LoRA adapter of a RoleModel. At the end the adapter can be merged into the base,
so that the saved base *is* the SFT model: the reference that the KL penalty of PPO anchors to.

    from rlhf_fast.trainers import SFTConfig, train_sft
    result = train_sft(SFTConfig(model="path/to/model", data="sft.jsonl", out_dir="out/sft"))
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from rlhf_fast.data.collate import collate_sft
from rlhf_fast.data.jsonl import check_examples, encode_sft, fit_context, load_sft
from rlhf_fast.ops import fused_linear_logprobs
from rlhf_fast.trainers import distributed as D
from rlhf_fast.trainers import loop as L
from rlhf_fast.trainers.config import TrainConfig, option, quiet_unless_progress


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning of the policy adapter on {"prompt", "completion"} or {"messages"} JSONL."""

    merge: bool = option(True, "merge the policy adapter into the base at the end and save the merged base "
                               "(out_dir/model): later stages use it as --model and as the KL reference")


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean negative log-likelihood of the completion tokens, and their count.

    policy_forward aligns hidden[:, t] (the state at t - 1) with token t; prompt and padding positions are
    set to ignore_index and get no loss and no gradient. Under torchrun the count is that of every process's
    tokens (all-reduced) and the loss this process's share of the global mean: the shares sum to it."""
    f = model.policy_forward(batch["input_ids"], batch["attention_mask"])  # hidden (B, T, H), aligned
    targets = f.targets.masked_fill(batch["loss_mask"] == 0, -100)  # (B, T)
    logprobs = fused_linear_logprobs(f.hidden, f.weight, targets, f.bias)  # (B, T)
    n = D.all_reduce((targets != -100).sum())  # the global token count (this process's alone at world 1)
    return -logprobs.sum() / n.clamp(min=1), n


@quiet_unless_progress
def train_sft(cfg: SFTConfig, *, model=None, tokenizer=None, examples: list[dict] | None = None,
              callback=None) -> dict:
    """Run SFT. Returns {"model": RoleModel, "metrics": last logged row, "out": saved model folder}.

    model: a RoleModel or transformers model to train instead of loading cfg.model.
    examples: token-id examples {"prompt_ids", "completion_ids"} instead of reading cfg.data.
    callback(step, model) -> dict of extra metrics, called at every logged step.
    Every check (options, data, model folder) runs before anything is written to cfg.out_dir.
    """
    cfg.validate()
    tokenizer = L.resolve_tokenizer(cfg, tokenizer, model, need=examples is None)
    if examples is None:
        examples = encode_sft(load_sft(cfg.data), tokenizer, cfg.max_length, cfg.data)
    check_examples(examples, ("prompt_ids", "completion_ids"), "SFT examples")
    examples = fit_context(examples, cfg.max_length, "SFT examples")
    device = D.init_from_env(cfg)
    L.seed_everything(cfg.seed)
    model = L.load_role_model(cfg, device, model, tokenizer)
    pad_id = L.pad_id(tokenizer, model)
    model.train()

    params = L.trainable_named_parameters(model, ["policy"])
    with L.Run(cfg, "sft", params, len(examples), callback=callback, model=model) as run:
        for _ in run:
            batch = collate_sft([examples[i] for i in run.sampler.next()], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, n = sft_loss(model, batch)
            loss.backward()
            gnorm = run.apply(loss)
            run.tokens += int(batch["attention_mask"].sum())
            if run.logging_now():
                run.log_row({"loss": run.loss, "grad_norm": gnorm, "completion_tokens": int(n),
                             **run.common_metrics(device)}, ("loss", "grad_norm", "tokens/s"))
        run.finish()  # the final checkpoint (before the merge resets the adapter); out_dir stays locked
        model.trained_roles.add("policy")
        model.eval()
        out = os.path.join(cfg.out_dir, "model")
        if cfg.merge:
            model.merge_policy_into_base()  # the base becomes the SFT model; a fresh policy adapter starts from it
        D.save_model(model, out, save_base=cfg.merge)
    return {"model": model, "metrics": run.row, "out": out}
