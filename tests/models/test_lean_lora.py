"""LeanLoraLinear (models/lean_lora.py) against PEFT's own LoRA forward: values and gradients, the plain path and
every case that must fall back to PEFT."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear

from rlhf_fast.models import LoraSettings, RoleModel, lean_lora
from rlhf_fast.models.lean_lora import LeanLoraLinear


def _lora_layers(model):
    return [m for m in model.peft.modules() if isinstance(m, PeftLoraLinear)]


def _as_peft(model):
    """Switch the lean layers back to PEFT's class (the reference path); returns the switched layers."""
    layers = [m for m in _lora_layers(model) if type(m) is LeanLoraLinear]
    for m in layers:
        m.__class__ = PeftLoraLinear
    return layers


def _randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.2)


def _forward_backward(model, role, ids, mask):
    model.zero_grad(set_to_none=True)
    with model.role(role):
        h = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    if h.requires_grad:  # the reference (adapters off, base frozen) has nothing to differentiate
        (h.double().sin().sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return h.detach(), grads


def _both_paths(model, role, ids, mask):
    lean = _forward_backward(model, role, ids, mask)
    switched = _as_peft(model)
    try:
        ref = _forward_backward(model, role, ids, mask)
    finally:
        for m in switched:
            m.__class__ = LeanLoraLinear
    return lean, ref


def _build(tiny_model_factory, arch="llama", dtype=torch.float64, r=3, alpha=5.0, dropout=0.0):
    model = RoleModel.from_pretrained(tiny_model_factory(arch), lora=LoraSettings(r=r, alpha=alpha, dropout=dropout),
                                      dtype=dtype)
    _randomise_adapters(model)
    return model


def _batch(vocab, b=3, t=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :2] = 0  # left padding on one row
    return ids, mask


def test_every_llama_lora_layer_is_lean(tiny_model_factory):
    model = _build(tiny_model_factory)
    layers = _lora_layers(model)
    assert layers and all(type(m) is LeanLoraLinear for m in layers)


@pytest.mark.parametrize("role", ["policy", "critic", "reward", "reference"])
def test_lean_matches_peft_float64_values_and_grads(tiny_model_factory, role):
    # scaling 5/3: not a power of two, so the two association orders really differ; float64 keeps them 1e-12 apart
    model = _build(tiny_model_factory)
    ids, mask = _batch(model.lm_head.weight.shape[0])
    (h, g), (h_ref, g_ref) = _both_paths(model, role, ids, mask)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    if role == "reference":
        assert not g and not g_ref  # adapters off: nothing trains on either path
    else:
        assert any(f"lora_A.{role}" in n for n in g)
    assert g.keys() == g_ref.keys()
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-10, atol=1e-12, msg=n)


def test_lean_matches_peft_float32(tiny_model_factory):
    model = _build(tiny_model_factory, dtype=torch.float32, r=4, alpha=8.0)
    ids, mask = _batch(model.lm_head.weight.shape[0], b=2, t=11)
    (h, g), (h_ref, g_ref) = _both_paths(model, "policy", ids, mask)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-5, msg=n)


def _count_lean_calls(model, monkeypatch):
    calls = {"plain": 0}
    addmm = torch.addmm

    def counting(*a, **k):
        calls["plain"] += 1
        return addmm(*a, **k)

    monkeypatch.setattr(torch, "addmm", counting)
    return calls


def test_plain_path_taken_and_reference_skips_it(tiny_model_factory, monkeypatch):
    model = _build(tiny_model_factory)
    ids, mask = _batch(model.lm_head.weight.shape[0])
    calls = _count_lean_calls(model, monkeypatch)
    with torch.no_grad(), model.role("policy"):
        model.backbone(input_ids=ids, attention_mask=mask)
    assert calls["plain"] == len(_lora_layers(model))
    calls["plain"] = 0
    with torch.no_grad(), model.role("reference"):
        model.backbone(input_ids=ids, attention_mask=mask)
    assert calls["plain"] == 0


