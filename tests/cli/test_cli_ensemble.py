"""`rlhf-fast rm --ensemble K` through the command writes one ensemble folder that `ppo --ensemble_reduce` scores
with; bad ensemble options (K < 1, an unknown reduce, a negative penalty, options without a reward model) exit 2
with one line and write nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlhf_fast import cli

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def command(*args):
    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-fast")
    return subprocess.run([exe, *args], env=ENV, capture_output=True, text=True, timeout=300)


def test_rm_ensemble_then_ppo(tiny_model, data_files, tmp_path):
    r = command("rm", "--model", tiny_model, "--data", data_files["pairs"], "--out_dir", str(tmp_path / "rm"),
                "--max_steps", "2", "--batch_size", "4", "--ensemble", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    settings = json.loads((tmp_path / "rm" / "model" / "role_model.json").read_text())
    assert settings["reward_ensemble"]["members"] == 2
    assert cli.main(["ppo", "--model", tiny_model, "--reward_model", str(tmp_path / "rm" / "model"), "--data",
                     data_files["prompts"], "--out_dir", str(tmp_path / "ppo"), "--max_steps", "1", "--batch_size",
                     "4", "--response_length", "4", "--ppo_epochs", "1", "--ensemble_reduce", "mean_minus_std",
                     "--ensemble_penalty", "0.5", "--no-progress"]) == 0
    row = json.loads(open(tmp_path / "ppo" / "metrics.jsonl").readline())
    assert row["rewards/ensemble_std"] > 0


@pytest.mark.parametrize("stage, extra, needle", [
    ("rm", ["--ensemble", "0"], "ensemble must be an integer >= 1"),
    ("ppo", ["--ensemble_reduce", "median"], "invalid choice: 'median'"),
    ("ppo", ["--ensemble_penalty", "-1"], "ensemble_penalty must be a finite number >= 0"),
    ("ppo", ["--ensemble_reduce", "min", "--ensemble_penalty", "2"], "ensemble_penalty applies to"),
    ("grpo", ["--reward_funcs", "format", "--ensemble_reduce", "min"], "need --reward_model"),
])
def test_bad_ensemble_options_exit_2(stage, extra, needle, tiny_model, data_files, tmp_path, capsys):
    out = str(tmp_path / "o")
    data = data_files["pairs"] if stage == "rm" else data_files["prompts"]
    argv = [stage, "--model", tiny_model, "--data", data, "--out_dir", out, "--no-progress"]
    if stage == "ppo":
        argv += ["--reward_model", str(tmp_path)]
    assert cli.main(argv + extra) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert needle in err[-1] and "Traceback" not in "\n".join(err), err
    assert not os.path.exists(out)


def test_bad_value_through_the_command(tiny_model, data_files, tmp_path):
    r = command("rm", "--model", tiny_model, "--data", data_files["pairs"], "--out_dir", str(tmp_path / "o"),
                "--ensemble", "-1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("rlhf-fast rm: error: ensemble must be an integer >= 1 (reward "
                                                 "models on the base), got -1")
    assert not (tmp_path / "o").exists()
