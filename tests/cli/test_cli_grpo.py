"""`rlhf-fast grpo` through the real command: a tiny run with a built-in and a user reward function, and bad
input (exit 2, nothing written, before training; a reward function that fails mid-run: exit 1, one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ENV = dict(os.environ, OMP_NUM_THREADS="1")
REWARDS = '''
def long_words(prompts, completions, **columns):
    return [float(len(c.split())) for c in completions]

def broken(prompts, completions, **columns):
    return [1.0 / 0.0 for _ in completions]
'''


def grpo(cwd, *args):
    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-fast")
    return subprocess.run([exe, "grpo", *args], env=ENV, capture_output=True, text=True, timeout=300, cwd=cwd)


def common(tiny_model, data, out):
    return ["--model", tiny_model, "--data", data, "--out_dir", str(out), "--max_steps", "2", "--batch_size", "2",
            "--num_generations", "2", "--max_completion_length", "3", "--no-progress"]


def test_tiny_run_with_builtin_and_user_rewards(tiny_model, data_files, tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    r = grpo(tmp_path, *common(tiny_model, data_files["prompts"], tmp_path / "out"),
             "--reward_funcs", "my_rewards:long_words,format", "--format_pattern", r"^w\d+", "--reward_weights", "1,0.5",
             "--loss_type", "dr_grpo", "--beta", "0.05")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in open(tmp_path / "out" / "metrics.jsonl")]
    assert len(rows) == 2
    assert {"rewards/long_words/mean", "rewards/format/mean", "reward", "kl"} <= set(rows[-1])
    assert os.path.isfile(tmp_path / "out" / "model" / "adapters" / "policy" / "adapter_model.safetensors")
    assert json.load(open(tmp_path / "out" / "config.json"))["loss_type"] == "dr_grpo"


def test_bad_input_exits_2_before_writing(tiny_model, data_files, tmp_path):
    cases = {
        "g1": (["--reward_funcs", "format", "--num_generations", "1"], "num_generations"),
        "loss": (["--reward_funcs", "format", "--loss_type", "ppo"], "loss_type"),
        "column": (["--reward_funcs", "accuracy"], "answer"),
        "unknown": (["--reward_funcs", "no_such_reward"], "no_such_reward"),
        "module": (["--reward_funcs", "no_such_module:fn"], "no_such_module"),
        "micro": (["--reward_funcs", "format", "--micro_batch_size", "-1"], "micro_batch_size"),
    }
    for name, (extra, needle) in cases.items():
        out = tmp_path / name
        r = grpo(tmp_path, *common(tiny_model, data_files["prompts"], out), *extra)  # a later flag wins
        assert r.returncode == 2, (name, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)
        assert not os.path.exists(out / "metrics.jsonl"), name


def test_failing_reward_function_exits_1_naming_it(tiny_model, data_files, tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    r = grpo(tmp_path, *common(tiny_model, data_files["prompts"], tmp_path / "out"), "--reward_funcs",
             "my_rewards:broken")
    assert r.returncode == 1
    assert "broken" in r.stderr and "ZeroDivisionError" in r.stderr and "Traceback" not in r.stderr
