"""reasoning-gym tasks as GRPO prompts (rlhf_fast.data.reasoning_gym): spec parsing, the examples and their
columns, the accuracy reward's score hook, the held-out split, and the errors for bad specs."""

from __future__ import annotations

import sys

import pytest
import torch

from rlhf_fast.data import reasoning_gym as rg
from rlhf_fast.data.jsonl import DataError, encode_prompt
from rlhf_fast.errors import ConfigError
from rlhf_fast.rl.rewards import Accuracy
from tests import tiny as _tiny

reasoning_gym = pytest.importorskip("reasoning_gym", reason="needs the reasoning-gym package (pip install reasoning-gym)")

EASY = "basic_arithmetic?min_terms=2&max_terms=2&max_digits=1&allow_parentheses=false&allow_negation=false&operators=+"


@pytest.fixture
def tok():
    return _tiny.tiny_tokenizer()


def test_parse_spec():
    assert rg.parse_spec("basic_arithmetic") == ("basic_arithmetic", {})
    name, kw = rg.parse_spec("reasoning_gym:basic_arithmetic?min_terms=2&max_digits=1&operators=+,-"
                             "&allow_negation=false&p=0.5&style=a%20b&none=none")
    assert name == "basic_arithmetic"
    assert kw == {"min_terms": 2, "max_digits": 1, "operators": ["+", "-"], "allow_negation": False, "p": 0.5,
                  "style": "a b", "none": None}
    assert type(kw["min_terms"]) is int and type(kw["p"]) is float
    assert rg.parse_spec("x?operators=+")[1] == {"operators": "+"}  # "+" stays a plus, not a space
    for bad, msg in (("?a=1", "names no task"), ("x?a", "not key=value"), ("x?a=1&a=2", "given twice"),
                     ("x?size=3", "not a spec key"), ("x?seed=3", "not a spec key")):
        with pytest.raises(ConfigError, match=msg):
            rg.parse_spec(bad)


def test_examples_and_columns(tok):
    ex = rg.load_reasoning_gym("reasoning_gym:" + EASY, 6, 3, tok, 64, 8)
    _, kw = rg.parse_spec(EASY)
    ds = reasoning_gym.create_dataset("basic_arithmetic", size=6, seed=3, **(kw | {"operators": ["+"]}))
    assert len(ex) == 6
    for e, entry in zip(ex, ds):
        assert e["text"] == entry["question"] and "+" in e["text"] and "-" not in e["text"]
        assert e["prompt_ids"] == encode_prompt(tok, entry["question"])
        assert e["columns"]["answer"] == entry["answer"]
        assert e["columns"]["_rg_entry"] == entry and e["columns"]["_rg_spec"] == EASY
    assert rg.load_reasoning_gym(EASY, 6, 3, tok, 64, 8) == ex  # deterministic
    assert [e["text"] for e in rg.load_reasoning_gym(EASY, 6, 4, tok, 64, 8)] != [e["text"] for e in ex]


def test_chat_template_and_system_prompt(tok):
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    plain = _tiny.tiny_tokenizer()
    e = rg.load_reasoning_gym(EASY, 1, 0, tok, 64, 8)[0]
    assert e["prompt_ids"] == encode_prompt(tok, e["text"]) != encode_prompt(plain, e["text"])
    s = rg.load_reasoning_gym(EASY, 1, 0, tok, 64, 8, system_prompt="w5 w6")[0]
    assert s["prompt_ids"] == encode_prompt(tok, [{"role": "system", "content": "w5 w6"},
                                                  {"role": "user", "content": e["text"]}])
    assert len(s["prompt_ids"]) > len(e["prompt_ids"])


def test_score_hook_right_and_wrong(tok):
    e = rg.load_reasoning_gym(EASY, 1, 0, tok, 64, 8)[0]
    gold, cols = e["columns"]["answer"], e["columns"]
    wrong = str(int(gold) + 1)
    assert rg.score_answer(gold, cols) == 1.0
    assert rg.score_answer(wrong, cols) == 0.0  # gold + 1 never contains gold's digits (no partial credit)
    assert rg.score_answer("x", cols) == 0.0
    assert rg.score_answer(None, cols) == 0.0
    assert rg.score_answer(gold, {"answer": gold}) is None  # not a reasoning-gym row: does not apply
    # through the accuracy built-in: the answer is extracted (tag, boxed, else the last number) first
    acc = Accuracy(score_answer=rg.score_answer)
    assert acc.required_columns == ()
    n = 3
    rows = {k: [v] * n for k, v in cols.items()}
    got = acc(["p"] * n, [f"so it is {gold}.", f"<answer>{wrong}</answer>", "no idea"], **rows)
    assert got[0] == 1.0 and got[2] == 0.0 and got[1] < 1.0


