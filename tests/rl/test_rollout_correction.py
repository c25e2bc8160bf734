"""rollout.importance_correction (TIS for a rollout engine with other numerics) against a float64 formula, and the
--rollout options' refusals, which need no vLLM."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_fast.rl.rollout import importance_correction
from rlhf_fast.rl.vllm_engine import logprobs_mode, vllm_unavailable_reason
from rlhf_fast.trainers import ConfigError, DPOConfig, GRPOConfig, PPOConfig


def test_weights_and_statistics_match_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 7, generator=g, dtype=torch.float64) * 3
    engine = lp + torch.randn(3, 7, generator=g, dtype=torch.float64)  # some differences above log(cap)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0, 0]])  # holes
    w, st = importance_correction(lp.float(), engine.float(), mask, mode="tis", cap=1.5)
    diffs, weights, clipped = [], [], 0
    for b in range(3):
        for t in range(7):
            if mask[b, t]:
                d = float(lp[b, t] - engine[b, t])
                diffs.append(abs(d))
                weights.append(min(math.exp(d), 1.5))
                clipped += math.exp(d) > 1.5
                assert w[b, t].item() == pytest.approx(min(math.exp(d), 1.5), rel=1e-5)
            else:
                assert w[b, t].item() == 0.0
    assert 0 < clipped < len(weights)  # the cap binds on some tokens, not all
    assert st["rollout/logprob_diff_mean"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-5)
    assert st["rollout/logprob_diff_max"] == pytest.approx(max(diffs), rel=1e-5)
    assert st["rollout/is_weight_mean"] == pytest.approx(sum(weights) / len(weights), rel=1e-5)
    assert st["rollout/is_clipped_frac"] == pytest.approx(clipped / len(weights))
    assert not w.requires_grad


def test_none_only_measures_and_bad_input_is_refused():
    lp, mask = torch.zeros(2, 3), torch.ones(2, 3)
    w, st = importance_correction(lp, lp - 0.5, mask, mode="none")
    assert w is None and st["rollout/logprob_diff_mean"] == pytest.approx(0.5) and "rollout/is_weight_mean" not in st
    with pytest.raises(ValueError, match="tis"):
        importance_correction(lp, lp, mask, mode="ratio")
    with pytest.raises(ValueError, match="cap"):
        importance_correction(lp, lp, mask, cap=0.0)
    with pytest.raises(ValueError, match="one shape"):
        importance_correction(lp, lp[:, :2], mask)


def test_logprob_modes():
    assert logprobs_mode(0.7, 1.0, 0) == "processed_logprobs"  # log softmax(z / T): what the loss uses
    assert logprobs_mode(1.0, 0.9, 5) == "raw_logprobs"  # untruncated, and T = 1
    with pytest.raises(ValueError, match="never log softmax"):
        logprobs_mode(0.7, 0.9, 0)


@pytest.mark.parametrize("make, kw, needle", [
    (PPOConfig, dict(rollout="vllm", temperature=0.7, top_k=5), "never log softmax"),
    (GRPOConfig, dict(rollout="vllm", rollout_is_cap=0.0), "rollout_is_cap"),
    (PPOConfig, dict(rollout_is_correction="ratio"), "rollout_is_correction"),
    (GRPOConfig, dict(rollout="sglang"), "rollout must be"),
    (PPOConfig, dict(vllm_gpu_memory_utilization=1.5), "vllm_gpu_memory_utilization"),
    (DPOConfig, dict(rollout="vllm"), "needs --online"),
    (DPOConfig, dict(rollout="vllm", online=True, reward_funcs="format", ref_update_every=2), "ref_update_every"),
])
def test_rollout_options_are_checked(make, kw, needle, tmp_path):
    cfg = make(model="m", data="d", out_dir=str(tmp_path / "o"), **kw)
    with pytest.raises(ConfigError, match=needle):
        cfg.validate()


@pytest.mark.skipif(vllm_unavailable_reason() is None, reason="vLLM is installed here: nothing to refuse")
def test_without_vllm_the_cli_says_how_to_install_it(tmp_path, capsys):
    from rlhf_fast.cli import main
    from tests.tiny import build_tiny_model, make_data

    model = build_tiny_model(tmp_path / "m", "llama")
    (tmp_path / "d").mkdir()
    data = make_data(tmp_path / "d")
    code = main(["grpo", "--model", str(model), "--data", data["prompts"], "--out_dir", str(tmp_path / "o"),
                 "--reward_funcs", "format", "--rollout", "vllm", "--max_steps", "1", "--no-progress"])
    assert code == 2
    assert "make install-vllm" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model").exists()


def test_first_response_column_against_a_loop():
    """The first column any row has a response token in, as a scan over columns finds it; 0 when none does."""
    from rlhf_fast.rl.rollout import first_response_column

    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        mask = (torch.rand(4, 9, generator=g) < 0.2).float()
        want = next((t for t in range(9) if mask[:, t].any()), 0)
        assert first_response_column(mask) == want
    assert first_response_column(torch.zeros(3, 5)) == 0
    holes = torch.tensor([[0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 1, 1]])
    assert first_response_column(holes) == 3
