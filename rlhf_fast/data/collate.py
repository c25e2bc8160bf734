"""Batches of token-id examples as padded tensors.

Training batches are right-padded; prompts for generation are left-padded so every row's last prompt
token sits in the last column. Per-token masks are aligned with input_ids: mask[:, t] refers to token t.
Every mask is int64 with values 0 and 1 only: the role model and the ops read any nonzero value as 1 (they
take mask.bool() or multiply by it as a 0/1 weight), so a hand-built mask with other values is not a weighting.
"""

from __future__ import annotations

import itertools

import torch


def pad(seqs: list[list[int]], pad_id: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T) int64, T the longest sequence."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def collate_sft(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and loss_mask (1 on completion tokens only), all (B, T)."""
    seqs = [e["prompt_ids"] + e["completion_ids"] for e in examples]
    ids, mask = pad(seqs, pad_id)
    loss_mask = torch.zeros_like(mask)  # (B, T)
    for i, e in enumerate(examples):
        p, c = len(e["prompt_ids"]), len(e["completion_ids"])
        loss_mask[i, p:p + c] = 1
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def collate_rankings(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Every response of every prompt as one row, and all C(K, 2) pairs of each prompt.

    Returns input_ids, attention_mask (S, T) with S = sum of K over prompts; chosen, rejected (P,) row
    indices of each pair (chosen ranked above rejected); margin (P,) (0 where none was given); group (P,)
    the prompt each pair belongs to; n_groups.
    """
    seqs, chosen, rejected, margin, group = [], [], [], [], []
    for g, e in enumerate(examples):
        base = len(seqs)
        seqs += [e["prompt_ids"] + r for r in e["response_ids"]]
        for i, j in itertools.combinations(range(len(e["response_ids"])), 2):
            chosen.append(base + i)
            rejected.append(base + j)
            margin.append(float(e.get("margin") or 0.0))
            group.append(g)
    ids, mask = pad(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "chosen": torch.tensor(chosen),
            "rejected": torch.tensor(rejected), "margin": torch.tensor(margin, dtype=torch.float32),
            "group": torch.tensor(group), "n_groups": len(examples)}


def collate_prompts(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt_ids and prompt_mask (B, Tp) for generation."""
    ids, mask = pad([e["prompt_ids"] for e in examples], pad_id, left=True)
    return {"prompt_ids": ids, "prompt_mask": mask}


def collate_texts(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (B, T) of plain text, and loss_mask = attention_mask."""
    ids, mask = pad([e["input_ids"] for e in examples], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.clone()}
