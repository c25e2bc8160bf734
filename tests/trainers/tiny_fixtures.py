"""Helpers of the trainer and CLI tests: tiny models (from tests/models/conftest.py), data files, parameter
snapshots. A uniquely named module, so test files in several folders can import it (`conftest` is ambiguous)."""

from __future__ import annotations

import importlib.util
import json
import os
import random

_spec = importlib.util.spec_from_file_location(
    "_rlhf_fast_tiny_models", os.path.join(os.path.dirname(__file__), "..", "models", "conftest.py"))
tiny_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_models)
build_tiny_model = tiny_models.build_tiny_model
tiny_tokenizer = tiny_models.tiny_tokenizer


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def make_data(folder, n: int = 24, seed: int = 0) -> dict[str, str]:
    """SFT (the completion copies the prompt backwards), preference pairs (chosen is full of w7, rejected of
    w8), 3-way rankings, PPO prompts and PTX text, as JSONL files in `folder`."""
    rng = random.Random(seed)
    sft, pairs, ranks, prompts, texts = [], [], [], [], []
    for _ in range(n):
        p = [rng.randrange(10, 40) for _ in range(rng.randrange(2, 5))]
        sft.append({"prompt": words(p), "completion": words(p[::-1])})
        k = rng.randrange(1, 4)
        pairs.append({"prompt": words(p), "chosen": words([7] * k + p), "rejected": words([8] * k + p)})
        ranks.append({"prompt": words(p), "responses": [words([7] * 3), words([7, 9, 9]), words([8] * 3)]})
        prompts.append({"prompt": words(p)})
        texts.append({"text": words(p + p)})
    out = {}
    for name, rows in (("sft", sft), ("pairs", pairs), ("ranks", ranks), ("prompts", prompts), ("ptx", texts)):
        out[name] = write_jsonl(os.path.join(folder, f"{name}.jsonl"), rows)
    return out


def trainable_snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved(before: dict, model) -> set[str]:
    """Names of the parameters that changed."""
    return {n for n, p in model.named_parameters() if not torch_equal(before[n], p.detach())}


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
