"""Procedural tasks of reasoning-gym (Stojanovski et al. 2025, https://github.com/open-thought/reasoning-gym)
as GRPO prompts, scored by the task's own checker.

    --dataset "reasoning_gym:basic_arithmetic?min_terms=2&max_terms=2&max_digits=1"

    examples = load_reasoning_gym("basic_arithmetic?max_digits=1", 1000, 0, tok, 512, 64)
    Accuracy(score_answer=score_answer)     # rl/rewards.py: the extracted answer, scored by ds.score_answer

A spec is NAME or NAME?key=value&key=value: the keys are the task's config fields (see
reasoning_gym.factory.DATASETS[NAME][1]); values are read as int, float, true/false, else text, and a value
with commas (or any value of a list-valued field) as a list: operators=+,- . Values are %-decoded, but "+" is
kept as a plus, not a space. size and seed are the loader's arguments, not spec keys.

Each example is {"prompt_ids", "text": the question, "columns": {"answer", "_rg_entry": the entry,
"_rg_spec": the spec}}; the prompt is the question as the user's message through the tokenizer's chat
template (the template's own default system prompt, if any, stays) or the plain question without one.

reasoning-gym seeds entry i with Random(seed + i), so two datasets whose seeds differ by less than their
size share entries (seed 1 is seed 0 shifted by one). The held-out split therefore uses a far seed
(EVAL_SEED_OFFSET), drops every question that also occurs in the training split, and keeps each question once.

Scoring: reasoning_gym's extract_answer reads only <answer>...</answer>, which small chat models rarely
write; `accuracy` extracts the answer with rl.rewards.extract_answer (answer tag, then \\boxed{}, then the
last number) and score_answer passes it to the task's ds.score_answer(answer, entry). Note that the default
ProceduralDataset.score_answer gives partial credit len(gold) / len(answer) when the gold answer is a
substring of the answer ("18" for gold "8" scores 0.5); evaluate() counts only a score of 1.0 as correct.

Needs the optional reasoning-gym package (`pip install reasoning-gym`, or the project's `rlvr` extra): it is
imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import warnings
from typing import Any
from urllib.parse import unquote

import torch

from rlhf_fast.data.collate import collate_prompts
from rlhf_fast.data.jsonl import DataError, encode_prompt
from rlhf_fast.errors import ConfigError

PREFIX = "reasoning_gym:"
EVAL_SEED_OFFSET = 1_000_003  # far from any training seed + size; see the module docstring
_RESERVED = ("size", "seed")


def _reasoning_gym():
    try:  # optional dependency
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError as e:
        raise ConfigError("the reasoning_gym dataset needs the reasoning-gym package: `pip install reasoning-gym` "
                          "(or the rlvr extra)") from e
    return reasoning_gym, DATASETS


def _value(text: str) -> Any:
    if "," in text:
        return [_value(t) for t in text.split(",") if t != ""]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """"NAME?k=v&k2=v2" (an optional "reasoning_gym:" prefix) -> (NAME, {k: v, ...}) with the values parsed
    (see the module docstring). ConfigError for an empty name, a key without "=", a repeated key or size / seed."""
    s = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    name, _, query = s.partition("?")
    name = name.strip()
    if not name:
        raise ConfigError(f"reasoning_gym spec {spec!r} names no task (expected NAME or NAME?key=value&...)")
    kwargs: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, raw = part.partition("=")
        key = unquote(key).strip()
        if not eq or not key:
            raise ConfigError(f"reasoning_gym spec {spec!r}: {part!r} is not key=value")
        if key in kwargs:
            raise ConfigError(f"reasoning_gym spec {spec!r}: {key!r} is given twice")
        if key in _RESERVED:
            raise ConfigError(f"reasoning_gym spec {spec!r}: {key!r} is not a spec key (size and seed come from "
                              "--dataset_size / --eval_size and --seed)")
        kwargs[key] = _value(unquote(raw))
    return name, kwargs


def task_names() -> list[str]:
    """Every task name reasoning-gym registers (sorted)."""
    return sorted(_reasoning_gym()[1])


def create(spec: str, size: int, seed: int):
    """reasoning_gym.create_dataset for `spec`, with ConfigErrors that name the valid tasks or config keys."""
    rg, registry = _reasoning_gym()
    name, kwargs = parse_spec(spec)
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=3) or sorted(registry)[:8]
        raise ConfigError(f"reasoning_gym has no task {name!r}; e.g. {', '.join(close)} "
                          f"({len(registry)} tasks: reasoning_gym.factory.DATASETS)")
    fields = {f.name: f for f in dataclasses.fields(registry[name][1])}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        keys = [k for k in fields if k not in _RESERVED]
        raise ConfigError(f"reasoning_gym task {name!r} has no option(s) {unknown}; its options: {', '.join(keys)}")
    for k, v in kwargs.items():  # a list-valued field given one value (operators=+)
        default = fields[k].default
        if isinstance(default, (list, tuple)) and not isinstance(v, list):
            kwargs[k] = [v]
    try:
        return rg.create_dataset(name, size=size, seed=seed, **kwargs)
    except (AssertionError, TypeError, ValueError) as e:
        raise ConfigError(f"reasoning_gym task {name!r} refuses {kwargs}: {type(e).__name__}: {e}") from e


@functools.lru_cache(maxsize=32)
def _scorer(spec: str):
    # the task's score_answer; the dataset is rebuilt from the spec (size and seed do not affect scoring)
    return create(spec, 1, 0).score_answer


def score_answer(answer: str | None, columns: dict[str, Any]) -> float | None:
    """The `accuracy` reward's score_answer hook: the task's ds.score_answer(answer, entry) for a row made by
    load_reasoning_gym (columns "_rg_entry", "_rg_spec"); None (the reward does not apply) for other rows.

    answer: the extracted final answer (rl.rewards.extract_answer), None when the completion has none.
    Returns a float in [0, 1] (1.0: correct; some tasks give partial credit)."""
    entry, spec = columns.get("_rg_entry"), columns.get("_rg_spec")
    if entry is None or spec is None:
        return None
    return float(_scorer(spec)(answer=answer, entry=entry))


def load_reasoning_gym(spec: str, size: int, seed: int, tokenizer, max_length: int, response_length: int, *,
                       exclude: set[str] | frozenset[str] = frozenset(), system_prompt: str | None = None
                       ) -> list[dict]:
    """`size` prompts of a reasoning-gym task as GRPO examples {"prompt_ids", "text", "columns"}.

    Args:
        spec: "NAME" or "NAME?key=value&..." (optionally prefixed "reasoning_gym:"), see parse_spec.
        size: number of examples; seed: the dataset's seed (entry i is drawn with Random(seed + i)).
        tokenizer: encodes the prompts (chat template when it has one, see data.jsonl.encode_prompt).
        max_length, response_length: every prompt + response_length tokens must fit max_length (DataError).
        exclude: questions to leave out (the training questions, for a held-out split). When given, the
            questions are also made distinct; entries are drawn further along the stream to make up `size`, and a
            warning says when fewer were found.
        system_prompt: an optional system message before the question.
    Returns:
        examples whose columns are {"answer": str, "_rg_entry": dict (question, answer, metadata),
        "_rg_spec": the spec without prefix}.
    """
    if size < 1:
        raise ConfigError(f"reasoning_gym: size must be >= 1, got {size}")
    spec = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    limit = size if not exclude else 4 * (size + len(exclude))
    ds = create(spec, limit, seed)
    out, seen = [], set(exclude)
    for i in range(limit):
        if len(out) == size:
            break
        entry = ds[i]
        if entry["question"] in seen:
            continue
        if exclude:
            seen.add(entry["question"])
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
            [{"role": "user", "content": entry["question"]}]
        ids = encode_prompt(tokenizer, msgs if system_prompt else entry["question"])
        if not ids or len(ids) + response_length > max_length:
            raise DataError(f"reasoning_gym {spec!r} entry {i}: the prompt has {len(ids)} tokens; with "
                            f"{response_length} response tokens it must fit max_length={max_length}")
        out.append({"prompt_ids": ids, "text": entry["question"],
                    "columns": {"answer": entry["answer"], "_rg_entry": entry, "_rg_spec": spec}})
    if len(out) < size:
        warnings.warn(f"reasoning_gym {spec!r}: only {len(out)} of {size} held-out questions are distinct and "
                      f"differ from the training ones (the task has few distinct questions)", stacklevel=2)
    return out


def load_reasoning_gym_splits(spec: str, train_size: int, eval_size: int, seed: int, tokenizer, max_length: int,
                              response_length: int, **kwargs) -> tuple[list[dict], list[dict]]:
    """(train, held-out) examples: train from `seed`, held-out from seed + EVAL_SEED_OFFSET: distinct
    questions, none of them a training question; eval_size 0 gives no held-out examples. kwargs: load_reasoning_gym's system_prompt."""
    train = load_reasoning_gym(spec, train_size, seed, tokenizer, max_length, response_length, **kwargs)
    if eval_size <= 0:
        return train, []
    held = load_reasoning_gym(spec, eval_size, seed + EVAL_SEED_OFFSET, tokenizer, max_length, response_length,
                              exclude=frozenset(e["text"] for e in train), **kwargs)
    return train, held


