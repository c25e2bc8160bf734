"""Helpers of the trainer and CLI tests: tiny models and data files (from tests/tiny.py), parameter
snapshots, float64 twins and materialised logits for the reference paths, kernel-call counters. A uniquely named
module, so test files in several folders can import it (`conftest` is ambiguous)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import build_tiny_model, make_data, tiny_tokenizer, words, write_jsonl  # noqa: F401


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
