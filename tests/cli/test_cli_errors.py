"""The `rlhf-fast` command on what new users do: unreadable files and broken model folders, out-of-range and
non-finite options, TRL-style boolean flags, list options, --reward_model folders that do not fit. Each error is
one line with exit code 2 and nothing written; --no-progress runs print nothing from the libraries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from rlhf_fast import cli

ENV = dict(os.environ, OMP_NUM_THREADS="1")
TINY = ["--max_steps", "1", "--batch_size", "4", "--no-progress"]


def command(*args, timeout=300):
    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-fast")
    return subprocess.run([exe, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def flat(text: str) -> str:
    return " ".join(text.split())


def one_line_error(capsys, stage: str) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err and err[-1].startswith(f"rlhf-fast {stage}: error: "), err
    assert not any("Traceback" in ln for ln in err)
    return err[-1]


# ------------------------------------------------------------------------------------- files and folders
@pytest.fixture(scope="module")
def broken(tiny_model, tmp_path_factory):
    """Bad inputs: a non-UTF-8 JSONL line, a folder, a non-UTF-8 YAML, a file, two broken model folders."""
    tmp = tmp_path_factory.mktemp("broken")
    (tmp / "latin1.jsonl").write_bytes(b'{"prompt": "w1", "completion": "w2"}\n'
                                       b'{"prompt": "caf\xe9", "completion": "w2"}\n')
    (tmp / "folder").mkdir()
    (tmp / "latin1.yaml").write_bytes(b"max_steps: 1\n# caf\xe9\n")
    (tmp / "a_file").write_text("not a folder")
    for case in ("hidden_size", "truncated"):
        shutil.copytree(tiny_model, tmp / case)
    cfg = json.loads((tmp / "hidden_size" / "config.json").read_text())
    (tmp / "hidden_size" / "config.json").write_text(json.dumps(cfg | {"hidden_size": 48}))
    w = tmp / "truncated" / "model.safetensors"
    with open(w, "r+b") as fh:
        fh.truncate(os.path.getsize(w) - 64)
    return tmp


@pytest.mark.parametrize("case", ["non_utf8_data", "data_is_a_folder", "config_is_a_folder", "non_utf8_config",
                                  "out_dir_is_a_file", "out_dir_under_a_file", "model_is_a_file",
                                  "model_hidden_size", "model_truncated"])
def test_bad_files_are_one_line_errors(case, broken, tiny_model, data_files, tmp_path, capsys):
    out = str(tmp_path / "o")
    sft = ["sft", "--model", tiny_model, "--data", data_files["sft"], "--out_dir", out, "--no-progress"]
    argv, needle = {
        "non_utf8_data": (sft + ["--data", str(broken / "latin1.jsonl")], "latin1.jsonl:2: not UTF-8 text"),
        "data_is_a_folder": (sft + ["--data", str(broken / "folder")], "is a folder, expected a JSONL file"),
        "config_is_a_folder": (sft + ["--config", str(broken / "folder")], "is a folder, not a YAML file"),
        "non_utf8_config": (sft + ["--config", str(broken / "latin1.yaml")], "is not UTF-8 text"),
        "out_dir_is_a_file": (sft + ["--out_dir", str(broken / "a_file")], "is a file, not a folder"),
        "out_dir_under_a_file": (sft + ["--out_dir", str(broken / "a_file" / "o")], "cannot be created"),
        "model_is_a_file": (sft + ["--model", str(broken / "a_file")], "is a file: --model takes a local"),
        "model_hidden_size": (sft + ["--model", str(broken / "hidden_size")], "do not match its config.json"),
        "model_truncated": (sft + ["--model", str(broken / "truncated")], "safetensors weights are unreadable"),
    }[case]
    assert cli.main(argv) == 2
    assert needle in one_line_error(capsys, "sft")
    assert not os.path.exists(out)
    assert (broken / "a_file").read_text() == "not a folder"


# ------------------------------------------------------------------------------------- option values
@pytest.mark.parametrize("stage, extra, needle", [
    ("sft", ["--lr", "inf"], "lr must be a finite number, got inf"),
    ("sft", ["--lr", "nan"], "lr must be a finite number, got nan"),
    ("sft", ["--weight_decay=-inf"], "weight_decay must be a finite number"),
    ("sft", ["--eps", "0"], "eps must be > 0"),
    ("sft", ["--lora_alpha", "-1"], "alpha must be a finite number > 0"),
    ("sft", ["--lora_alpha", "inf"], "alpha must be a finite number > 0"),
    ("sft", ["--seed", "-1"], "seed must lie in [0, 2**32)"),
    ("sft", ["--checkpoint_minutes", "-5"], "checkpoint_minutes must be >= 0"),
    ("rm", ["--val_fraction", "nan"], "val_fraction must be a finite number"),
    ("ppo", ["--clip_low", "inf"], "clip_low must be a finite number"),
    ("ppo", ["--clip_high", "inf"], "clip_high must be a finite number"),
    ("ppo", ["--kl_coef", "1e400"], "kl_coef must be a finite number, got inf"),
    ("ppo", ["--missing_eos_penalty", "-1"], "missing_eos_penalty must be >= 0"),
    ("ppo", ["--temperature", "inf"], "temperature must be a finite number"),
])
def test_out_of_range_values_exit_2_with_nothing_written(stage, extra, needle, tiny_model, data_files, tmp_path,
                                                        capsys):
    out = str(tmp_path / "o")
    data = {"sft": data_files["sft"], "rm": data_files["pairs"], "ppo": data_files["prompts"]}[stage]
    argv = [stage, "--model", tiny_model, "--data", data, "--out_dir", out, "--reward_model", str(tmp_path)]
    assert cli.main(argv[: None if stage == "ppo" else -2] + extra) == 2
    assert needle in one_line_error(capsys, stage)
    assert not os.path.exists(out)


def test_non_finite_values_from_yaml(tiny_model, data_files, tmp_path, capsys):
    yml = tmp_path / "run.yaml"
    yml.write_text("optim:\n  lr: .inf\n")
    out = str(tmp_path / "o")
    assert cli.main(["sft", "--config", str(yml), "--model", tiny_model, "--data", data_files["sft"],
                     "--out_dir", out]) == 2
    assert "lr must be a finite number, got inf" in one_line_error(capsys, "sft")
    yml.write_text("lora: 8\n")
    assert cli.main(["sft", "--config", str(yml)]) == 2
    assert "'lora' must hold a mapping" in one_line_error(capsys, "sft")
    assert not os.path.exists(out)


def test_non_finite_value_through_the_command(tiny_model, data_files, tmp_path):
    r = command("ppo", "--model", tiny_model, "--data", data_files["prompts"], "--reward_model", str(tmp_path),
                "--kl_coef", "1e400", "--out_dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "rlhf-fast ppo: error: kl_coef must be a finite number, got inf"
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- flags and help
@pytest.mark.parametrize("argv, want", [
    ([], True), (["--progress"], True), (["--progress", "true"], True), (["--progress", "false"], False),
    (["--progress", "False"], False), (["--progress", "0"], False), (["--progress", "no"], False),
    (["--no-progress"], False), (["--no_progress"], False), (["--no-progress", "--progress"], True),
])
def test_boolean_flags_take_trl_forms_and_ours(argv, want):
    assert cli.make_config("sft", argv + ["--max_steps", "3"]).progress is want


def test_boolean_flags_with_underscores_and_bad_values(capsys):
    cfg = cli.make_config("ppo", ["--gradient_checkpointing", "true", "--whiten_advantages", "false"])
    assert cfg.gradient_checkpointing is True and cfg.whiten_advantages is False
    cfg = cli.make_config("ppo", ["--gradient-checkpointing", "--no-whiten-advantages"])
    assert cfg.gradient_checkpointing is True and cfg.whiten_advantages is False
    cfg = cli.make_config("sft", ["--no-merge", "--no_gradient_checkpointing"])
    assert cfg.merge is False and cfg.gradient_checkpointing is False
    with pytest.raises(SystemExit) as e:
        cli.make_config("sft", ["--progress", "maybe"])
    assert e.value.code == 2
    assert "--progress: expected true or false, got 'maybe'" in capsys.readouterr().err


def test_help_texts():
    ppo = flat(cli.build_parser("ppo").format_help())
    clip_high = ppo[ppo.index("--clip_high CLIP_HIGH"):ppo.index("--dual_clip DUAL_CLIP")]
    assert clip_high.count("default:") == 1 and "default: clip_low" in clip_high
    assert "(default: None)" not in ppo and "(default: none)" in ppo  # None shown as one types it
    assert "prompts per PPO step" in ppo and "ppo_epochs x num_minibatches optimiser updates" in ppo
    assert "examples per optimiser step" not in ppo
    kl = ppo[ppo.index("--kl_estimator"):ppo.index("--gamma")]
    assert "k1" in kl and "TRL" in kl and "k3" in kl and "(default: k1)" in kl
    assert "--no-progress turns it off" in ppo
    every = ppo[ppo.index("--checkpoint_every"):ppo.index("--checkpoint_minutes")]
    assert "checkpoint_minutes" in every and "10 minutes" in every
    assert "prompts per optimiser step" in flat(cli.build_parser("rm").format_help())
    assert "examples per optimiser step" in flat(cli.build_parser("sft").format_help())


@pytest.mark.parametrize("how", ["flag", "yaml_flat", "yaml_nested"])
def test_lora_target_modules_from_flag_and_yaml(how, tiny_model, data_files, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["sft", "--model", tiny_model, "--data", data_files["sft"], "--out_dir", str(out), "--merge", "false",
            *TINY]
    yml = tmp_path / "run.yaml"
    if how == "flag":
        argv += ["--lora_target_modules", "q_proj, v_proj"]
    else:
        yml.write_text("lora_target_modules: [q_proj, v_proj]\n" if how == "yaml_flat"
                       else "lora:\n  target_modules:\n    - q_proj\n    - v_proj\n")
        argv += ["--config", str(yml)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["lora"]["target_modules"] == ["q_proj", "v_proj"]
    adapter = json.loads((out / "model" / "adapters" / "policy" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


def test_unknown_target_module_is_one_line(tiny_model, data_files, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert cli.main(["sft", "--model", tiny_model, "--data", data_files["sft"], "--out_dir", out,
                     "--lora_target_modules", "nosuch_proj", "--no-progress"]) == 2
    assert "nosuch_proj" in one_line_error(capsys, "sft")
    assert not os.path.exists(out)


def test_no_progress_prints_nothing_from_the_libraries(tiny_model, data_files, tmp_path):
    for i, off in enumerate((["--no-progress"], ["--progress", "false"])):
        r = command("sft", "--model", tiny_model, "--data", data_files["sft"], "--out_dir", str(tmp_path / str(i)),
                    "--max_steps", "1", "--batch_size", "4", *off)
        assert r.returncode == 0, r.stderr
        for noise in ("Loading weights", "Writing model shards", "FutureWarning", "it/s"):
            assert noise not in r.stderr, (noise, r.stderr)


# ------------------------------------------------------------------------------------- --reward_model
@pytest.fixture(scope="module")
def rm_runs(tiny_model, data_files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-rm")
    assert cli.main(["sft", "--model", tiny_model, "--data", data_files["sft"], "--out_dir", str(tmp / "sft"),
                     *TINY]) == 0
    base = str(tmp / "sft" / "model" / "base")
    assert cli.main(["rm", "--model", base, "--data", data_files["pairs"], "--out_dir", str(tmp / "rm"),
                     "--lora_r", "4", "--lora_alpha", "8", *TINY]) == 0
    return {"base": base, "sft": str(tmp / "sft" / "model"), "rm": str(tmp / "rm" / "model")}


def ppo(rm_runs, data_files, out, *extra):
    return command("ppo", "--model", rm_runs["base"], "--reward_model", rm_runs["rm"], "--data",
                   data_files["prompts"], "--out_dir", str(out), "--response_length", "4", "--ppo_epochs", "1",
                   *TINY, *extra)


def test_ppo_at_r8_uses_an_rm_trained_at_r4(rm_runs, data_files, tmp_path):
    r = ppo(rm_runs, data_files, tmp_path / "ppo", "--lora_r", "8")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "ppo" / "model" / "role_model.json").read_text())
    assert saved["adapter_lora"]["reward"]["r"] == 4 and saved["adapter_lora"]["policy"]["r"] == 8


@pytest.mark.parametrize("case", ["another_base", "sft_folder"])
def test_ppo_refuses_a_reward_model_that_does_not_fit(case, rm_runs, tiny_model, data_files, tmp_path):
    extra, needle = {"another_base": (["--model", tiny_model], "was trained on another base"),
                     "sft_folder": (["--reward_model", rm_runs["sft"]], "holds no trained reward model")}[case]
    r = ppo(rm_runs, data_files, tmp_path / "ppo", *extra)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("rlhf-fast ppo: error: ") and needle in last
    assert not (tmp_path / "ppo").exists()
