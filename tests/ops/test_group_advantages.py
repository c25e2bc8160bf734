"""ops.group_advantages against a plain per-sample loop in float64 (the formulas as the docstring words them)."""

import math

import pytest
import torch

from rlhf_fast import ops


def reference(scores, G, estimator, scale, eps):
    r = [float(x) for x in scores]
    B = len(r)
    batch_mean = sum(r) / B
    batch_std = math.sqrt(sum((x - batch_mean) ** 2 for x in r) / (B - 1))
    out = []
    for i, x in enumerate(r):
        g = i // G
        group = r[g * G:(g + 1) * G]
        mean = sum(group) / G
        std = math.sqrt(sum((y - mean) ** 2 for y in group) / (G - 1))
        if estimator == "grpo":
            a = x - mean
        else:
            others = [y for j, y in enumerate(group) if j != i - g * G]
            a = x - sum(others) / (G - 1)
        if max(group) == min(group):
            out.append(0.0)
            continue
        if scale == "group":
            a /= std + eps
        elif scale == "batch":
            a /= batch_std + eps
        out.append(a)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G,prompts", [(2, 3), (4, 5), (7, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_the_loop(estimator, scale, G, prompts, dtype):
    scores = torch.randn(G * prompts).to(dtype)
    scores[:G] = 0.5  # a constant group
    got = ops.group_advantages(scores, G, estimator=estimator, scale=scale, eps=1e-4)
    assert got.dtype == torch.float32 and got.shape == (G * prompts,)
    want = reference(scores.double(), G, estimator, scale, 1e-4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.all(got[:G] == 0)


def test_constant_groups_are_exactly_zero_even_without_eps():
    scores = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 3.0])  # 0.1 * 3 / 3 != 0.1 in floating point
    for scale in ("group", "batch", "none"):
        a = ops.group_advantages(scores, 3, scale=scale, eps=0.0)
        assert torch.isfinite(a).all() and torch.all(a[:3] == 0), scale
    allsame = ops.group_advantages(torch.full((6,), 2.5), 3, scale="batch", eps=0.0)
    assert torch.all(allsame == 0)


def test_rloo_is_the_leave_one_out_baseline():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0])
    a = ops.group_advantages(scores, 4, estimator="rloo", scale="none")
    torch.testing.assert_close(a, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


def test_nan_score_poisons_only_its_group():
    scores = torch.tensor([float("nan"), 1.0, 0.0, 2.0])
    a = ops.group_advantages(scores, 2, scale="none")
    assert torch.isnan(a[:2]).all() and torch.isfinite(a[2:]).all()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(group_size=1), "group_size"),
    (dict(group_size=True), "group_size"),
    (dict(group_size=4), "divisible"),
    (dict(group_size=2, estimator="ppo"), "estimator"),
    (dict(group_size=2, scale="std"), "scale"),
    (dict(group_size=2, eps=-1.0), "eps"),
    (dict(group_size=2, eps=float("inf")), "eps"),
])
def test_bad_input(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ops.group_advantages(torch.randn(6), **kwargs)


def test_bad_scores():
    with pytest.raises(ValueError, match="1-D"):
        ops.group_advantages(torch.randn(2, 3), 3)
    with pytest.raises(TypeError, match="floating"):
        ops.group_advantages(torch.arange(4), 2)
