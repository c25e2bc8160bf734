"""SFT: on a learnable task the loss falls and held-out completions become likely, only the policy adapter
moves; the loss and its gradient on the torch and Triton backends equal a float64 reference from materialised
logits; a Triton run trains like a torch run; the merged base becomes the SFT model; a resumed run matches an
uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from tiny_fixtures import (
    count_calls,
    float64_twin,
    materialised,
    moved,
    next_token_logprobs,
    perturb,
    require_triton_on_cpu,
    trainable_snapshot,
)

from rlhf_fast.data.collate import collate_sft
from rlhf_fast.models import RoleModel
from rlhf_fast.trainers import OptimConfig, SFTConfig, train_sft
from rlhf_fast.trainers import checkpoint as ckpt
from rlhf_fast.trainers.sft import sft_loss
from tests.tolerances import assert_close


def cfg(tiny_model, data_files, out, **kw):
    base = dict(model=tiny_model, data=data_files["sft"], out_dir=str(out), batch_size=8, max_steps=12,
                progress=False, merge=False, optim=OptimConfig(lr=3e-3))
    return SFTConfig(**(base | kw))


def losses(out):
    return [json.loads(ln)["loss"] for ln in open(os.path.join(out, "metrics.jsonl"))]


def marked_examples(n: int, seed: int) -> list[dict]:
    """A pattern a tiny model learns in a few steps: any prompt, then w3 w4, the first prompt token, <eos>."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [rng.randrange(12, 60) for _ in range(rng.randrange(2, 5))]
        out.append({"prompt_ids": p, "completion_ids": [6, 7, p[0], 1]})
    return out


def completion_nll(model, examples) -> float:
    with torch.no_grad():
        return float(sft_loss(model, collate_sft(examples, 0))[0])


def test_loss_falls_held_out_completions_become_likely_and_only_the_policy_adapter_moves(tiny_model, tmp_path):
    model = RoleModel.from_pretrained(tiny_model)
    before = trainable_snapshot(model)
    held_out = marked_examples(16, seed=100)  # prompts never trained on
    nll0 = completion_nll(model, held_out)
    train_sft(SFTConfig(model=tiny_model, out_dir=str(tmp_path), batch_size=8, max_steps=20, progress=False,
                        merge=False, optim=OptimConfig(lr=1e-2)), model=model, examples=marked_examples(32, 0))
    ls = losses(tmp_path)
    # seeds 0, 1, 2 (data, LoRA init, order): training loss 5.2-5.4 -> 1.2-1.6, held-out NLL 5.2-5.3 -> 1.8-2.3
    assert sum(ls[-3:]) / 3 < 0.5 * sum(ls[:3]) / 3, ls
    nll1 = completion_nll(model, held_out)
    assert nll1 < 0.6 * nll0, (nll0, nll1)
    changed = moved(before, model)
    policy = {n for n, p in model.named_parameters() if any(p is q for q in model.role_parameters("policy"))}
    assert changed and changed <= policy  # base, critic, reward and both heads untouched
    assert os.path.isfile(os.path.join(tmp_path, "model", "adapters", "policy", "adapter_model.safetensors"))


def reference_sft_loss(model64, batch):
    """sft_loss written plainly in float64: transformers' logits, log_softmax, the next-token target, the mean
    over completion tokens (loss_mask) that have a real token before them."""
    ids, attn, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    logits, _ = materialised(model64, ids, attn, "policy")  # (B, T, V) float64
    lp = next_token_logprobs(logits, ids)  # (B, T)
    m = loss_mask.double()
    m[:, 1:] *= attn[:, :-1]  # token t needs a real token t - 1 to be predicted from
    m[:, 0] = 0
    return -(lp * m).sum() / m.sum()