@torch.no_grad()
def evaluate(model, examples: list[dict], reward_fn, *, max_new_tokens: int, batch_size: int = 16,
             pad_id: int, eos_id: int | None, decode) -> dict[str, float]:
    """Greedy held-out accuracy of `model` (a RoleModel: generate(prompt_ids, prompt_mask, ...)).

    reward_fn: a reward function with TRL's contract (e.g. rl.rewards.Accuracy(score_answer=score_answer)).
    decode(sequences, response_mask) -> list[str]: the completions' text (rl.rewards.completion_texts).
    Returns {"accuracy": fraction scoring 1.0, "score": mean score, "n": examples scored, "mean_length":
    mean completion tokens}. Unscorable rows (None) are left out of both means.
    """
    scores, lengths = [], []
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        p = collate_prompts(batch, pad_id)
        dev = next(model.parameters()).device
        out = model.generate(p["prompt_ids"].to(dev), p["prompt_mask"].to(dev), max_new_tokens=max_new_tokens,
                             temperature=0.0, eos_token_id=eos_id, pad_token_id=pad_id)
        texts = decode(out["sequences"], out["response_mask"])
        keys = sorted({k for e in batch for k in e["columns"]})
        cols = {k: [e["columns"].get(k) for e in batch] for k in keys}
        scores += list(reward_fn(prompts=[e["text"] for e in batch], completions=texts, **cols))
        lengths += out["response_mask"].sum(1).tolist()
    valid = [float(s) for s in scores if s is not None and math.isfinite(float(s))]
    n = len(valid)
    return {"accuracy": sum(s == 1.0 for s in valid) / max(n, 1), "score": sum(valid) / max(n, 1), "n": n,
            "mean_length": sum(lengths) / max(len(lengths), 1)}
