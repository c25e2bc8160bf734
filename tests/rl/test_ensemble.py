"""reduce_ensemble against a float64 reference written out member by member; one member gives its score in every
mode; the options are checked (unknown reduce, negative penalty, a penalty with mean / min, no reward model)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_fast.errors import ConfigError
from rlhf_fast.rl.ensemble import REDUCTIONS, EnsembleReward, check_options, ensemble_std, reduce_ensemble
from tests.tolerances import assert_close


def reference(scores: torch.Tensor, reduce: str, penalty: float) -> torch.Tensor:
    """The formulas column by column in Python floats (float64)."""
    out = []
    for col in scores.double().t().tolist():
        k = len(col)
        mean = sum(col) / k
        var = sum((x - mean) ** 2 for x in col) / k
        out.append({"mean": mean, "min": min(col), "mean_minus_std": mean - penalty * math.sqrt(var),
                    "mean_minus_var": mean - penalty * var}[reduce])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("shape", [(4, 8), (3, 1), (2, 37), (7, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduce_matches_float64_reference(reduce, shape, dtype):
    scores = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 3).to(dtype)
    out = reduce_ensemble(scores, reduce, penalty=0.7)
    assert out.shape == (shape[1],) and out.dtype == torch.float32
    # bf16 inputs are upcast first, so the reference sees the same rounded values: fp32 tolerance
    assert_close(out, reference(scores.float(), reduce, 0.7), dtype=torch.float32)


def test_one_member_is_its_score_in_every_mode_and_the_penalty_lowers_disagreement():
    s = torch.randn(1, 6)
    for reduce in REDUCTIONS:
        assert torch.equal(reduce_ensemble(s, reduce, 2.0), s[0])
    s = torch.tensor([[1.0, 0.0], [1.0, 2.0]])  # column 0: members agree; column 1: they disagree
    r = reduce_ensemble(s, "mean_minus_std", 1.0)
    assert r.tolist() == [1.0, 0.0] and ensemble_std(s).tolist() == [0.0, 1.0]
    assert reduce_ensemble(s, "min").tolist() == [1.0, 0.0] and reduce_ensemble(s, "mean").tolist() == [1.0, 1.0]


def test_nan_propagates():
    s = torch.tensor([[1.0, float("nan")], [2.0, 1.0]])
    for reduce in REDUCTIONS:
        out = reduce_ensemble(s, reduce)
        assert not math.isnan(out[0]) and math.isnan(out[1]), reduce


@pytest.mark.parametrize("kw, needle", [
    (dict(scores=torch.zeros(4)), "(K, B)"),
    (dict(reduce="median"), "reduce must be one of"),
    (dict(penalty=-1.0), "penalty must be >= 0"),
])
def test_bad_arguments(kw, needle):
    args = dict(scores=torch.zeros(2, 3), reduce="mean", penalty=1.0) | kw
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        reduce_ensemble(**args)


@pytest.mark.parametrize("reduce, penalty, has_rm, needle", [
    ("median", None, True, "ensemble_reduce must be one of"),
    (None, -0.5, True, "ensemble_penalty must be a finite number >= 0"),
    (None, float("inf"), True, "ensemble_penalty must be a finite number >= 0"),
    ("min", 1.0, True, "ensemble_penalty applies to"),
    ("mean", None, False, "need --reward_model"),
])
def test_option_checks(reduce, penalty, has_rm, needle):
    with pytest.raises(ConfigError, match=needle):
        check_options(reduce, penalty, has_reward_model=has_rm)
    check_options(None, None, has_reward_model=False)
    check_options("mean_minus_var", 0.0, has_reward_model=True)


def test_ensemble_reward_remembers_the_std_until_popped():
    class Stub:
        reward_members = 2

        def ensemble_scores(self, ids, mask):
            return torch.stack([ids.float()[:, 0], ids.float()[:, 0] + 2.0])  # std 1 everywhere

    r = EnsembleReward(Stub(), "mean_minus_std", 0.5)
    ids = torch.tensor([[1], [3]])
    assert r(ids, torch.ones_like(ids)).tolist() == [1.5, 3.5]
    assert r.pop_std() == 1.0 and r.pop_std() == 0.0
