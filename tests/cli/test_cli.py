"""The `rlhf-fast` command: help, a tiny sft -> rm -> ppo run, usage errors (exit code 2, nothing written)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import pytest

from rlhf_fast import cli
from rlhf_fast.trainers import GRPOConfig, PPOConfig, RMConfig, SFTConfig

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def command(*args, timeout=300):
    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-fast")
    return subprocess.run([exe, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def leaf_fields(cls):
    out = []
    for f in dataclasses.fields(cls):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        prefix = "lora_" if f.name == "lora" else ""  # the LoRA options are --lora_r, --lora_alpha, ...
        out += [prefix + g.name for g in dataclasses.fields(sub)] if dataclasses.is_dataclass(sub) else [f.name]
    return out


def test_help_lists_every_option():
    r = command("ppo", "--help")
    assert r.returncode == 0, r.stderr
    for name in leaf_fields(PPOConfig):
        assert f"--{name}" in r.stdout, name
    assert "KL penalty coefficient" in r.stdout  # help text comes from the config fields
    for cls, stage in ((SFTConfig, "sft"), (RMConfig, "rm"), (GRPOConfig, "grpo")):
        text = cli.build_parser(stage).format_help()
        assert all(f"--{n}" in text for n in leaf_fields(cls))


def test_top_level_usage(capsys):
    assert cli.main(["--help"]) == 0
    assert "sft" in capsys.readouterr().out
    assert cli.main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


def test_tiny_pipeline(tiny_model, data_files, tmp_path, capsys):
    run_yaml = tmp_path / "sft.yaml"
    run_yaml.write_text(f"model: {tiny_model}\ndata: {data_files['sft']}\nbatch_size: 4\nmax_steps: 5\n"
                        f"optim:\n  lr: 0.003\nprogress: false\n")
    r = command("sft", "--config", str(run_yaml), "--max_steps", "2", "--out_dir", str(tmp_path / "sft"))
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "sft" / "config.json"))["max_steps"] == 2  # the flag overrides the YAML
    assert json.load(open(tmp_path / "sft" / "config.json"))["optim"]["lr"] == 0.003
    assert len(open(tmp_path / "sft" / "metrics.jsonl").readlines()) == 2
    base = str(tmp_path / "sft" / "model" / "base")
    assert os.path.isfile(os.path.join(base, "config.json"))

    assert cli.main(["rm", "--model", base, "--data", data_files["pairs"], "--out_dir", str(tmp_path / "rm"),
                     "--max_steps", "2", "--batch_size", "4", "--no-progress"]) == 0
    assert "done" in capsys.readouterr().out

    r = command("ppo", "--model", base, "--reward_model", str(tmp_path / "rm" / "model"), "--data",
                data_files["prompts"], "--out_dir", str(tmp_path / "ppo"), "--max_steps", "2", "--batch_size", "4",
                "--response_length", "4", "--ppo_epochs", "1", "--kl-controller", "adaptive", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert len(rows) == 2 and "objective/rlhf_reward" in rows[0]
    assert os.path.isfile(tmp_path / "ppo" / "model" / "adapters" / "critic" / "adapter_model.safetensors")


def test_usage_error_exit_code_through_the_command(tiny_model, data_files, tmp_path):
    r = command("ppo", "--model", tiny_model, "--data", data_files["prompts"], "--kl_coef", "-0.1",
                "--out_dir", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "kl_coef must be >= 0" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def no_tokenizer_model(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("no-tok")
    for name in os.listdir(tiny_model):
        if name.startswith(("config", "model", "generation")):
            shutil.copy(os.path.join(tiny_model, name), path)
    return str(path)


@pytest.mark.parametrize("case", ["clip", "lam", "long_prompt", "malformed", "missing_file", "no_tokenizer",
                                  "no_model", "bad_value", "yaml_unknown", "no_reward_model"])
def test_usage_errors(case, tiny_model, data_files, no_tokenizer_model, tmp_path, capsys):
    out = str(tmp_path / "o")
    ppo = ["ppo", "--model", tiny_model, "--data", data_files["prompts"], "--out_dir", out,
           "--reward_model", str(tmp_path)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1", "completion": "w2"}\n{"prompt": "w1", "completion": 5}\n')
    yml = tmp_path / "run.yaml"
    yml.write_text("kl_coeff: 0.1\n")
    argv, needle = {
        "clip": (ppo + ["--clip_low", "0"], "clip_low must be > 0"),
        "lam": (ppo + ["--lam", "1.5"], "lam must lie in [0, 1]"),
        "long_prompt": (ppo + ["--max_length", "8", "--response_length", "6"], "prompts.jsonl:1: the prompt has"),
        "malformed": (["sft", "--model", tiny_model, "--data", str(bad), "--out_dir", out], "bad.jsonl:2:"),
        "missing_file": (["sft", "--model", tiny_model, "--data", str(tmp_path / "none.jsonl"), "--out_dir", out],
                         "no such file"),
        "no_tokenizer": (["sft", "--model", no_tokenizer_model, "--data", data_files["sft"], "--out_dir", out],
                         "has no usable tokenizer"),
        "no_model": (["rm", "--model", str(tmp_path / "nope"), "--data", data_files["pairs"], "--out_dir", out],
                     "does not exist"),
        "bad_value": (["sft", "--batch_size", "many"], "expected int"),
        "yaml_unknown": (["ppo", "--config", str(yml)], "unknown option 'kl_coeff'"),
        "no_reward_model": (ppo[:-2], "or --reward_funcs is required"),
    }[case]
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not os.path.exists(out)  # nothing half-written


def test_demo_and_bench_delegate(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("rlhf_fast.demo.run")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "rlhf_fast.demo.run", fake)
    assert cli.main(["demo", "--out", "x"]) == 0 and seen["argv"] == ["--out", "x"]
    monkeypatch.setitem(sys.modules, "rlhf_fast.bench.cli", None)  # as if the module were missing
    assert cli.main(["bench"]) == 2
    assert "rlhf_fast.bench.cli is missing" in capsys.readouterr().err


def test_bench_rejects_unknown_section(capsys):
    from rlhf_fast.bench import cli as bench_cli

    assert bench_cli.main(["--mode", "cpu", "--only", "bogus"]) == 2  # the console script exits with it
    assert "unknown section(s) ['bogus']" in capsys.readouterr().err
