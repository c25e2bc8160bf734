"""SFT: the completion loss falls, only the policy adapter moves, the fused loss equals the plain one, the
merged base becomes the SFT model, a resumed run matches an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil

import torch
from tiny_fixtures import moved, trainable_snapshot

from rlhf_fast.trainers import checkpoint as ckpt
from rlhf_fast.data.collate import collate_sft
from rlhf_fast.models import RoleModel
from rlhf_fast.trainers import OptimConfig, SFTConfig, train_sft
from rlhf_fast.trainers.sft import sft_loss


def cfg(tiny_model, data_files, out, **kw):
    base = dict(model=tiny_model, data=data_files["sft"], out_dir=str(out), batch_size=8, max_steps=12,
                progress=False, merge=False, optim=OptimConfig(lr=3e-3))
    return SFTConfig(**(base | kw))


def losses(out):
    return [json.loads(ln)["loss"] for ln in open(os.path.join(out, "metrics.jsonl"))]


def test_loss_falls_and_only_the_policy_adapter_moves(tiny_model, data_files, tmp_path):
    model = RoleModel.from_pretrained(tiny_model)
    before = trainable_snapshot(model)
    train_sft(cfg(tiny_model, data_files, tmp_path), model=model)
    ls = losses(tmp_path)
    assert sum(ls[-3:]) / 3 < 0.8 * sum(ls[:3]) / 3, ls
    changed = moved(before, model)
    policy = {n for n, p in model.named_parameters() if any(p is q for q in model.role_parameters("policy"))}
    assert changed and changed <= policy  # base, critic, reward and both heads untouched
    assert os.path.isfile(os.path.join(tmp_path, "model", "adapters", "policy", "adapter_model.safetensors"))


def test_fused_loss_equals_materialised_logits(tiny_model):
    model = RoleModel.from_pretrained(tiny_model)
    with torch.no_grad():  # a non-zero adapter, so its gradient path is exercised
        for p in model.role_parameters("policy"):
            p.normal_(0, 0.05)
    batch = collate_sft([{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 1]},
                         {"prompt_ids": [5], "completion_ids": [10, 1]}], pad_id=0)
    loss, n = sft_loss(model, batch)
    params = model.role_parameters("policy")
    g_fused = torch.autograd.grad(loss, params)
    with model.role("policy"):
        logits = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)[:, 1:]
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))
    g_ref = torch.autograd.grad(ref, params)
    assert int(n) == 5
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)


def test_torch_backend_matches_default(tiny_model, data_files, tmp_path, monkeypatch):
    finals = []
    for backend in ("torch", "auto"):
        monkeypatch.setenv("RLHF_FAST_BACKEND", backend)
        torch.manual_seed(0)  # the LoRA A matrices are drawn from the global RNG
        model = RoleModel.from_pretrained(tiny_model)
        train_sft(cfg(tiny_model, data_files, tmp_path / backend, max_steps=3), model=model)
        finals.append([p.detach().clone() for p in model.role_parameters("policy")])
    for a, b in zip(*finals):
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
    res = train_sft(cfg(tiny_model, data_files, out, max_steps=6, checkpoint_every=3, resume=True))
    for a, b in zip(want, res["model"].role_parameters("policy")):
        assert torch.equal(a, b.detach())
    assert [json.loads(ln)["step"] for ln in open(out / "metrics.jsonl")] == list(range(1, 7))
    assert losses(out) == losses(tmp_path / "a")
