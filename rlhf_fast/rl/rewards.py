"""Reward functions for RL with verifiable rewards (GRPO, RLOO): TRL's contract, built-ins, and their sum.

    RewardFunctions         several reward functions + reward_weights -> rewards (B,), per function (B,)
    load_reward_functions   "--reward_funcs accuracy,format,my_pkg.rewards:fn" -> RewardFunctions
    reward_metrics          TRL's metric names: rewards/<name>/mean, rewards/<name>/std, reward, reward_std
    Accuracy, Format, Code  the built-ins "accuracy", "format", "code" (BUILTINS)
    extract_answer          the final-answer rule of "accuracy"

The contract is TRL's (GRPOTrainer's custom reward functions), so a function written for TRL runs here and
ours run in TRL:

    f(prompts=list[str], completions=list[str], **columns) -> list[float | None]

called with keywords; `columns` are the dataset's other fields as lists aligned with the prompts
(answer=[...], tests=[...]) plus whatever the trainer adds (completion_ids, trainer_state). None means "does
not apply to this sample" (multi-task data: `code` scores only the rows that have tests). "reward_model" and
"judge" need the model: the trainer builds those callables and hands them to load_reward_functions through
`functions=` (or in the spec list), where they follow the same contract.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import math
import numbers
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import torch

from rlhf_fast.errors import ConfigError

RewardFunc = Callable[..., Sequence[float | None]]
"""f(prompts=list[str], completions=list[str], **columns) -> list[float | None], one entry per completion."""


class RewardFunctionError(RuntimeError):
    """A reward function failed during training: it raised, ran out of time or broke the contract.
    `name` is the function's, `index` the example's (None when the failure is not one example's)."""

    def __init__(self, message: str, name: str, index: int | None = None):
        super().__init__(message)
        self.name, self.index = name, index


# ----------------------------------------------------------------------------------------------- combining

class RewardFunctions:
    """Several reward functions, weighted and summed as TRL's GRPOTrainer does.

    Args:
        funcs: reward functions following the contract above. A function's name (for errors and metrics) is
            its `__name__` (functools.partial unwrapped, else its class name), as in TRL; names must differ.
        names: names to use instead (load_reward_functions passes the names the user typed).
        reward_weights: one finite float per function (TRL's reward_weights); None: 1.0 each.
        reward_timeout: seconds one function may take on one batch; past it the call is stopped and
            RewardFunctionError raised. None: no limit. Enforced with a timer thread that sends SIGUSR2 to
            the main thread (a handler installed once, chaining to any earlier one), not SIGALRM, because
            math_verify arms and cancels SIGALRM itself. So it works only when called on the main thread
            (elsewhere: a warning, no limit) and stops Python code and blocking calls; a single long C call
            finishes first. The `code` built-in also limits each program it runs.

    A function declares the dataset columns it needs in an optional `required_columns` attribute (else they are
    read off its signature: the parameters without a default besides the contract's own); check_columns checks
    them before training.
    """

    def __init__(self, funcs: Sequence[RewardFunc], reward_weights: Sequence[float] | None = None, *,
                 reward_timeout: float | None = 300.0, names: Sequence[str] | None = None):
        if not funcs:
            raise ConfigError("need at least one reward function")
        self.funcs = list(funcs)
        self.names = [_func_name(f) for f in self.funcs] if names is None else list(names)
        if len(self.names) != len(self.funcs):
            raise ConfigError(f"got {len(self.names)} names for {len(self.funcs)} reward functions")
        for f, name in zip(self.funcs, self.names):
            if not callable(f):
                raise ConfigError(f"reward function {name!r} is not callable: {f!r}")
        dup = sorted({n for n in self.names if self.names.count(n) > 1})
        if dup:
            raise ConfigError(f"reward functions must have distinct names (metrics are keyed by name); "
                              f"{dup} appear more than once in {self.names}")
        weights = [1.0] * len(self.funcs) if reward_weights is None else list(reward_weights)
        if len(weights) != len(self.funcs) or not all(
                isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise ConfigError(f"reward_weights must be {len(self.funcs)} finite numbers, one per reward "
                              f"function {self.names}, got {list(weights)}")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)  # (F,)
        if reward_timeout is not None and not (isinstance(reward_timeout, numbers.Real) and reward_timeout > 0):
            raise ConfigError(f"reward_timeout must be > 0 seconds or None, got {reward_timeout!r}")
        self.reward_timeout = reward_timeout

    def check_columns(self, columns: Iterable[str]) -> None:
        """Raise ConfigError naming the function and the column when a function's `required_columns` are
        not all among `columns` (the dataset's column names). Call it before training."""
        columns = set(columns)
        for f, name in zip(self.funcs, self.names):
            missing = [c for c in required_columns(f) if c not in columns]
            if missing:
                raise ConfigError(f"reward function {name!r} needs the dataset column(s) {missing}; the "
                                  f"dataset has {sorted(columns)}")

    def __call__(self, prompts: Sequence[str], completions: Sequence[Any],
                 columns: Mapping[str, Sequence[Any]] | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Score B completions.

        Args:
            prompts: B prompts (str, or TRL's conversational message lists: passed through untouched).
            completions: B completions, aligned with prompts.
            columns: the dataset's other fields, each a list of B values (e.g. {"answer": [...]}).
            **kwargs: passed to every function as they are (e.g. completion_ids, trainer_state).

        Returns:
            rewards: (B,) fp32, sum over functions of reward_weight * reward, leaving out the None ones (TRL's
                nansum); NaN where every function returned None: such a sample is unscorable, and TRL >= 1.16
                keeps it out of the group baseline and gives it advantage 0 (earlier releases summed it to 0).
            per_function: {name: (B,) fp32}, NaN where that function returned None.
        """
        B = len(completions)
        if len(prompts) != B:
            raise ValueError(f"got {len(prompts)} prompts but {B} completions")
        columns = {k: list(v) for k, v in (columns or {}).items()}
        for key, values in columns.items():
            if len(values) != B:
                raise ValueError(f"column {key!r} has {len(values)} values, expected {B} (one per completion)")
        clash = sorted(set(columns) & (set(kwargs) | {"prompts", "completions"}))
        if clash:
            raise ValueError(f"column name(s) {clash} clash with the reward functions' other arguments")
        self.check_columns(columns)
        call = dict(prompts=list(prompts), completions=list(completions), **columns, **kwargs)
        per_function = {}
        for f, name in zip(self.funcs, self.names):
            per_function[name] = self._run(f, name, call, B)
        table = torch.stack(list(per_function.values()), dim=1)  # (B, F)
        rewards = (table * self.reward_weights).nansum(dim=1)  # (B,)
        rewards[table.isnan().all(dim=1)] = float("nan")
        return rewards, per_function

    def _run(self, f: RewardFunc, name: str, call: dict[str, Any], B: int) -> torch.Tensor:
        try:
            out = _call_with_timeout(f, self.reward_timeout, call)
        except _Timeout:
            raise RewardFunctionError(f"reward function {name!r} took longer than reward_timeout="
                                      f"{self.reward_timeout} s on a batch of {B} and was stopped", name) from None
        except Exception as e:
            raise self._locate(f, name, call, B, e) from e
        return _check_output(name, out, B)

    def _locate(self, f, name, call, B, batch_error: Exception) -> RewardFunctionError:
        # The batch call raised: re-run it one example at a time (the run stops anyway) to name the example.
        def first_failing():
            for i in range(B):
                one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == B else v) for k, v in call.items()}
                try:
                    f(**one)
                except Exception as e:
                    return i, e
            return None, None
        try:
            index, error = _call_with_timeout(first_failing, self.reward_timeout, {})
        except _Timeout:
            index, error = None, None
        if index is None:
            return RewardFunctionError(f"reward function {name!r} failed on a batch of {B} (no single example "
                                       f"reproduces it): {type(batch_error).__name__}: {batch_error}", name)
        return RewardFunctionError(f"reward function {name!r} failed on example {index} (completion "
                                   f"{_short(call['completions'][index])}): {type(error).__name__}: {error}",
                                   name, index)


_NOT_COLUMNS = {"prompts", "completions", "completion_ids", "trainer_state", "rollout"}


def required_columns(f) -> tuple[str, ...]:
    """The dataset columns `f` needs: its `required_columns` attribute when it has one, else the parameters of
    its signature that have no default and are not the contract's own (prompts, completions, ...)."""
    if hasattr(f, "required_columns"):
        return tuple(f.required_columns)
    try:
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return ()
    return tuple(p.name for p in params if p.default is inspect.Parameter.empty and p.name not in _NOT_COLUMNS
                 and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def completion_texts(tokenizer, sequences: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """The generated text of each row: the tokens under response_mask (B, T), special tokens (EOS) dropped."""
    rows = [seq[m.bool()].tolist() for seq, m in zip(sequences, response_mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def text_reward_fn(funcs: RewardFunctions, tokenizer, examples: Sequence[Mapping[str, Any]], n: int = 1):
    """A tensor reward function (sequences, attention_mask, response_mask) -> (B * n,) for a batch whose row i
    answers examples[i // n] ({"text": prompt, "columns": {...}}): decodes the completions and calls `funcs`.
    Unscorable samples (every function returned None) get 0. The last call's per-function rewards are kept in
    `.last` for metrics."""
    prompts = [e["text"] for e in examples for _ in range(n)]
    keys = sorted({k for e in examples for k in e["columns"]})
    columns = {k: [e["columns"].get(k) for e in examples for _ in range(n)] for k in keys}

    def fn(sequences, attention_mask, response_mask):
        rewards, per_function = funcs(prompts, completion_texts(tokenizer, sequences, response_mask), columns)
        fn.last = per_function
        return rewards.nan_to_num(0.0).to(sequences.device)

    fn.last = {}
    return fn


def reward_metrics(rewards: torch.Tensor, per_function: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """TRL's GRPO reward metrics of one batch: rewards/<name>/mean and /std over the samples the function
    applied to (NaN left out), reward and reward_std over the scorable samples. std is unbiased (TRL's nanstd)."""
    out = {}
    for name, r in per_function.items():
        out[f"rewards/{name}/mean"] = torch.nanmean(r).item()
        out[f"rewards/{name}/std"] = _nanstd(r)
    out["reward"] = torch.nanmean(rewards).item()
    out["reward_std"] = _nanstd(rewards)
    return out


def _nanstd(x: torch.Tensor) -> float:
    x = x[~x.isnan()].double()
    return x.std().item() if x.numel() > 1 else float("nan")


def _check_output(name: str, out: Any, B: int) -> torch.Tensor:
    # TRL's contract, strictly: a length-B sequence of real numbers or None. bool counts as 1.0 / 0.0 (TRL
    # takes it); NaN and inf are refused: "not applicable" is None.
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):  # a tensor or an ndarray
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardFunctionError(f"reward function {name!r} returned {type(out).__name__}, expected a list "
                                  f"of {B} floats (or None)", name)
    if len(out) != B:
        raise RewardFunctionError(f"reward function {name!r} returned {len(out)} rewards for {B} completions "
                                  f"(one per completion expected)", name)
    values = []
    for i, r in enumerate(out):
        if getattr(r, "ndim", None) == 0 and hasattr(r, "item"):  # a 0-d tensor or a numpy scalar
            r = r.item()
        if r is None:
            values.append(float("nan"))
        elif isinstance(r, numbers.Real) and math.isfinite(r):
            values.append(float(r))
        else:
            what = repr(r) if isinstance(r, numbers.Real) else f"{type(r).__name__} {_short(r)}"
            raise RewardFunctionError(f"reward function {name!r} returned {what} for example {i}; a reward must "
                                      f"be a finite number, or None when it does not apply", name, i)
    return torch.tensor(values, dtype=torch.float32)  # (B,)


def _func_name(f: Any) -> str:
    # TRL's get_callable_name: partials unwrapped, then __name__, else the class name.
    while isinstance(f, functools.partial):
        f = f.func
    return getattr(f, "__name__", type(f).__name__)


def _short(x: Any, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[:n] + "...'"


# ------------------------------------------------------------------------------------------------- timeout

class _Timeout(BaseException):
    """Raised in the main thread when the timer fires; a BaseException so that a reward function's own
    `except Exception` (math_verify's parse has one) cannot swallow it."""


_TIMEOUT_SIGNAL = getattr(signal, "SIGUSR2", None)
_timer = {"armed": False, "sent": False, "previous": None}
_timer_lock = threading.Lock()
_warned: set[str] = set()


def _on_timeout_signal(signum, frame):
    if _timer["sent"]:  # ours: raise at most once per timer, and only while the call is still running
        _timer["sent"] = False
        if _timer["armed"]:
            _timer["armed"] = False
            raise _Timeout
    elif callable(_timer["previous"]):
        _timer["previous"](signum, frame)


def _fire(main_thread_id: int) -> None:
    with _timer_lock:
        if _timer["armed"]:
            _timer["sent"] = True
            signal.pthread_kill(main_thread_id, _TIMEOUT_SIGNAL)


def _call_with_timeout(f: Callable, timeout: float | None, kwargs: dict[str, Any]):
    """f(**kwargs), raising _Timeout in it after `timeout` seconds (see RewardFunctions: reward_timeout)."""
    if timeout is None or _timer["armed"]:  # no limit asked, or nested in a call that already has one
        return f(**kwargs)
    if _TIMEOUT_SIGNAL is None or threading.current_thread() is not threading.main_thread():
        if "thread" not in _warned:
            _warned.add("thread")
            warnings.warn("reward_timeout is enforced only when rewards are computed on the main thread of a "
                          "POSIX process; running reward functions without a time limit", stacklevel=3)
        return f(**kwargs)
    if signal.getsignal(_TIMEOUT_SIGNAL) is not _on_timeout_signal:  # once, or again if someone replaced it
        _timer["previous"] = signal.signal(_TIMEOUT_SIGNAL, _on_timeout_signal)
    timer = threading.Timer(timeout, _fire, args=(threading.get_ident(),))
    timer.daemon = True
    _timer.update(armed=True, sent=False)
    try:
        timer.start()
        return f(**kwargs)
    finally:
        with _timer_lock:  # after this no signal is sent; one already sent finds armed False and does nothing
            _timer["armed"] = False
        timer.cancel()


# ----------------------------------------------------------------------------------------------- built-ins

def _text(completion: Any) -> str:
    # TRL's conversational completions are lists of messages: score the last message's content.
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a str or a list of messages, got {type(completion).__name__}")


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, by the first rule that finds one:

    1. the content of the last <answer>...</answer> (and of the last \\boxed{...} inside it, if any);
    2. the content of the last \\boxed{...} or \\fbox{...} (nested braces allowed);
    3. the last number in the text (-12, 1,234.5, 3/4, .5);
    else None (scored 0.0).
    """
    tags = _ANSWER_TAG.findall(text)
    if tags:
        inner = _last_boxed(tags[-1])
        return (inner if inner is not None else tags[-1]).strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers_ = _NUMBER.findall(text)
    return numbers_[-1] if numbers_ else None


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: the completion was cut off


_LATEX_NOISE = re.compile(r"\\[!,;: ]|\\left|\\right|\$|\s+")
_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")


def _normalise(s: str) -> str:
    s = _LATEX_WRAPPER.sub(r"\1", s)
    s = _LATEX_NOISE.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").lower().rstrip(".")
    m = re.fullmatch(r"\(([a-z])\)", s)  # multiple choice: (b) -> b
    return m.group(1) if m else s


def _number(s: str) -> float | None:
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # 1,234.5; but "1,2" stays a pair
        s = s.replace(",", "")
    m = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s) or re.fullmatch(r"(-?[\d.]+)/(-?[\d.]+)", s)
    try:
        return float(m.group(1)) / float(m.group(2)) if m else float(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str, gold: str) -> bool:
    """The accuracy built-in's comparison: equal after normalisation (LaTeX spacing, $, \\text{} and case
    dropped; "x = 5" compared by its right-hand side), or numbers within 1e-6 relative; else, when the
    optional math_verify package is installed and the gold answer is not plain words, math_verify's
    verify(parse(gold), parse(pred)) (symbolic: \\frac{1}{2} = 0.5, x^2+1 = 1+x^2)."""
    p, g = _normalise(pred), _normalise(gold)
    if p == g or ("=" in p and "=" not in g and p.rsplit("=", 1)[1] == g):
        return True
    pn, gn = _number(p.rsplit("=", 1)[-1]), _number(g)
    if pn is not None and gn is not None:
        return math.isclose(pn, gn, rel_tol=1e-6, abs_tol=1e-12)
    if re.fullmatch(r"[A-Za-z\s.,'()\-]*", gold):  # words ("Paris"): math_verify would multiply the letters
        return False
    try:  # optional dependency
        from math_verify import parse, verify
    except ImportError:
        return False
    main = threading.current_thread() is threading.main_thread()  # math_verify's timeouts use SIGALRM
    timeout = 5 if main else None
    wrap = lambda s: s if "$" in s or "\\(" in s else f"${s}$"
    gold_parsed = parse(wrap(gold), parsing_timeout=timeout)
    if not gold_parsed:
        return False
    return bool(verify(gold_parsed, parse(wrap(pred), parsing_timeout=timeout), timeout_seconds=timeout))


@dataclass
class Accuracy:
    """"accuracy": 1.0 when the completion's final answer (extract_answer) matches the example's answer
    column (answers_match; a list of acceptable answers matches any), else 0.0; None where the answer is None.

    answer_column: the dataset column holding the reference answer.
    score_answer: optional scorer score_answer(answer: str | None, example: dict) -> float | None, given the
        extracted answer (None when none was found) and the example's columns; it replaces the comparison
        (the hook for reasoning-gym style datasets, whose entries score their own answers).
    """

    answer_column: str = "answer"
    score_answer: Callable[[str | None, dict[str, Any]], float | None] | None = None
    __name__ = "accuracy"

    def __post_init__(self):
        if not (isinstance(self.answer_column, str) and self.answer_column):
            raise ConfigError(f"answer_column must be a column name, got {self.answer_column!r}")
        if self.score_answer is not None and not callable(self.score_answer):
            raise ConfigError(f"score_answer must be callable or None, got {self.score_answer!r}")

    @property
    def required_columns(self) -> tuple[str, ...]:
        return () if self.score_answer is not None else (self.answer_column,)

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        out = []
        for i, c in enumerate(completions):
            pred = extract_answer(_text(c))
            if self.score_answer is not None:
                out.append(self.score_answer(pred, {k: v[i] for k, v in columns.items() if isinstance(v, list)}))
                continue
            gold = columns[self.answer_column][i]
            if gold is None:
                out.append(None)
                continue
            golds = gold if isinstance(gold, (list, tuple)) else [gold]
            out.append(float(pred is not None and any(answers_match(pred, str(g)) for g in golds)))
        return out


@dataclass
class Format:
    """"format": 1.0 when re.match(format_pattern, completion, re.DOTALL) matches, else 0.0.

    The default is the think/answer template (DeepSeek-R1's): reasoning in <think>...</think>, then the answer
    in <answer>...</answer>, nothing else but whitespace around. A chat template that already opens <think>
    in the prompt needs a pattern without the opening tag.
    """

    format_pattern: str = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"
    __name__ = "format"
    required_columns = ()

    def __post_init__(self):
        try:
            self._regex = re.compile(self.format_pattern, re.DOTALL)
        except (re.error, TypeError) as e:
            raise ConfigError(f"format_pattern {self.format_pattern!r} is not a valid regular expression: {e}") from e

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return [float(self._regex.match(_text(c)) is not None) for c in completions]


@dataclass
class Code:
    """"code": runs the completion's program against the example's tests; the reward is the fraction of
    tests passed (code_scoring="fraction", as open-r1's code reward) or 1.0 only when all pass ("all").
    None where the example has no tests.

    The program is the last ```python (or ```py, or untagged ```) block of the completion, else the whole text.
    Tests (column `tests_column`): a string of Python, whose top-level `assert` statements are the tests and
    whose other statements are set-up run in order (a string without asserts is one test, passed when it
    runs), or a list of strings, each one test. The program, then the tests, run in one fresh process
    (`python -I`, stdin, stdout and stderr closed, its own temporary directory as cwd and HOME, only PATH,
    LANG and single-thread BLAS variables in its environment) limited by setrlimit: address space
    code_memory_mb, CPU time code_timeout + 1 s, files written 16 MiB, no new processes or threads
    (RLIMIT_NPROC 0; root ignores that limit, so a root parent runs the program as user `nobody`, with the
    common standard-library modules imported beforehand since the interpreter may sit where nobody cannot
    read), and killed with its process group after code_timeout seconds of wall clock. Results travel over
    a pipe tagged with a random token, so exiting early or printing "all passed" earns nothing; a test
    passed before a hang or a crash still counts. A program that fails to run scores 0.0. These are limits
    against accidents and reward hacking by a policy, not a security boundary against hostile code: for
    that, run the trainer in a container.

    code_workers programs run at once (threads waiting on subprocesses).
    """

    code_timeout: float = 5.0
    code_memory_mb: int = 1024
    code_workers: int = 2
    code_scoring: str = "fraction"
    tests_column: str = "tests"
    __name__ = "code"

    def __post_init__(self):
        if not (isinstance(self.code_timeout, numbers.Real) and self.code_timeout > 0):
            raise ConfigError(f"code_timeout must be > 0 seconds, got {self.code_timeout!r}")
        if not (isinstance(self.code_memory_mb, int) and self.code_memory_mb >= 64):
            raise ConfigError(f"code_memory_mb must be an integer >= 64, got {self.code_memory_mb!r}")
        if not (isinstance(self.code_workers, int) and self.code_workers >= 1):
            raise ConfigError(f"code_workers must be an integer >= 1, got {self.code_workers!r}")
        if self.code_scoring not in ("fraction", "all"):
            raise ConfigError(f"code_scoring must be 'fraction' or 'all', got {self.code_scoring!r}")

    @property
    def required_columns(self) -> tuple[str, ...]:
        return (self.tests_column,)

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        jobs = [(extract_code(_text(c)), _test_steps(t)) for c, t in zip(completions, columns[self.tests_column])]
        run = lambda job: None if job[1] is None else run_tests(*job, timeout=self.code_timeout,
                                                                 memory_mb=self.code_memory_mb)
        if self.code_workers == 1 or len(jobs) == 1:
            results = [run(job) for job in jobs]
        else:
            pool = ThreadPoolExecutor(min(self.code_workers, len(jobs)), thread_name_prefix="code-reward")
            try:
                results = [f.result() for f in [pool.submit(run, job) for job in jobs]]
            finally:  # also on reward_timeout: drop queued programs, wait for the running ones' own limits
                pool.shutdown(wait=True, cancel_futures=True)
        if self.code_scoring == "all":
            return [None if r is None else float(r[0] == r[1]) for r in results]
        return [None if r is None else r[0] / r[1] for r in results]


_CODE_BLOCK = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last ```python / ```py / untagged fenced block of `text`, else the whole text."""
    blocks = _CODE_BLOCK.findall(text)
    return blocks[-1] if blocks else text


def _test_steps(tests: Any) -> list[tuple[bool, str]] | None:
    # -> [(is_test, source)] in order; None when the example has no tests (the reward does not apply).
    if tests is None or (isinstance(tests, (str, list, tuple)) and not tests):
        return None
    if isinstance(tests, (list, tuple)):
        if not all(isinstance(t, str) for t in tests):
            raise TypeError(f"tests must be a string or a list of strings, got a list of "
                            f"{sorted({type(t).__name__ for t in tests})}")
        return [(True, t) for t in tests]
    if not isinstance(tests, str):
        raise TypeError(f"tests must be a string or a list of strings, got {type(tests).__name__}")
    body = ast.parse(tests).body  # a SyntaxError here is the dataset's
    if len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, (ast.List, ast.Tuple)):
        return _test_steps(ast.literal_eval(body[0].value))  # a JSON / repr'd list of tests, not one test
    if not any(isinstance(node, ast.Assert) for node in body):
        return [(True, tests)]
    return [(isinstance(node, ast.Assert), ast.unparse(node)) for node in body]


# Runs in the child. Reads its job and deletes it, imports the common modules, sets the limits, drops root,
# then runs the program and the steps, reporting "<token> passed k" after each passed test over the pipe.
_HARNESS = r"""
import json, os, resource
def _main():
    with open("job.json") as f:
        job = json.load(f)
    os.remove("job.json")
    fd, token = job["fd"], job["token"]
    report = lambda *words: os.write(fd, (" ".join([token, *map(str, words)]) + "\n").encode())
    for name in job["preload"]:
        try:
            __import__(name)
        except ImportError:
            pass
    for name, value in job["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if job["uid"] is not None:
        try:
            os.setgroups([])
            os.setgid(job["gid"])
            os.setuid(job["uid"])
        except OSError as e:
            report("sandbox-error", repr(e))
            return
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "solution.py", "exec"), namespace)
    except SystemExit:
        pass
    except BaseException:
        return
    passed = 0
    for is_test, source in job["steps"]:
        try:
            exec(compile(source, "tests.py", "exec"), namespace)
        except BaseException:
            continue
        if is_test:
            passed += 1
            report("passed", passed)
_main()
"""

_PRELOAD = ("abc", "array", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime", "decimal",
            "enum", "fractions", "functools", "heapq", "io", "itertools", "json", "math", "operator", "queue",
            "random", "re", "statistics", "string", "sys", "time", "typing")


def run_tests(code: str, steps: list[tuple[bool, str]], *, timeout: float = 5.0,
              memory_mb: int = 1024) -> tuple[int, int]:
    """Run `code` then `steps` ([(is_test, source)]) in a limited child process (see Code).
    Returns (tests passed, tests)."""
    n_tests = sum(is_test for is_test, _ in steps)
    as_root = os.geteuid() == 0
    try:
        nobody = pwd.getpwnam("nobody") if as_root else None
    except KeyError:
        raise RuntimeError("the code reward runs programs as user nobody when the trainer is root, and this "
                           "system has no such user; run the trainer as a non-root user") from None
    workdir = tempfile.mkdtemp(prefix="rlhf_fast_code_")
    read_end, write_end = os.pipe()
    token = secrets.token_hex(16)
    proc = None
    try:
        limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": math.ceil(timeout) + 1, "RLIMIT_FSIZE": 16 << 20,
                  "RLIMIT_NPROC": 0, "RLIMIT_CORE": 0, "RLIMIT_NOFILE": 64}
        job = {"code": code, "steps": steps, "token": token, "fd": write_end, "limits": limits,
               "preload": _PRELOAD, "uid": nobody.pw_uid if as_root else None,
               "gid": nobody.pw_gid if as_root else None}
        with open(os.path.join(workdir, "job.json"), "w") as f:
            json.dump(job, f)
        if as_root:
            os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-I", "-c", _HARNESS], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                pass_fds=(write_end,), start_new_session=True)
        os.close(write_end)
        write_end = None
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    finally:
        if proc is not None and proc.poll() is None:  # a hang, or our own caller stopped: kill it unreaped
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if write_end is not None:
            os.close(write_end)
        report = _read_all(read_end)
        shutil.rmtree(workdir, ignore_errors=True)
    passed = 0
    for line in report.splitlines():
        words = line.split(" ", 2)
        if words[0] != token or len(words) < 2:
            continue
        if words[1] == "sandbox-error":
            raise RuntimeError(f"the code reward could not drop root privileges to user nobody "
                               f"({' '.join(words[2:])}); run the trainer as a non-root user")
        if words[1] == "passed" and len(words) == 3 and words[2].isdigit():
            passed = max(passed, min(int(words[2]), n_tests))
    return passed, n_tests


def _read_all(fd: int, limit: int = 1 << 16) -> str:
    # The child is gone (and could fork nothing), so the pipe holds all it will get; never block on it.
    os.set_blocking(fd, False)
    chunks, size = [], 0
    try:
        while size < limit:
            chunk = os.read(fd, limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


# -------------------------------------------------------------------------------------------------- loading

BUILTINS: dict[str, type] = {"accuracy": Accuracy, "format": Format, "code": Code}
_BUILT_BY_TRAINER = ("reward_model", "judge")  # need the model: passed in through `functions=`


def load_reward_functions(spec: str | Sequence[str | RewardFunc], *,
                          functions: Mapping[str, RewardFunc] | None = None,
                          reward_weights: Sequence[float] | str | None = None,
                          reward_timeout: float | None = 300.0, **options: Any) -> RewardFunctions:
    """Resolve the --reward_funcs option.

    Args:
        spec: comma-separated names ("accuracy,format,my_pkg.rewards:fn"), or a list of names and callables.
            A name is looked up in `functions`, then BUILTINS (built with the options they take), else read
            as "module:attribute" (or TRL's "module.attribute"), imported with the working directory on
            sys.path (as TRL's CLI). A callable is used as it is.
        functions: callables the trainer built, by name (e.g. "reward_model", "judge").
        reward_weights: one per function, or a comma-separated string; None: 1.0 each.
        reward_timeout: see RewardFunctions.
        **options: the built-ins' options: answer_column, score_answer (accuracy), format_pattern (format),
            code_timeout, code_memory_mb, code_workers, code_scoring, tests_column (code). An option of a
            built-in that is not used is ignored; an unknown option is an error.
    """
    known = {f.name for cls in BUILTINS.values() for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown reward function option(s) {unknown}; known: {sorted(known)}")
    functions = dict(functions or {})
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    funcs, names = [], []
    for item in items:
        item = item.strip() if isinstance(item, str) else item
        if callable(item):
            funcs.append(item)
            names.append(_func_name(item))
            continue
        if not isinstance(item, str) or not item:
            raise ConfigError(f"reward function names must be non-empty strings, got {item!r} in {spec!r}")
        if item in functions:
            funcs.append(functions[item])
        elif item in BUILTINS:
            cls = BUILTINS[item]
            funcs.append(cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options}))
        elif item in _BUILT_BY_TRAINER:
            raise ConfigError(f"reward function {item!r} is built by the trainer from the model; this trainer "
                              f"did not provide one")
        elif ":" in item or "." in item:
            funcs.append(_import(item))
            names.append(_func_name(funcs[-1]))
            continue
        else:
            raise ConfigError(f"unknown reward function {item!r}: not a built-in ({', '.join(BUILTINS)}) nor "
                              f"'module:function'")
        names.append(item)
    if isinstance(reward_weights, str):
        try:
            reward_weights = [float(w) for w in reward_weights.split(",")]
        except ValueError as e:
            raise ConfigError(f"reward_weights must be comma-separated numbers, got {reward_weights!r}") from e
    return RewardFunctions(funcs, reward_weights, reward_timeout=reward_timeout, names=names)


def _import(path: str) -> RewardFunc:
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"reward function {path!r} must read 'module:function'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or the module itself failed
        raise ConfigError(f"reward function {path!r}: cannot import module {module_name!r}: "
                          f"{type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward function {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward function {path!r} is a {type(obj).__name__}, not a callable")
    return obj