def test_dropout_falls_back_to_peft(tiny_model_factory, monkeypatch):
    model = _build(tiny_model_factory, dropout=0.3)
    model.train()
    ids, mask = _batch(model.lm_head.weight.shape[0])
    calls = _count_lean_calls(model, monkeypatch)
    torch.manual_seed(5)
    h, _ = _forward_backward(model, "policy", ids, mask)
    assert calls["plain"] == 0  # dropout active: PEFT's forward, which applies it
    switched = _as_peft(model)
    torch.manual_seed(5)
    h_ref, _ = _forward_backward(model, "policy", ids, mask)
    for m in switched:
        m.__class__ = LeanLoraLinear
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)


def test_dropout_in_eval_mode_takes_the_plain_path(tiny_model_factory, monkeypatch):
    model = _build(tiny_model_factory, dropout=0.3)
    model.eval()
    ids, mask = _batch(model.lm_head.weight.shape[0])
    calls = _count_lean_calls(model, monkeypatch)
    (h, g), (h_ref, g_ref) = _both_paths(model, "policy", ids, mask)
    assert calls["plain"] == len(_lora_layers(model))  # the lean pass only (the PEFT pass calls no addmm)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-10, atol=1e-12, msg=n)


def test_mixed_dtype_falls_back_to_peft(tiny_model_factory, monkeypatch):
    # a bfloat16 base with fp32 adapters: PEFT casts x for the adapter and the result back; the lean path declines
    model = _build(tiny_model_factory, dtype=torch.bfloat16)
    layer = _lora_layers(model)[0]
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A["policy"].weight.dtype == torch.float32
    ids, mask = _batch(model.lm_head.weight.shape[0])
    calls = _count_lean_calls(model, monkeypatch)
    with torch.no_grad(), model.role("policy"):
        h = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls["plain"] == 0
    switched = _as_peft(model)
    with torch.no_grad(), model.role("policy"):
        h_ref = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    for m in switched:
        m.__class__ = LeanLoraLinear
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)


def test_gpt2_conv1d_layers_fall_back_and_match(tiny_model_factory):
    # GPT-2's Conv1D base (fan_in_fan_out) is not an nn.Linear: PEFT's forward, same values either way
    model = _build(tiny_model_factory, arch="gpt2")
    ids, mask = _batch(model.lm_head.weight.shape[0])
    (h, g), (h_ref, g_ref) = _both_paths(model, "policy", ids, mask)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=0, atol=0, msg=n)


def test_lean_layer_odd_input_shapes():
    torch.manual_seed(0)
    base = torch.nn.Linear(7, 5, dtype=torch.float64)
    layer = PeftLoraLinear(base, "a", LoraConfig(r=2, lora_alpha=3), r=2, lora_alpha=3)
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    ref = PeftLoraLinear.forward
    for shape in [(7,), (4, 7), (2, 3, 7), (2, 1, 3, 7)]:
        x = torch.randn(*shape, dtype=torch.float64)
        expect = ref(layer, x)
        layer.__class__ = LeanLoraLinear
        got = layer(x)
        layer.__class__ = PeftLoraLinear
        assert got.shape == expect.shape == (*shape[:-1], 5)
        torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


