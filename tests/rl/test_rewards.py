"""Reward functions: TRL's contract, the built-ins on handcrafted completions, the code sandbox's limits,
and every error path (each names the function and, where there is one, the example)."""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch

import rlhf_fast.rl.rewards as rewards_module
from rlhf_fast.errors import ConfigError
from rlhf_fast.rl.rewards import (
    Accuracy,
    Code,
    Format,
    RewardFunctionError,
    RewardFunctions,
    answers_match,
    extract_answer,
    extract_code,
    load_reward_functions,
    reward_metrics,
)

FAST_CODE = dict(code_timeout=2.0, code_memory_mb=256, code_workers=2)


def _score(funcs, completions, weights=None, timeout=30.0, **columns):
    funcs = funcs if isinstance(funcs, list) else [funcs]
    return RewardFunctions(funcs, weights, reward_timeout=timeout)([""] * len(completions), completions, columns)


def _one(func, completions, **columns) -> list[float]:
    _, per = _score(func, completions, **columns)
    return per[RewardFunctions([func]).names[0]].tolist()


# ------------------------------------------------------------------------------------------------ accuracy

@pytest.mark.parametrize("text, answer", [
    (r"so the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"first \boxed{3}, then corrected: \boxed{x^{2}}", "x^{2}"),
    ("<think>maybe 41</think> <answer> 42 </answer>", "42"),
    (r"<answer>The value is \boxed{7}</answer> and 9", "7"),
    ("3 apples and 5 pears make 8.", "8"),
    ("total: 1,234.5 dollars", "1,234.5"),
    (r"cut off \boxed{12", "12"),  # unbalanced box: the last number
    ("no answer here", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_accuracy_right_and_wrong_answers():
    completions = [r"... \boxed{42}", r"... \boxed{41}", "<answer>Paris</answer>", "<answer>London</answer>",
                   "so x = 5", "about 0.3333333", "about 0.333", "It is 1,000.", "I don't know", r"\boxed{(B)}",
                   "anything"]
    answers = ["42", "42", "paris", "Paris", "5", "1/3", "1/3", "1000", "7", "B", None]
    got = _one(Accuracy(), completions, answer=answers)
    assert got[:10] == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert math.isnan(got[10])  # no reference answer: not applicable


def test_accuracy_takes_a_list_of_answers_and_chat_completions():
    chat = [[{"role": "assistant", "content": r"\boxed{4}"}], [{"role": "assistant", "content": r"\boxed{5}"}]]
    assert _one(Accuracy(answer_column="solution"), chat, solution=[["4", "four"], ["6"]]) == [1.0, 0.0]


def test_accuracy_symbolic_answers_use_math_verify_when_installed(monkeypatch):
    pytest.importorskip("math_verify")
    pairs = [(r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2"), ("x^2+1", "1+x^2")]
    assert all(answers_match(pred, gold) for pred, gold in pairs)
    assert not answers_match(r"\sqrt{3}/2", r"\frac{\sqrt{2}}{2}")
    monkeypatch.setitem(sys.modules, "math_verify", None)  # uninstalled: exact and numeric matching only
    assert not any(answers_match(pred, gold) for pred, gold in pairs)
    assert answers_match(r"\frac{1}{2}", "0.5")


def test_accuracy_score_answer_hook():
    seen = []

    def score_answer(answer, example):
        seen.append((answer, example["entry"]))
        return 0.5 if answer == example["entry"]["target"] else 0.0

    acc = Accuracy(score_answer=score_answer)
    assert acc.required_columns == ()
    entries = [{"target": "7"}, {"target": "8"}, {"target": "9"}]
    assert _one(acc, ["<answer>7</answer>", "<answer>9</answer>", "none"], entry=entries) == [0.5, 0.0, 0.0]
    assert seen[2] == (None, {"target": "9"})


# -------------------------------------------------------------------------------------------------- format

def test_format_default_and_custom_pattern():
    good = "<think>\nreasoning\n</think>\n<answer>42</answer>\n"
    bad = ["<think>reasoning</think> 42", "<answer>42</answer>", "hello <think>a</think><answer>b</answer>"]
    assert _one(Format(), [good, *bad]) == [1.0, 0.0, 0.0, 0.0]
    assert _one(Format(format_pattern=r".*?</think>\s*\S"), ["r1 style</think> 42", "no tag"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match="format_pattern"):
        Format(format_pattern="(unclosed")


# ---------------------------------------------------------------------------------------------------- code

SOLUTION = "Here is my solution:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 5\n"


def test_extract_code():
    assert extract_code(SOLUTION) == "def add(a, b):\n    return a + b\n"
    assert extract_code("```py\nx = 1\n```\n```python\nx = 2\n```") == "x = 2\n"
    assert extract_code("x = 3") == "x = 3"


def test_code_fraction_all_and_test_formats():
    wrong = "```python\ndef add(a, b):\n    return 3\n```"
    completions = [SOLUTION, wrong, "def add(a, b) return", SOLUTION, SOLUTION, SOLUTION, SOLUTION]
    tests = [TESTS, TESTS, TESTS,
             ["assert add(1, 2) == 3", "assert add(0, 0) == 1"],  # a list: each string one test
             '["assert add(1, 1) == 2", "assert add(1, 1) == 3"]',  # a list stored as a string
             "import math\nr = add(1, 2)\nassert math.isclose(r, 3)",  # set-up statements are not tests
             None]  # no tests: not applicable
    got = _one(Code(**FAST_CODE), completions, tests=tests)
    assert got[:6] == pytest.approx([2 / 3, 1 / 3, 0.0, 0.5, 0.5, 1.0])
    assert math.isnan(got[6])
    got = _one(Code(code_scoring="all", **FAST_CODE), completions[:2] + [SOLUTION],
               tests=[TESTS, TESTS, "assert add(1, 2) == 3"])
    assert got == [0.0, 0.0, 1.0]


def test_code_cannot_fake_a_pass():
    programs = ["import os\nos._exit(0)",  # leave before the tests run
                "import sys\nprint('passed 1')\nsys.stdout.flush()\nsys.exit(0)\ndef add(a, b): return a + b",
                "raise SystemExit(0)"]
    assert _one(Code(**FAST_CODE), programs, tests=["assert add(1, 2) == 3"] * 3) == [0.0, 0.0, 0.0]


def test_code_hang_is_stopped_and_earlier_passes_count():
    sleeper = "import time\ntime.sleep(30)\ndef f(): return 1"  # unstopped, it would wake up and pass
    spinner = "def f(): return 1"
    tests = ["assert f() == 1", "assert f() == 1\nwhile True: pass\nassert f() == 1"]
    assert _one(Code(**{**FAST_CODE, "code_timeout": 1.0}), [sleeper, spinner], tests=tests) == [0.0, 0.5]


def test_code_fork_bomb_memory_hog_and_environment():
    code = Code(**FAST_CODE)
    # Bounded first: forks must fail at once (if they did not, the unbounded loop below is not run).
    bounded = ("import os\nforked = 0\ntry:\n    for _ in range(8):\n        pid = os.fork()\n"
               "        if pid == 0:\n            os._exit(0)\n        forked += 1\nexcept OSError as e:\n    error = e")
    assert _one(code, [bounded], tests=["assert forked == 0\nassert isinstance(error, BlockingIOError)"]) == [1.0]
    bomb = "import os\nwhile True:\n    os.fork()"
    hog = "x = bytearray(1 << 30)"  # 1 GiB, over the 256 MiB limit
    refused = "try:\n    x = bytearray(1 << 30)\n    refused = False\nexcept MemoryError:\n    refused = True"
    assert _one(code, [bomb, hog, refused], tests=["assert True", "assert True", "assert refused"]) == [0, 0, 1]


def test_code_sees_no_secrets_and_a_fresh_directory(monkeypatch):
    monkeypatch.setenv("RLHF_FAST_TEST_SECRET", "hunter2")
    program = "import os\nprint(os.environ)\nenv = dict(os.environ)\nfiles = os.listdir('.')"
    tests = ["assert 'RLHF_FAST_TEST_SECRET' not in env", "assert env['PATH'] == '/usr/bin:/bin'",
             "assert env['HOME'] == os.getcwd()", "assert files == []"]
    assert _one(Code(**FAST_CODE), [program], tests=[tests]) == [1.0]
    leak = "import os\nsecret = os.environ.get('RLHF_FAST_TEST_SECRET')"
    assert _one(Code(**FAST_CODE), [leak], tests=["assert secret == 'hunter2'"]) == [0.0]


def test_code_bad_tests_name_the_example():
    with pytest.raises(RewardFunctionError, match=r"'code' failed on example 1 .*TypeError: tests must be"):
        _score(Code(**FAST_CODE), [SOLUTION, SOLUTION], tests=[TESTS, 3])


# ------------------------------------------------------------------------------------------- combination

def f_first(prompts, completions, **kw):
    return [1.0, None, None, 0.0]


def f_second(completions, **kw):  # TRL's functions need not take prompts: they are called by keyword
    return [0.5, 2, None, True]


def test_none_is_left_out_and_weights_apply():
    rewards, per = _score([f_first, f_second], ["a", "b", "c", "d"], weights=[2.0, -1.0])
    assert list(per) == ["f_first", "f_second"]
    torch.testing.assert_close(per["f_first"], torch.tensor([1.0, math.nan, math.nan, 0.0]), equal_nan=True)
    torch.testing.assert_close(rewards, torch.tensor([1.5, -2.0, math.nan, -1.0]), equal_nan=True)
    assert rewards.dtype == torch.float32 and per["f_second"].dtype == torch.float32
    m = reward_metrics(rewards, per)
    assert m["rewards/f_first/mean"] == pytest.approx(0.5)
    assert m["rewards/f_second/mean"] == pytest.approx(3.5 / 3)
    assert m["reward"] == pytest.approx(-0.5)
    assert m["reward_std"] == pytest.approx(torch.tensor([1.5, -2.0, -1.0]).std().item())


def test_columns_and_extra_arguments_reach_the_functions():
    seen = {}

    def spy(prompts, completions, answer, completion_ids, **kw):
        seen.update(prompts=prompts, answer=answer, ids=completion_ids)
        return [float(len(c)) for c in completions]

    rewards, _ = RewardFunctions([spy])(["p1", "p2"], ["x", "yy"], {"answer": ("a", "b")}, completion_ids=[[1], [2]])
    assert seen == {"prompts": ["p1", "p2"], "answer": ["a", "b"], "ids": [[1], [2]]}
    assert rewards.tolist() == [1.0, 2.0]


def test_runs_trls_own_reward_functions():
    trl_rewards = pytest.importorskip("trl.rewards")
    chat = [[{"content": "<think>\nwhy\n</think>\nanswer"}], [{"content": "no think"}]]
    rewards, per = RewardFunctions([trl_rewards.think_format_reward])(["p", "p"], chat)
    assert per["think_format_reward"].tolist() == [1.0, 0.0]


def _raises_on_c(prompts, completions, **kw):
    return [1.0 / (c != "c") for c in completions]


def _batch_only_failure(prompts, completions, **kw):
    if len(completions) > 1:
        raise RuntimeError("batch failure")
    return [1.0]


@pytest.mark.parametrize("func, match", [
    (_raises_on_c, r"'_raises_on_c' failed on example 2 \(completion 'c'\): ZeroDivisionError"),
    (_batch_only_failure, r"'_batch_only_failure' failed on a batch of 4 \(no single example.*RuntimeError: batch failure"),
    (lambda prompts, completions, **kw: [1.0] * 3, r"'<lambda>' returned 3 rewards for 4 completions"),
    (lambda prompts, completions, **kw: 1.0, r"returned float, expected a list of 4"),
    (lambda prompts, completions, **kw: [1.0, "1.0", 0.0, 0.0], r"returned str '1.0' for example 1"),
    (lambda prompts, completions, **kw: [1.0, 0.0, math.nan, 0.0], r"returned nan for example 2.*None"),
    (lambda prompts, completions, **kw: [1.0, 0.0, 0.0, -math.inf], r"returned -inf for example 3"),
])
def test_contract_errors_name_the_function_and_example(func, match):
    with pytest.raises(RewardFunctionError, match=match):
        _score(func, ["a", "b", "c", "d"])


def _scaled(prompts, completions, scale, **kw):
    return np.array([scale, 2 * scale])


def test_tensor_and_array_outputs_and_partials():
    funcs = [lambda prompts, completions, **kw: torch.tensor([0.5, 1.0]), functools.partial(_scaled, scale=2.0),
             lambda prompts, completions, **kw: [torch.tensor(1.0), np.float32(2.0)]]
    funcs[2].__name__ = "scalars"
    rewards, per = _score(funcs, ["a", "b"])
    assert list(per) == ["<lambda>", "_scaled", "scalars"]  # a partial is named after what it wraps, as in TRL
    assert rewards.tolist() == [3.5, 7.0]


def _sleeps(prompts, completions, **kw):
    try:
        time.sleep(30)  # unstopped, it would return after 30 s and the test would fail
    except Exception:  # the timeout must get through a reward function's own `except Exception`
        pass
    return [1.0] * len(completions)


def test_reward_timeout_stops_a_slow_function_and_leaves_no_trace():
    with pytest.raises(RewardFunctionError, match=r"'_sleeps' took longer than reward_timeout=0.5 s"):
        _score(_sleeps, ["a"], timeout=0.5)
    rewards, _ = _score(f_first, ["a", "b", "c", "d"], timeout=0.5)  # the next call runs normally
    time.sleep(0.7)  # past the old deadline: nothing fires
    assert rewards[0].item() == 1.0


def test_reward_timeout_off_the_main_thread_warns_and_runs_unlimited(monkeypatch):
    monkeypatch.setattr(rewards_module, "_warned", set())
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worker = threading.Thread(target=lambda: out.update(r=_score(f_first, list("abcd"), timeout=0.5)[0]))
        worker.start()
        worker.join()
    assert out["r"][0].item() == 1.0
    assert any("main thread" in str(w.message) for w in caught)


def test_missing_columns_are_named_before_training():
    funcs = RewardFunctions([Accuracy(), Code(), Format()])
    with pytest.raises(ConfigError, match=r"'accuracy' needs the dataset column\(s\) \['answer'\]"):
        funcs.check_columns(["prompt", "tests"])
    with pytest.raises(ConfigError, match=r"'code' needs the dataset column\(s\) \['tests'\]"):
        funcs.check_columns(["prompt", "answer"])
    funcs.check_columns(["prompt", "answer", "tests"])
    with pytest.raises(ConfigError, match="'accuracy' needs"):  # checked at call time too
        funcs(["p"], ["c"], {"tests": [None]})
    with pytest.raises(ValueError, match="column 'answer' has 2 values, expected 1"):
        funcs(["p"], ["c"], {"answer": ["1", "2"], "tests": [None]})


def test_construction_errors():
    with pytest.raises(ConfigError, match="distinct names"):
        RewardFunctions([Accuracy(), Accuracy()])
    with pytest.raises(ConfigError, match="reward_weights must be 2 finite numbers"):
        RewardFunctions([Accuracy(), Format()], [1.0])
    with pytest.raises(ConfigError, match="reward_weights"):
        RewardFunctions([Accuracy()], [math.nan])
    with pytest.raises(ConfigError, match="reward_timeout"):
        RewardFunctions([Accuracy()], reward_timeout=0)
    with pytest.raises(ConfigError, match="code_scoring"):
        Code(code_scoring="some")


# ------------------------------------------------------------------------------------------------ loading

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A reward module in the working directory, as a user would write next to their config."""
    name = f"my_rewards_{os.getpid()}_{time.monotonic_ns()}"
    (tmp_path / f"{name}.py").write_text(
        "def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n"
        "class Scorer:\n    @staticmethod\n    def score(prompts, completions, **kw):\n"
        "        return [1.0] * len(completions)\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return name


def test_load_builtins_modules_and_trainer_functions(user_module):
    def rm(prompts, completions, **kw):
        return [0.25] * len(completions)

    funcs = load_reward_functions(f"accuracy, format,{user_module}.length,{user_module}:Scorer.score,reward_model",
                                  functions={"reward_model": rm}, reward_weights="1,0.5,0.1,1,2",
                                  format_pattern=r"^<answer>", code_timeout=1.0)
    assert funcs.names == ["accuracy", "format", "length", "score", "reward_model"]
    assert funcs.reward_weights.tolist() == pytest.approx([1, 0.5, 0.1, 1, 2])
    rewards, per = funcs(["p"], ["<answer>4</answer>"], {"answer": ["4"]})
    assert per["format"].item() == 1.0 and per["length"].item() == 18.0
    assert rewards.item() == pytest.approx(1 + 0.5 + 1.8 + 1 + 0.5)
    assert load_reward_functions(["code", rm], code_timeout=1.0).funcs[0].code_timeout == 1.0


@pytest.mark.parametrize("spec, match", [
    ("accuracy,nope", r"unknown reward function 'nope'"),
    ("no_such_module_xyz:f", r"cannot import module 'no_such_module_xyz'.*ModuleNotFoundError"),
    ("{m}:missing", r"module '{m}' has no attribute 'missing'"),
    ("{m}:NOT_CALLABLE", r"is a int, not a callable"),
    ("judge", r"'judge' is built by the trainer"),
    ("accuracy,,format", r"non-empty strings"),
])
def test_load_errors(user_module, spec, match):
    with pytest.raises(ConfigError, match=match.format(m=user_module)):
        load_reward_functions(spec.format(m=user_module))


def test_load_rejects_unknown_options():
    with pytest.raises(ConfigError, match=r"unknown reward function option\(s\) \['code_timout'\]"):
        load_reward_functions("code", code_timout=1.0)
