"""rlhf_fast.integrations.trl inside real TRL 1.16 trainers: one GRPOTrainer and one DPOTrainer step on a tiny
model, with TRL's own fused LM head and with patch_trl(), give the same loss and gradients; the patched step
really runs fused_linear_logprobs; unpatch restores TRL. The head itself is checked against a float64
formula on materialised logits and against TRL's kernel."""

from __future__ import annotations

import contextlib

import pytest
import torch

trl = pytest.importorskip("trl")

import trl.trainer.utils as trl_utils  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: E402

from rlhf_fast import ops  # noqa: E402
from rlhf_fast.integrations import trl as rf_trl  # noqa: E402
from tests.tiny import build_tiny_model, tiny_tokenizer  # noqa: E402
from tests.tolerances import TOL  # noqa: E402

OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.fixture(autouse=True)
def _unpatched():
    rf_trl.unpatch_trl()
    yield
    rf_trl.unpatch_trl()


# --- the head against a float64 formula and against TRL's kernel -------------------------------------------


def reference_head(hidden, weight, bias, targets, temperature, logit_scale):
    """float64, materialised logits: z = s (h W^T + b) / T."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale / temperature
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    first_argmax = z.argmax(dim=-1)
    return (logp.gather(-1, targets[:, None])[:, 0], -(p * logp).sum(-1), torch.log((p * p).sum(-1)),
            z.mean(-1), first_argmax == targets)


@pytest.mark.parametrize("n,v,bias,temperature,logit_scale", [
    (1, 37, False, 1.0, 1.0),
    (29, 1025, True, 0.7, 1.0),
    (5, 4099, True, 1.3, 0.5),  # more than one vocabulary block of the metrics pass
])
def test_head_matches_float64_reference(n, v, bias, temperature, logit_scale):
    h = torch.randn(n, 16, requires_grad=True)
    w = (0.3 * torch.randn(v, 16)).requires_grad_()
    b = torch.randn(v, requires_grad=True) if bias else None
    t = torch.randint(0, v, (n,))
    late = v - 2  # in a later vocabulary block than token 3 when v > 4096
    t[0] = late
    with torch.no_grad():  # row 0: tokens 3 and `late` tie for the largest logit; the first argmax (3) is top-1
        w[3] = w[late] = 0.5 * h[0]
        if b is not None:
            b[3] = b[late]
    params = [x for x in (h, w, b) if x is not None]
    params64 = [x.detach().double().requires_grad_() for x in params]
    got = rf_trl.FusedLinearLogprobsHead.apply(h, w, b, t, temperature, 32768, None, logit_scale, OUTPUTS)
    ref = reference_head(params64[0], params64[1], params64[2] if bias else None, t, temperature, logit_scale)
    assert not got[4][0] and not ref[4][0]
    rtol, atol = TOL[torch.float32]
    for name, g, r in zip(("log_probs", *OUTPUTS), got, ref):
        if name == "is_top1":
            assert torch.equal(g, r), name
        else:
            torch.testing.assert_close(g.double(), r, rtol=rtol, atol=atol, msg=name)
    g_got = torch.autograd.grad(got[0].sum() + 0.3 * got[1].sum(), params)
    g_ref = torch.autograd.grad(ref[0].sum() + 0.3 * ref[1].sum(), params64)
    for g, r in zip(g_got, g_ref):
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=atol)


def test_head_matches_trl_kernel_and_skips_unrequested_outputs():
    h, w, t = torch.randn(11, 8), torch.randn(300, 8), torch.randint(0, 300, (11,))
    ours = rf_trl.FusedLinearLogprobsHead.apply(h, w, None, t, 0.9, 32768, None, 1.0, ("entropy",))
    theirs = ChunkedLogProbFunction.apply(h, w, None, t, 0.9, 32768, None, 1.0, ("entropy",))
    assert ours[2:] == (None, None, None) and theirs[2:] == (None, None, None)
    for a, b in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(a, b, rtol=TOL[torch.float32][0], atol=TOL[torch.float32][1])
    assert rf_trl.FusedLinearLogprobsHead.apply(h, w, None, t, 1.0, 32768, None, 1.0, ())[1] is None


def test_head_with_no_positions():
    # TRL's CUDA path scores only the valid positions: an all-masked micro-batch hands over N = 0.
    h, w = torch.zeros(0, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    out = rf_trl.FusedLinearLogprobsHead.apply(h, w, None, torch.zeros(0, dtype=torch.int64), 1.0, 32768, None,
                                               1.0, OUTPUTS)
    assert [tuple(x.shape) for x in out] == [(0,)] * 5
    (out[0].sum() + out[1].sum()).backward()
    assert w.grad is None or not w.grad.any()


def test_softcap_falls_back_to_trl_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "fused_linear_logprobs", lambda *a, **k: calls.append(1))
    h, w, t = torch.randn(4, 8), torch.randn(50, 8), torch.randint(0, 50, (4,))
    with pytest.warns(UserWarning, match="soft-cap"):
        ours = rf_trl.FusedLinearLogprobsHead.apply(h, w, None, t, 1.0, 32768, 30.0, 1.0, ())
    assert not calls
    torch.testing.assert_close(ours[0], ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 32768, 30.0, 1.0, ())[0])


def test_patch_unpatch_restore_trl():
    original = trl_utils._ChunkedLogProbFunction
    assert original is ChunkedLogProbFunction and not rf_trl.is_trl_patched()
    rf_trl.patch_trl()
    rf_trl.patch_trl()  # idempotent: unpatch must still restore TRL's kernel, not our head
    assert trl_utils._ChunkedLogProbFunction is rf_trl.FusedLinearLogprobsHead and rf_trl.is_trl_patched()
    rf_trl.unpatch_trl()
    assert trl_utils._ChunkedLogProbFunction is original and not rf_trl.is_trl_patched()
    with rf_trl.trl_patched():
        assert trl_utils._ChunkedLogProbFunction is rf_trl.FusedLinearLogprobsHead
    assert trl_utils._ChunkedLogProbFunction is original


def test_patch_refuses_an_unknown_kernel_signature(monkeypatch):
    class Other:
        @staticmethod
        def forward(ctx, hidden, weight, targets):
            pass

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Other)
    with pytest.raises(RuntimeError, match="written for"):
        rf_trl.patch_trl()
    assert trl_utils._ChunkedLogProbFunction is Other


# --- one real TRL step, with and without the patch -------------------------------------------------------------


class _GradSnapshot(TrainerCallback):
    """Gradients of every trainable parameter just before the (only) optimiser step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad and p.grad is not None}