def test_lean_layer_gradcheck():
    # d/dx by gradcheck; d/dA and d/dB against central differences (they are parameters, not inputs)
    torch.manual_seed(0)
    layer = PeftLoraLinear(torch.nn.Linear(6, 4, dtype=torch.float64), "a", LoraConfig(r=2, lora_alpha=3), r=2,
                           lora_alpha=3)
    layer.__class__ = LeanLoraLinear
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    with torch.no_grad():
        b.normal_()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))
    grads = torch.autograd.grad(layer(x).sin().sum(), (a, b))
    eps = 1e-6
    for p, gp in zip((a, b), grads):
        num = torch.zeros_like(p)
        with torch.no_grad():
            for i in range(p.numel()):
                p.view(-1)[i] += eps
                up = layer(x).sin().sum()
                p.view(-1)[i] -= 2 * eps
                down = layer(x).sin().sum()
                p.view(-1)[i] += eps
                num.view(-1)[i] = (up - down) / (2 * eps)
        torch.testing.assert_close(gp, num, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- the merged-weight path (many rows)
def _force_merge(monkeypatch):
    """Every call merges (threshold 1 row per unit of rank); returns a counter of the with-grad Function's calls."""
    monkeypatch.setattr(lean_lora, "MERGE_ROWS_PER_RANK", 1)
    calls = {"grad": 0}
    apply = lean_lora._MergedLora.apply

    def counting(*a):
        calls["grad"] += 1
        return apply(*a)

    monkeypatch.setattr(lean_lora._MergedLora, "apply", counting)
    return calls


@pytest.mark.parametrize("role", ["policy", "critic", "reward"])
def test_merged_path_matches_peft_float64_values_and_grads(tiny_model_factory, role, monkeypatch):
    model = _build(tiny_model_factory)
    ids, mask = _batch(model.lm_head.weight.shape[0])
    calls = _force_merge(monkeypatch)
    (h, g), (h_ref, g_ref) = _both_paths(model, role, ids, mask)
    assert calls["grad"] == len(_lora_layers(model))  # the lean pass merged every layer (PEFT's pass never does)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    assert g.keys() == g_ref.keys() and any(f"lora_B.{role}" in n for n in g)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-10, atol=1e-12, msg=n)
    with torch.no_grad(), model.role(role):  # the no-grad merge (no Function, no x A^T)
        h_ng = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls["grad"] == len(_lora_layers(model))
    torch.testing.assert_close(h_ng, h_ref, rtol=1e-12, atol=1e-12)


def test_merged_path_float32(tiny_model_factory, monkeypatch):
    model = _build(tiny_model_factory, dtype=torch.float32, r=4, alpha=8.0)
    ids, mask = _batch(model.lm_head.weight.shape[0], b=2, t=11)
    _force_merge(monkeypatch)
    (h, g), (h_ref, g_ref) = _both_paths(model, "policy", ids, mask)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    for n in g:
        # float32 rounding of two association orders: within 1e-4 of the largest entry
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-4 * float(g_ref[n].abs().max()), msg=n)


def _layer(n_in=6, n_out=4, r=2, bias=False):
    torch.manual_seed(0)
    layer = PeftLoraLinear(torch.nn.Linear(n_in, n_out, bias=bias, dtype=torch.float64), "a",
                           LoraConfig(r=r, lora_alpha=3), r=r, lora_alpha=3)
    layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    return layer


@pytest.mark.parametrize("rows", [31, 32])
def test_merge_threshold_in_rows_per_rank(rows, monkeypatch):
    # r = 2 at 16 rows per unit of rank: 32 rows merge, 31 take the addmm path; both give PEFT's value
    layer = _layer()
    calls = {"grad": 0}
    apply = lean_lora._MergedLora.apply
    monkeypatch.setattr(lean_lora._MergedLora, "apply", lambda *a: (calls.__setitem__("grad", calls["grad"] + 1),
                                                                    apply(*a))[1])
    x = torch.randn(rows, 6, dtype=torch.float64, requires_grad=True)
    expect = PeftLoraLinear.forward(layer, x)
    layer.__class__ = LeanLoraLinear
    got = layer(x)
    assert calls["grad"] == (rows >= 32)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("need", ["all", "x", "adapter"])
