"""Helpers of the trainer and CLI tests: tiny models (from tests/models/conftest.py), data files, parameter
snapshots, float64 twins and materialised logits for the reference paths, kernel-call counters. A uniquely named
module, so test files in several folders can import it (`conftest` is ambiguous)."""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest
import torch

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
    return bool(torch.equal(a, b))


# ------------------------------------------------------------------------- reference paths (float64, logits)

def perturb(params, std: float = 0.05) -> None:
    """Random adapters and heads (B = 0 would hide every LoRA gradient but B's)."""
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, std)


def float64_twin(model, path: str):
    """A float64 RoleModel with `model`'s base, adapters and heads: the reference side of a comparison."""
    from rlhf_fast.models import RoleModel

    twin = RoleModel.from_pretrained(path)
    twin.load_state_dict(model.state_dict())
    return twin.double().eval()


def materialised(model, ids, attn, role: str):
    """transformers' own forward of `role` (peft's adapter on): (logits (B, T, V), final hidden (B, T, H)).

    Positions count real tokens only (left-padded rows score as if unpadded), as RoleModel documents."""
    positions = (attn.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    with model.role(role):
        out = model.lm(input_ids=ids, attention_mask=attn, position_ids=positions, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def next_token_logprobs(logits, ids):
    """(B, T) float64: entry t = log softmax(logits[:, t - 1])[ids[:, t]], entry 0 = 0."""
    lp = logits.double().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    return torch.nn.functional.pad(lp, (1, 0))


def require_triton_on_cpu() -> None:
    from rlhf_fast.ops import _dispatch

    if not _dispatch.triton_usable(torch.device("cpu")):
        pytest.skip("Triton on CPU tensors needs triton and TRITON_INTERPRET=1 (tests/conftest.py sets it)")


def count_calls(monkeypatch, module, *names: str) -> dict[str, int]:
    """Wrap module.<name> for each name so the test can see the code path it meant to test was taken."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        fn = getattr(module, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts
