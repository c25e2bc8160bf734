"""`rlhf-fast label` and `rlhf-fast revise` (rlhf_fast/rl/label.py, revise.py) and `--reward_funcs judge` on tiny
models: labels from pairs and from prompts, the RM trains on the output, bad input exits 2 writing nothing,
the critique-revision mechanics, and a judge-rewarded GRPO run that reuses the policy's base."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from rlhf_fast import cli
from rlhf_fast.data.jsonl import load_rankings, load_sft
from rlhf_fast.rl import judge as J
from tests.tiny import write_jsonl

ENV = dict(os.environ, OMP_NUM_THREADS="1")
PAIR = "w3 {principles} w4 {prompt} w5 {response_a} w6 {response_b} w7"
RATE = "w3 {principles} w4 {prompt} w5 {response} w8"
RATING_WORDS = "w60=3,w61=2,w62=1,w63=0"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("label")
    (d / "constitution.txt").write_text("# be good\n- w20 w21\n- w22\n")
    (d / "pair.txt").write_text(PAIR + "\n")
    (d / "rate.txt").write_text(RATE + "\n")
    (d / "empty.txt").write_text("# nothing but comments\n\n")
    return {k: str(d / f"{k}.txt") for k in ("constitution", "pair", "rate", "empty")}


def label_args(tiny_model, data, out, files, *extra):
    return ["label", "--judge", tiny_model, "--constitution", files["constitution"], "--data", data, "--out",
            str(out), "--template", files["pair"], "--answer_tokens", "w50,w51", "--batch_size", "4", *extra]


def run(*args):
    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-fast")
    return subprocess.run([exe, *args], env=ENV, capture_output=True, text=True, timeout=300)


def test_label_from_pairs_then_rm_trains_on_it(tiny_model, data_files, files, tmp_path):
    out = tmp_path / "prefs.jsonl"
    r = run(*label_args(tiny_model, data_files["pairs"], out, files))
    assert r.returncode == 0, r.stderr
    src = [json.loads(ln) for ln in open(data_files["pairs"])]
    rows = [json.loads(ln) for ln in open(out)]
    assert len(rows) == len(src) and "wrote 24 preference pairs" in r.stdout
    # the command's verdicts against the library judge, pair by pair
    model = J.load_judge_model(tiny_model)
    judge = J.Judge(model, model.tokenizer, J.load_constitution(files["constitution"]), pairwise_template=PAIR,
                    answer_tokens="w50,w51")
    p = judge.compare([s["prompt"] for s in src], [s["chosen"] for s in src], [s["rejected"] for s in src])
    flips = 0
    for s, row, pa in zip(src, rows, p.tolist()):
        pc = max(pa, 1 - pa)
        assert row["chosen"] == (s["chosen"] if pa >= 0.5 else s["rejected"])
        assert {row["chosen"], row["rejected"]} == {s["chosen"], s["rejected"]}
        assert row["p_chosen"] == pytest.approx(pc, abs=1e-5)
        assert row["margin"] == pytest.approx(math.log(pc / (1 - pc)), abs=1e-4) and row["margin"] >= 0
        flips += pa < 0.5
    assert 0 < flips < len(src)  # the judge is not just echoing the file's order
    assert len(load_rankings(str(out))) == len(src)
    # --min_confidence keeps exactly the rows with 2 p - 1 >= it
    conf = sorted(2 * row["p_chosen"] - 1 for row in rows)
    threshold = conf[len(conf) // 2]
    assert cli.main(label_args(tiny_model, data_files["pairs"], tmp_path / "f.jsonl", files,
                               "--min_confidence", str(threshold), "--margin", "none")) == 0
    kept = [json.loads(ln) for ln in open(tmp_path / "f.jsonl")]
    assert len(kept) == sum(c >= threshold - 1e-6 for c in conf) and "margin" not in kept[0]
    # the RM trains on the labels
    r = run("rm", "--model", tiny_model, "--data", str(out), "--out_dir", str(tmp_path / "rm"), "--max_steps", "2",
            "--batch_size", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / "rm" / "model" / "heads.safetensors")


def test_label_from_prompts_with_policy(tiny_model, data_files, files, tmp_path, capsys):
    out = tmp_path / "prefs.jsonl"
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "w10 w11"}, {"prompt": "w12", "responses": ["w30", "w31"]},
                                                   {"prompt": "w13 w14"}, {"prompt": "w15"}])
    code = cli.main(label_args(tiny_model, mixed, out, files, "--policy", tiny_model, "--max_new_tokens", "4",
                               "--mode", "rating", "--template", files["rate"], "--rating_words", RATING_WORDS))
    assert code == 0, capsys.readouterr().err
    msg = capsys.readouterr().out
    assert "3 sampled from --policy" in msg
    rows = [json.loads(ln) for ln in open(out)]
    identical = int(msg.split("below --min_confidence, ")[1].split()[0])
    assert len(rows) + identical == 4 and rows
    assert all(r["chosen"] != r["rejected"] and r["p_chosen"] >= 0.5 for r in rows)
    assert {r["prompt"] for r in rows} <= {"w10 w11", "w12", "w13 w14", "w15"}


def test_label_bad_input_exits_2_and_writes_nothing(tiny_model, data_files, files, tmp_path, capsys):
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model, no_tok)
    for f in os.listdir(no_tok):
        if "token" in f:
            os.remove(no_tok / f)
    prompts_only = data_files["prompts"]
    cases = {
        "missing constitution": (["--constitution", str(tmp_path / "nope.txt")], "does not exist"),
        "empty constitution": (["--constitution", files["empty"]], "holds no principles"),
        "no tokenizer": (["--judge", str(no_tok)], "no tokenizer"),
        "no responses": (["--data", prompts_only], "has no responses"),
        "answer tokens": (["--answer_tokens", " A, B"], "answer_tokens ' A' is not in the vocabulary"),
        "two-token answer": (["--answer_tokens", "w50 w51,w52"], "encodes to 2 tokens"),
        "confidence": (["--min_confidence", "1.0"], "--min_confidence must lie in [0, 1)"),
        "negative confidence": (["--min_confidence", "-0.1"], "--min_confidence"),
        "template": (["--template", files["rate"]], "missing ['response_a', 'response_b']"),
        "rating words": (["--mode", "rating", "--template", files["rate"], "--rating_words", "w60=1,zz=0"],
                         "rating_words 'zz'"),
        "everything dropped": (["--min_confidence", "0.999999"], "no pair left"),
    }
    for name, (extra, needle) in cases.items():
        out = tmp_path / f"{name}.jsonl"
        code = cli.main(label_args(tiny_model, data_files["pairs"], out, files, *extra))  # a later flag wins
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert needle in err and err.count("\n") == 1, (name, err)
        assert not os.path.exists(out), name
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_revise_mechanics(tiny_model, data_files, files, tmp_path, capsys):
    out = tmp_path / "sft.jsonl"
    args = ["revise", "--model", tiny_model, "--constitution", files["constitution"], "--data",
            data_files["prompts"], "--out", str(out), "--max_new_tokens", "4", "--batch_size", "8"]
    assert cli.main(args) == 0, capsys.readouterr().err
    rows = [json.loads(ln) for ln in open(out)]
    n = sum(1 for _ in open(data_files["prompts"]))
    empty = int(capsys.readouterr().out.split("(")[1].split()[0])
    assert rows and len(rows) + empty == n
    prompts = [json.loads(ln)["prompt"] for ln in open(data_files["prompts"])]
    for r in rows:
        assert {"prompt", "completion", "response", "critique", "principle"} <= set(r) and r["completion"]
        assert r["principle"] == ["w20 w21", "w22"][prompts.index(r["prompt"]) % 2]  # cycles through them
    assert len(load_sft(str(out))) == len(rows)  # the SFT trainer's format
    # a template without its fields, a missing file: exit 2, nothing written
    bad = tmp_path / "bad.txt"
    bad.write_text("{prompt} {response}")
    for extra, needle in ((["--critique_template", str(bad)], "missing ['principle']"),
                          (["--revision_template", str(tmp_path / "nope.txt")], "unreadable"),
                          (["--constitution", files["empty"]], "holds no principles")):
        out2 = tmp_path / "no.jsonl"
        assert cli.main([*args[:-6], "--out", str(out2), *args[-4:], *extra]) == 2
        assert needle in capsys.readouterr().err
        assert not out2.exists()


def test_grpo_with_judge_reward_reuses_the_policy_base(tiny_model, data_files, files, tmp_path, monkeypatch):
    def no_second_copy(*a, **k):
        raise AssertionError("the judge loaded a second model although --judge is --model")

    monkeypatch.setattr(J, "load_judge_model", no_second_copy)
    args = ["grpo", "--model", tiny_model, "--data", data_files["prompts"], "--out_dir", str(tmp_path / "g"),
            "--max_steps", "1", "--batch_size", "2", "--num_generations", "2", "--max_completion_length", "3",
            "--no-progress", "--reward_funcs", "judge", "--judge", tiny_model, "--constitution",
            files["constitution"], "--judge_template", files["rate"], "--judge_rating_words", RATING_WORDS]
    assert cli.main(args) == 0
    row = [json.loads(ln) for ln in open(tmp_path / "g" / "metrics.jsonl")][-1]
    assert 0 <= row["rewards/judge/mean"] <= 3
    # missing --judge or constitution: exit 2 before anything is written
    for extra, needle in ((["--judge", ""], "needs --judge"), (["--constitution", files["empty"]], "no principles")):
        out = tmp_path / "bad"
        assert cli.main([*args[:5], "--out_dir", str(out), *args[7:], *extra]) == 2
        assert not (out / "metrics.jsonl").exists(), needle


def test_ppo_with_a_separate_judge_loads_it_once(tiny_model, data_files, files, tmp_path, monkeypatch):
    other = tmp_path / "judge-copy"
    shutil.copytree(tiny_model, other)
    calls = []
    load = J.load_judge_model
    monkeypatch.setattr(J, "load_judge_model", lambda *a, **k: calls.append(a) or load(*a, **k))
    args = ["ppo", "--model", tiny_model, "--data", data_files["prompts"], "--out_dir", str(tmp_path / "p"),
            "--max_steps", "1", "--batch_size", "2", "--ppo_epochs", "1", "--response_length", "3", "--no-progress",
            "--reward_funcs", "judge", "--judge", str(other), "--constitution", files["constitution"],
            "--judge_template", files["rate"], "--judge_rating_words", RATING_WORDS]
    assert cli.main(args) == 0
    assert calls == [(str(other),)]
    row = [json.loads(ln) for ln in open(tmp_path / "p" / "metrics.jsonl")][-1]
    assert 0 <= row["rewards/judge/mean"] <= 3 and 0 <= row["objective/scores"] <= 3