def test_merged_function_gradcheck(bias, need):
    layer = _layer(n_in=5, n_out=3, r=2, bias=bias)
    w, b0 = layer.base_layer.weight, layer.base_layer.bias
    a = layer.lora_A["a"].weight.detach().clone().requires_grad_(need != "x")
    b = layer.lora_B["a"].weight.detach().clone().requires_grad_(need != "x")
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=need != "adapter")
    inputs = tuple(t for t in (x, a, b) if t.requires_grad)

    def f(*ts):
        it = iter(ts)
        xx, aa, bb = (next(it) if t.requires_grad else t for t in (x, a, b))
        return lean_lora._MergedLora.apply(xx, w, b0, aa, bb, 1.5)

    assert torch.autograd.gradcheck(f, inputs)
    expect = torch.nn.functional.linear(x, w, b0) + 1.5 * (x @ a.t()) @ b.t()
    torch.testing.assert_close(f(*inputs), expect, rtol=1e-12, atol=1e-12)


def test_merged_output_may_be_modified_in_place(monkeypatch):
    # a model may scale a projection's output in place; the merged path's output is its own tensor, not a view
    monkeypatch.setattr(lean_lora, "MERGE_ROWS_PER_RANK", 1)
    layer = _layer()
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    ref = PeftLoraLinear.forward(layer, x).mul(2.0)
    g_ref = torch.autograd.grad(ref.sin().sum(), (x, a, b))
    layer.__class__ = LeanLoraLinear
    y = layer(x)
    y.mul_(2.0)
    for got, want in zip(torch.autograd.grad(y.sin().sum(), (x, a, b)), g_ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_trainable_base_falls_back_to_peft(monkeypatch):
    monkeypatch.setattr(lean_lora, "MERGE_ROWS_PER_RANK", 1)
    layer = _layer()
    layer.base_layer.weight.requires_grad_(True)  # e.g. a full fine-tune with an adapter on top
    x = torch.randn(8, 6, dtype=torch.float64)
    expect = PeftLoraLinear.forward(layer, x)
    g_ref = torch.autograd.grad(expect.sum(), layer.base_layer.weight)[0]
    layer.__class__ = LeanLoraLinear
    monkeypatch.setattr(lean_lora._MergedLora, "apply", None)  # must not be reached
    y = layer(x)
    torch.testing.assert_close(y, expect, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), layer.base_layer.weight)[0], g_ref, rtol=0, atol=0)


# -------------------------------------------------------------- the GEMMs through oneDNN (ops/cpu_gemm.py), float32
@pytest.mark.parametrize("role", ["policy", "reference"])
def test_onednn_gemms_match_peft_float32(tiny_model_factory, monkeypatch, onednn_everywhere, role):
    # merged calls (forward, and the backward's dx GEMM) and the base-alone reference pass through oneDNN; PEFT's
    # forward runs torch's own linear
    model = _build(tiny_model_factory, dtype=torch.float32, r=4, alpha=8.0)
    ids, mask = _batch(model.lm_head.weight.shape[0], b=2, t=11)
    _force_merge(monkeypatch)
    (h, g), (h_ref, g_ref) = _both_paths(model, role, ids, mask)
    n_layers = len(_lora_layers(model))
    # the forward's GEMMs, + for the policy the backward's dx GEMMs: all but layer 0's q, k, v (their input, the
    # normed embeddings, needs no gradient)
    assert onednn_everywhere["n"] == n_layers + (n_layers - 3 if role == "policy" else 0)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    assert g.keys() == g_ref.keys()
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-4 * float(g_ref[n].abs().max()), msg=n)


def test_onednn_gemms_with_the_adapter_merged_by_peft(tiny_model_factory, onednn_everywhere):
    # PEFT's merge_adapter (the weights hold W + s B A, the layers flagged merged): the lean layer runs the base
    # alone, as PEFT's merged forward does
    model = _build(tiny_model_factory, dtype=torch.float32, r=4, alpha=8.0)
    ids, mask = _batch(model.lm_head.weight.shape[0], b=2, t=11)
    with torch.no_grad(), model.role("policy"):
        live = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        model.peft.merge_adapter()
        try:
            onednn_everywhere["n"] = 0
            merged = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            model.peft.unmerge_adapter()
    assert onednn_everywhere["n"] == len(_lora_layers(model))
    torch.testing.assert_close(merged, live, rtol=1e-5, atol=1e-5)