SFT_BATCH = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 1]},
             {"prompt_ids": [5], "completion_ids": [10, 11, 12, 13, 14, 1]},
             {"prompt_ids": [20, 21, 22, 23, 24], "completion_ids": [30, 1]}]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_and_policy_gradient_equal_float64_materialised_logits(tiny_model, backend, monkeypatch):
    if backend == "triton":
        require_triton_on_cpu()
    model = RoleModel.from_pretrained(tiny_model).eval()
    perturb(model.role_parameters("policy"))  # a non-zero adapter, so every LoRA gradient is exercised
    model64 = float64_twin(model, tiny_model)
    batch = collate_sft(SFT_BATCH, pad_id=0)  # right-padded, T = 8

    monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
    if backend == "triton":
        from rlhf_fast.kernels import logprobs as kernels

        calls = count_calls(monkeypatch, kernels, "linear_logprobs_fwd", "linear_logprobs_bwd")
    params = model.role_parameters("policy")
    loss, n = sft_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    if backend == "triton":
        assert calls == {"linear_logprobs_fwd": 1, "linear_logprobs_bwd": 1}

    params64 = model64.role_parameters("policy")
    ref = reference_sft_loss(model64, batch)
    ref_grads = torch.autograd.grad(ref, params64)
    assert int(n) == 3 + 6 + 2
    assert_close(loss, ref, torch.float32)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r, torch.float32)


def test_triton_run_trains_like_a_torch_run(tiny_model, data_files, tmp_path, monkeypatch):
    require_triton_on_cpu()
    from rlhf_fast.kernels import logprobs as kernels

    calls = count_calls(monkeypatch, kernels, "linear_logprobs_bwd")
    finals = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
        torch.manual_seed(0)  # the LoRA A matrices are drawn from the global RNG
        model = RoleModel.from_pretrained(tiny_model)
        train_sft(cfg(tiny_model, data_files, tmp_path / backend, max_steps=3), model=model)
        finals.append([p.detach().clone() for p in model.role_parameters("policy")])
    assert calls["linear_logprobs_bwd"] == 3  # the Triton run's three steps, none of the torch run's
    for a, b in zip(*finals, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_merge_makes_the_base_the_sft_model(tiny_model, data_files, tmp_path):
    r = train_sft(cfg(tiny_model, data_files, tmp_path, max_steps=4, merge=False))
    model = r["model"]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        sft_lp = model.logprobs(ids, mask, "policy")
    model.merge_policy_into_base()
    model.save(tmp_path / "merged", save_base=True)
    reloaded = RoleModel.from_pretrained(str(tmp_path / "merged" / "base"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.logprobs(ids, mask, "reference"), sft_lp, rtol=1e-4, atol=1e-5)
    r2 = train_sft(cfg(tiny_model, data_files, tmp_path / "m2", max_steps=1, merge=True))
    assert os.path.isfile(os.path.join(r2["out"], "base", "config.json"))


def test_resume_matches_uninterrupted(tiny_model, data_files, tmp_path):
    full = train_sft(cfg(tiny_model, data_files, tmp_path / "a", max_steps=6, checkpoint_every=3,
                         keep_checkpoints=5))
    want = [p.detach().clone() for p in full["model"].role_parameters("policy")]
    out = tmp_path / "b"
    train_sft(cfg(tiny_model, data_files, out, max_steps=6, checkpoint_every=3, keep_checkpoints=5))
    shutil.rmtree(out / "checkpoints" / "step-00000006")  # as if killed after the step-3 checkpoint
    assert os.path.basename(ckpt.latest_checkpoint(str(out / "checkpoints"))) == "step-00000003"
    torch.manual_seed(123)  # the resumed run must not depend on the process's RNG state
    res = train_sft(cfg(tiny_model, data_files, out, max_steps=6, checkpoint_every=3, keep_checkpoints=5,
                        resume=True))
    for a, b in zip(want, res["model"].role_parameters("policy")):
        assert torch.equal(a, b.detach())
    assert [json.loads(ln)["step"] for ln in open(out / "metrics.jsonl")] == list(range(1, 7))
    assert losses(out) == losses(tmp_path / "a")