def test_partial_credit_is_reasoning_gyms():
    """The default ProceduralDataset.score_answer pays len(gold)/len(answer) when gold is inside the answer."""
    entry = {"question": "q", "answer": "8", "metadata": {}}
    cols = {"_rg_entry": entry, "_rg_spec": "basic_arithmetic"}
    assert rg.score_answer("18", cols) == 0.5 and rg.score_answer("8", cols) == 1.0


def test_held_out_split(tok):
    spec = "basic_arithmetic?min_terms=2&max_terms=2&max_digits=2&allow_parentheses=false&operators=+,-"
    train, held = rg.load_reasoning_gym_splits(spec, 50, 20, 0, tok, 64, 8)
    assert len(train) == 50 and len(held) == 20
    assert not {e["text"] for e in train} & {e["text"] for e in held}
    assert len({e["text"] for e in held}) == 20  # distinct
    # seed + 1 is seed 0's stream shifted by one entry (Random(seed + i)): why the split does not use it
    shifted = rg.load_reasoning_gym(spec, 50, 1, tok, 64, 8)
    assert [e["text"] for e in shifted[:49]] == [e["text"] for e in train[1:]]
    assert rg.load_reasoning_gym_splits(spec, 5, 0, 0, tok, 64, 8)[1] == []


def test_held_out_warns_when_the_task_is_too_small(tok):
    # 0..10 + 0..10: 121 distinct questions, of which 300 training draws hold 111: 10 others are left
    with pytest.warns(UserWarning, match="only 10 of 40 held-out questions"):
        train, held = rg.load_reasoning_gym_splits(EASY, 300, 40, 0, tok, 64, 8)
    assert len(held) == len({e["text"] for e in held}) == 10
    assert not {e["text"] for e in train} & {e["text"] for e in held}


def test_bad_specs(tok):
    with pytest.raises(ConfigError, match="no task 'basic_arithmetc'.*basic_arithmetic"):
        rg.load_reasoning_gym("basic_arithmetc", 2, 0, tok, 64, 8)
    with pytest.raises(ConfigError, match=r"no option\(s\) \['num_terms'\].*min_terms"):
        rg.load_reasoning_gym("basic_arithmetic?num_terms=2", 2, 0, tok, 64, 8)
    with pytest.raises(ConfigError, match="refuses"):  # the task's own validation
        rg.load_reasoning_gym("basic_arithmetic?min_terms=3&max_terms=2", 2, 0, tok, 64, 8)
    with pytest.raises(DataError, match="max_length=10"):
        rg.load_reasoning_gym(EASY, 2, 0, tok, 10, 8)
    with pytest.raises(ConfigError, match="size must be >= 1"):
        rg.load_reasoning_gym(EASY, 0, 0, tok, 64, 8)
    assert "basic_arithmetic" in rg.task_names()


def test_missing_package_says_how_to_install(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import reasoning_gym -> ImportError
    with pytest.raises(ConfigError, match="pip install reasoning-gym"):
        rg.load_reasoning_gym(EASY, 2, 0, tok, 64, 8)


def test_evaluate_counts_only_full_scores(tok):
    """evaluate(): greedy generation per batch, the completions scored; partial credit is in `score` only."""
    ex = rg.load_reasoning_gym(EASY, 3, 0, tok, 64, 8)
    golds = [e["columns"]["answer"] for e in ex]
    texts = iter([f"= {golds[0]}", f"= 1{golds[1]}", "none"])  # right, partial (gold inside), wrong
    calls = []

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, ids, mask, **kw):
            calls.append(kw)
            resp = torch.ones(ids.shape[0], 2, dtype=torch.long)
            return {"sequences": torch.cat([ids, resp], 1), "response_mask": torch.cat([mask * 0, resp], 1)}

    out = rg.evaluate(Stub(), ex, Accuracy(score_answer=rg.score_answer), max_new_tokens=4, batch_size=2,
                      pad_id=0, eos_id=1, decode=lambda s, m: [next(texts) for _ in range(s.shape[0])])
    partial = len(golds[1]) / (len(golds[1]) + 1)  # reasoning-gym's len(gold) / len(answer)
    assert out["n"] == 3 and out["accuracy"] == pytest.approx(1 / 3)
    assert out["score"] == pytest.approx((1 + partial) / 3) and out["mean_length"] == 2
    assert len(calls) == 2 and all(c["temperature"] == 0.0 and c["max_new_tokens"] == 4 for c in calls)