def _count_calls(monkeypatch):
    """Counts calls of fused_linear_logprobs and of TRL's own kernel."""
    calls = {"ours": 0, "trl": 0}
    ours, theirs = ops.fused_linear_logprobs, ChunkedLogProbFunction.apply

    def counted_ours(*a, **k):
        calls["ours"] += 1
        return ours(*a, **k)

    def counted_theirs(*a, **k):
        calls["trl"] += 1
        return theirs(*a, **k)

    monkeypatch.setattr(ops, "fused_linear_logprobs", counted_ours)
    monkeypatch.setattr(ChunkedLogProbFunction, "apply", counted_theirs)
    return calls


def _run_one_step(trainer):
    snap = _GradSnapshot()
    trainer.add_callback(snap)
    losses = []
    compute_loss = trainer.compute_loss

    def recorded(*a, **k):
        loss = compute_loss(*a, **k)
        losses.append(loss.detach().clone())
        return loss

    trainer.compute_loss = recorded
    trainer.train()
    assert len(losses) == 1 and snap.grads
    return losses[0], snap.grads


def _assert_same_step(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    rtol, atol = TOL[torch.float32]
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    assert any(g.abs().max() > 0 for g in grads_a.values())  # a zero-gradient step would prove nothing
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=rtol, atol=atol, msg=name)


