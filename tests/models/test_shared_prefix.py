"""RoleModel's shared-prefix forward (policy_forward / logprobs with shared_prefix=P) against the plain single
pass: values and adapter gradients on every tiny architecture, rows in any order, left-padding holes; the prefix
really runs once per distinct prefix; the cases that must take the plain pass; bad values."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.models import LoraSettings, RoleModel


def _build(tiny_model_factory, arch="llama"):
    model = RoleModel.from_pretrained(tiny_model_factory(arch), lora=LoraSettings(r=3, alpha=5.0),
                                      dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
    return model


def _batch(group=3, prompts=3, p=5, r=4, seed=0, order="grouped"):
    """prompts x group rows: each prompt (left-padded, holes of different widths) followed by its own responses
    (right padding in one row); one extra row whose prompt no other row has. order "grouped": a prompt's rows are
    contiguous (GRPO); "strided": row i and i + prompts share one (DPO's chosen-first layout)."""
    g = torch.Generator().manual_seed(seed)
    pr = torch.randint(3, 90, (prompts, p), generator=g)
    pm = torch.ones_like(pr)
    pm[0, :2] = 0
    pm[1, :1] = 0
    rows = (torch.arange(prompts).repeat_interleave(group) if order == "grouped"
            else torch.arange(prompts).repeat(group))
    seq = torch.cat([pr[rows], torch.randint(3, 90, (rows.numel(), r), generator=g)], 1)
    mask = torch.cat([pm[rows], torch.ones(rows.numel(), r, dtype=torch.long)], 1)
    mask[1, -2:] = 0
    seq[1, -2:] = 0
    lone = torch.randint(3, 90, (1, p + r), generator=g)
    return torch.cat([seq, lone]), torch.cat([mask, torch.ones(1, p + r, dtype=torch.long)])


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    (out.sin() * torch.linspace(0.5, 1.5, out.shape[-1], dtype=out.dtype)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("order", ["grouped", "strided"])
def test_policy_forward_equals_the_plain_pass(tiny_model_factory, arch, order):
    model = _build(tiny_model_factory, arch)
    ids, mask = _batch(order=order)
    valid = mask.bool()

    def hidden(share):
        return lambda: model.policy_forward(ids, mask, shared_prefix=share).hidden[valid]

    want, gw = _grads(model, hidden(0))
    got, gg = _grads(model, hidden(5))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert gw.keys() == gg.keys() and any(".policy." in n for n in gw)
    for n in gw:
        # torch's CPU attention backward is not float64-exact (it differs from eager attention by ~1e-7 relative
        # here), so the two passes' gradients agree to that, not to the last bit
        torch.testing.assert_close(gg[n], gw[n], rtol=1e-6, atol=1e-6 * float(gw[n].abs().max()), msg=n)


@pytest.mark.parametrize("role", ["policy", "reference"])
def test_logprobs_with_start_and_shared_prefix(tiny_model_factory, role):
    model = _build(tiny_model_factory)
    ids, mask = _batch()
    with torch.no_grad():
        want = model.logprobs(ids, mask, role)
        got = model.logprobs(ids, mask, role, start=5, shared_prefix=5)
        ent_want = model.logprobs(ids, mask, role, return_entropy=True)[1]
        ent_got = model.logprobs(ids, mask, role, return_entropy=True, start=4, shared_prefix=3)[1]
    torch.testing.assert_close(got[:, 5:], want[:, 5:], rtol=1e-10, atol=1e-10)
    assert bool((got[:, :5] == 0).all()) and bool((want[:, 1:5] != 0).any())
    torch.testing.assert_close(ent_got[:, 4:], ent_want[:, 4:], rtol=1e-10, atol=1e-10)


def _embedding_calls(model, fn):
    shapes = []
    handle = model.backbone.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    try:
        fn()
    finally:
        handle.remove()
    return shapes


def test_each_distinct_prefix_runs_once(tiny_model_factory):
    model = _build(tiny_model_factory)
    ids, mask = _batch(group=3, prompts=3)  # 9 rows of 3 prompts + 1 lone row: 4 distinct prefixes
    with torch.no_grad():
        calls = _embedding_calls(model, lambda: model.policy_forward(ids, mask, shared_prefix=5))
    assert calls == [(4, 5), (10, 4)]
    # a prefix that reaches into the responses: rows stop sharing where their tokens differ
    with torch.no_grad():
        calls = _embedding_calls(model, lambda: model.policy_forward(ids, mask, shared_prefix=7))
    assert calls == [(10, 9)]  # no two rows alike over 7 columns: the plain pass


@pytest.mark.parametrize("share", [0, 9, 12])
def test_no_prefix_to_share_is_the_plain_pass(tiny_model_factory, share):
    model = _build(tiny_model_factory)
    ids, mask = _batch()
    with torch.no_grad():
        calls = _embedding_calls(model, lambda: model.policy_forward(ids, mask, shared_prefix=share))
    assert calls == [(10, 9)]


def test_training_mode_checkpointing_takes_the_plain_pass(tiny_model_factory):
    model = RoleModel.from_pretrained(tiny_model_factory("llama"), lora=LoraSettings(r=3, alpha=5.0),
                                      dtype=torch.float64, gradient_checkpointing=True)
    ids, mask = _batch()
    model.train()
    calls = _embedding_calls(model, lambda: model.policy_forward(ids, mask, shared_prefix=5).hidden.sum().backward())
    assert calls[0] == (10, 9)
    model.eval()
    with torch.no_grad():
        assert _embedding_calls(model, lambda: model.policy_forward(ids, mask, shared_prefix=5)) == [(4, 5), (10, 4)]


def test_a_sharded_base_takes_the_plain_pass(tiny_model_factory):
    """Under FSDP2 (model.lockstep set) every process must run the same forwards whatever its rows repeat."""
    model = _build(tiny_model_factory)
    ids, mask = _batch()
    model.lockstep = lambda n_local: n_local
    with torch.no_grad():
        assert _embedding_calls(model, lambda: model.policy_forward(ids, mask, shared_prefix=5)) == [(10, 9)]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_shared_prefix_and_start(tiny_model_factory, bad):
    model = _build(tiny_model_factory)
    ids, mask = _batch()
    with pytest.raises(ValueError, match="shared_prefix"):
        model.policy_forward(ids, mask, shared_prefix=bad)
    with pytest.raises(ValueError, match="start"):
        model.logprobs(ids, mask, start=bad)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("order", ["grouped", "strided"])
def test_prefix_outputs_off_equals_the_plain_pass_from_the_prefix_end(tiny_model_factory, arch, order):
    """prefix_outputs=False: the prefix pass runs its last layer's query, attention output and MLP at its last
    column only (Llama-family classes; GPT-2 keeps the full pass). hidden[:, 5:] (column 5 holds the prefix's
    last state) and the adapter gradients through it equal the plain pass's; hidden[:, 1:5] are zeros."""
    model = _build(tiny_model_factory, arch)
    ids, mask = _batch(order=order)
    valid = mask.bool()[:, 5:]
    block = model.backbone.layers[-1] if hasattr(model.backbone, "layers") else None
    q_rows = []
    hook = block.self_attn.q_proj.register_forward_hook(lambda m, a, o: q_rows.append(tuple(a[0].shape[:2]))) \
        if block is not None else None

    def hidden(share, outputs):
        return lambda: model.policy_forward(ids, mask, shared_prefix=share, prefix_outputs=outputs).hidden

    want, gw = _grads(model, lambda: hidden(0, True)()[:, 5:][valid])
    q_rows.clear()
    full = hidden(5, False)
    got, gg = _grads(model, lambda: full()[:, 5:][valid])
    if hook is not None:
        hook.remove()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert gw.keys() == gg.keys() and any(".policy." in n for n in gw)
    for n in gw:  # as in test_policy_forward_equals_the_plain_pass
        torch.testing.assert_close(gg[n], gw[n], rtol=1e-6, atol=1e-6 * float(gw[n].abs().max()), msg=n)
    with torch.no_grad():
        h = full()
    if arch == "gpt2":
        assert bool((h[:, 1:5] != 0).any())  # not a Llama-family class: the full prefix pass
    else:
        assert q_rows == [(4, 1), (10, 4)]  # the 4 distinct prefixes' last column, then every row's responses
        assert bool((h[:, 1:5] == 0).all())
        assert "forward" not in vars(block)  # the class's forward again


def test_prefix_outputs_off_with_a_one_column_prefix(tiny_model_factory):
    model = _build(tiny_model_factory)
    ids, mask = _batch()
    ids[:, 0], mask[:, 0] = 7, 1  # every row shares its first column only
    with torch.no_grad():
        want = model.policy_forward(ids, mask).hidden[:, 1:]
        got = model.policy_forward(ids, mask, shared_prefix=1, prefix_outputs=False).hidden[:, 1:]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
