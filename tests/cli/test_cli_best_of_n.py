"""`rlhf-fast best-of-n` and `rlhf-fast raft` through the command: a run writes the picks file; bad input (N < 1,
no data, neither or both of --reward_model and --reward_funcs, an unknown --keep) exits 2 with one line and writes
nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlhf_fast import cli

ENV = dict(os.environ, OMP_NUM_THREADS="1")
REWARDS = '''
def n_w7(prompts, completions, **columns):
    return [float(c.split().count("w7")) for c in completions]

def broken(prompts, completions, **columns):
    return [1.0 / 0.0 for _ in completions]
'''


def command(cwd, *args):
    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-fast")
    return subprocess.run([exe, *args], env=ENV, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_run_writes_the_picks(tiny_model, data_files, tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    out = tmp_path / "sub" / "picks.jsonl"
    r = command(tmp_path, "best-of-n", "--model", tiny_model, "--data", data_files["prompts"], "--n", "3",
                "--reward_funcs", "my_rewards:n_w7", "--out", str(out), "--max_new_tokens", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in open(out)]
    n_prompts = sum(1 for ln in open(data_files["prompts"]) if ln.strip())
    assert len(rows) == n_prompts and "wrote" in r.stdout
    for row in rows:
        assert set(row) == {"prompt", "completion", "score", "n", "rank", "all"} and row["n"] == 3
        assert row["score"] == max(s["score"] for s in row["all"]) == row["completion"].split().count("w7")
    assert os.listdir(out.parent) == ["picks.jsonl"]  # no temporary left behind


def test_keep_top_k_in_process(tiny_model, data_files, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    out = tmp_path / "top.jsonl"
    monkeypatch.chdir(tmp_path)
    code = cli.main(["best-of-n", "--model", tiny_model, "--data", data_files["prompts"], "--n", "3",
                    "--reward_funcs", "my_rewards:n_w7", "--out", str(out), "--keep", "top-k", "--top_k", "2",
                    "--max_new_tokens", "3", "--temperature", "0.7", "--top_p", "0.9", "--top_k_sampling", "20",
                    "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(ln) for ln in open(out)]
    assert [r["rank"] for r in rows[:4]] == [0, 1, 0, 1] and "all" not in rows[0]


@pytest.mark.parametrize("case", ["n0", "no_data", "missing_data", "neither", "both", "keep", "no_rm_folder",
                                  "bad_flag", "no_out", "rollout"])
def test_bad_input_exits_2_and_writes_nothing(case, tiny_model, data_files, tmp_path, capsys):
    out = tmp_path / "picks.jsonl"
    args = {"--model": tiny_model, "--data": data_files["prompts"], "--n": "2", "--reward_funcs": "format",
            "--out": str(out), "--max_new_tokens": "2", "--no-progress": None}
    change, needle = {
        "n0": ({"--n": "0"}, "--n"), "no_data": ({"--data": None}, "no data file"),
        "missing_data": ({"--data": str(tmp_path / "nope.jsonl")}, "no such file"),
        "neither": ({"--reward_funcs": None}, "exactly one of"),
        "both": ({"--reward_model": str(tmp_path)}, "exactly one of"),
        "keep": ({"--keep": "worst"}, "--keep"), "no_rm_folder": ({"--reward_funcs": None, "--reward_model":
                                                                    str(tmp_path / "rm")}, "no such folder"),
        "bad_flag": ({"--bogus": "1"}, "--bogus"), "no_out": ({"--out": None}, "--out"),
        "rollout": ({"--rollout": "sglang"}, "--rollout must be native or vllm"),
    }[case]
    for k, v in change.items():
        if v is None:
            args.pop(k)
        else:
            args[k] = v
    argv = ["best-of-n"] + [x for k, v in args.items() for x in ([k] if v is None else [k, v])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_failing_reward_function_exits_1_and_writes_nothing(tiny_model, data_files, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    code = cli.main(["best-of-n", "--model", tiny_model, "--data", data_files["prompts"], "--n", "2", "--reward_funcs",
                     "my_rewards:broken", "--out", str(tmp_path / "picks.jsonl"), "--max_new_tokens", "2",
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "broken" in err and "ZeroDivisionError" in err
    assert not (tmp_path / "picks.jsonl").exists()


def test_raft_command(tiny_model, data_files, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "raft"
    code = cli.main(["raft", "--model", tiny_model, "--data", data_files["prompts"], "--out_dir", str(out),
                     "--rounds", "2", "--n", "2", "--prompts_per_round", "4", "--max_completion_length", "3",
                     "--max_steps", "1", "--batch_size", "4", "--reward_funcs", "my_rewards:n_w7", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (out / "round_0" / "picks.jsonl").is_file() and (out / "round_1" / "picks.jsonl").is_file()
    assert len([ln for ln in open(out / "metrics.jsonl")]) == 2
    assert cli.main(["raft", "--model", tiny_model, "--data", data_files["prompts"], "--out_dir",
                     str(tmp_path / "bad"), "--n", "0", "--reward_funcs", "format"]) == 2
    assert "n (samples per prompt)" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_model_may_be_a_role_model_folder_whose_policy_samples(tiny_model, data_files, tmp_path, monkeypatch, capsys):
    """--model out/.../model (a saved RoleModel): its trained policy adapter samples, not the bare base."""
    import torch

    from rlhf_fast.models import RoleModel

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    m = RoleModel.from_pretrained(tiny_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.role_parameters("policy"):
            p.add_(torch.randn_like(p))  # a policy far from the base
    m.save(tmp_path / "policy_model", save_base=True)
    outs = {}
    for name, model in (("base", tiny_model), ("policy", str(tmp_path / "policy_model"))):
        outs[name] = tmp_path / f"{name}.jsonl"
        assert cli.main(["best-of-n", "--model", model, "--data", data_files["prompts"], "--n", "2", "--temperature",
                         "0", "--reward_funcs", "my_rewards:n_w7", "--out", str(outs[name]), "--max_new_tokens", "6",
                         "--no-progress"]) == 0, capsys.readouterr().err
    # greedy completions of the saved policy, through generate on the reloaded model (another path than the command)
    loaded = RoleModel.load(tmp_path / "policy_model")
    rows = [json.loads(ln) for ln in open(outs["policy"])]
    from rlhf_fast.data.collate import collate_prompts
    from rlhf_fast.data.jsonl import encode_prompt

    b = collate_prompts([{"prompt_ids": encode_prompt(loaded.tokenizer, r["prompt"])} for r in rows],
                        loaded.tokenizer.pad_token_id)
    g = loaded.generate(b["prompt_ids"], b["prompt_mask"], max_new_tokens=6, temperature=0.0,
                        eos_token_id=loaded.eos_token_id)
    texts = [loaded.tokenizer.decode(s[m_.bool()].tolist(), skip_special_tokens=True)
             for s, m_ in zip(g["sequences"], g["response_mask"])]
    assert [r["completion"] for r in rows] == texts
    base_rows = [json.loads(ln) for ln in open(outs["base"])]
    assert [r["completion"] for r in rows] != [r["completion"] for r in base_rows]