def _common_args(tmp_path, **kw):
    return dict(output_dir=str(tmp_path / "out"), max_steps=1, learning_rate=1e-3, max_grad_norm=0.0,
                report_to="none", save_strategy="no", logging_steps=1, bf16=False, use_cpu=True, seed=0,
                dataloader_num_workers=0, disable_tqdm=True, **kw)


def _word_reward(completions, **kwargs):
    # Rewards that differ inside a group, so GRPO's advantages (and gradients) are not zero.
    return [float(sum(int(w[1:]) % 7 for w in c.split() if w[1:].isdigit())) for c in completions]


def _grpo_step(model_path, tmp_path, patched):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**_common_args(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=6, temperature=0.7, beta=0.04, entropy_coef=0.01, use_vllm=False)
    prompts = Dataset.from_list([{"prompt": p} for p in ("w1 w2 w3", "w4 w5", "w9 w8 w7 w6", "w10")])
    tok = tiny_tokenizer()  # AutoTokenizer would pick the architecture's own class (Qwen2Tokenizer) over ours
    with rf_trl.trl_patched() if patched else contextlib.nullcontext():
        trainer = GRPOTrainer(model=model_path, reward_funcs=_word_reward, args=args, train_dataset=prompts,
                              processing_class=tok)
        return _run_one_step(trainer)


def _dpo_step(model_path, tmp_path, patched, **config):
    from trl import DPOConfig, DPOTrainer

    peft_config = config.pop("peft_config", None)
    args = DPOConfig(**_common_args(tmp_path), per_device_train_batch_size=4, max_length=32, beta=0.1, **config)
    pairs = Dataset.from_list([
        {"prompt": "w1 w2 w3", "chosen": " w7 w7 w3", "rejected": " w8 w2"},
        {"prompt": "w4 w5", "chosen": " w7 w5 w4", "rejected": " w8 w8 w8 w4"},
        {"prompt": "w9 w8 w7 w6", "chosen": " w7", "rejected": " w8 w6"},
        {"prompt": "w10", "chosen": " w7 w10 w10", "rejected": " w8"},
    ])
    tok = tiny_tokenizer()  # AutoTokenizer would pick the architecture's own class (Qwen2Tokenizer) over ours
    with rf_trl.trl_patched() if patched else contextlib.nullcontext():
        trainer = DPOTrainer(model=model_path, args=args, train_dataset=pairs, processing_class=tok,
                             peft_config=peft_config)
        return _run_one_step(trainer)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("trl-llama"), "llama"))


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("trl-qwen2"), "qwen2"))  # tied embeddings


def test_grpo_step_same_loss_and_grads(tiny_llama, tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    plain = _grpo_step(tiny_llama, tmp_path, patched=False)
    assert calls == {"ours": 0, "trl": calls["trl"]} and calls["trl"] > 0
    trl_calls = calls["trl"]
    fused = _grpo_step(tiny_llama, tmp_path, patched=True)
    assert calls["trl"] == trl_calls, "the patched step ran TRL's own kernel"
    assert calls["ours"] == trl_calls, "the patched step must score exactly where TRL did"
    _assert_same_step(plain, fused)


@pytest.mark.parametrize("case", ["llama", "qwen2-lora-wpo"])
def test_dpo_step_same_loss_and_grads(case, tiny_llama, tiny_qwen2, tmp_path, monkeypatch):
    if case == "llama":
        path, config = tiny_llama, {}
    else:  # tied embeddings, a LoRA adapter (reference = adapter off), WPO weights use log_sum_sq_probs
        from peft import LoraConfig

        path = tiny_qwen2
        config = dict(use_weighting=True, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    calls = _count_calls(monkeypatch)
    plain = _dpo_step(path, tmp_path, False, **dict(config))
    trl_calls = calls["trl"]
    assert trl_calls > 0 and calls["ours"] == 0
    fused = _dpo_step(path, tmp_path, True, **dict(config))
    assert calls["trl"] == trl_calls and calls["ours"] == trl_calls
    _assert_same_step(plain, fused)
