"""JSONL data in the conventional formats, checked line by line before any training starts.

- SFT:         {"prompt": str, "completion": str}  or  {"messages": [{"role": str, "content": str}, ...]}
               (the last message is the assistant's answer, the ones before it the prompt)
- preferences: {"prompt": str, "chosen": str, "rejected": str, "margin": float (optional)}
- rankings:    {"prompt": str, "responses": [best, ..., worst]}  (K >= 2 strings)
- unpaired:    {"prompt": str, "completion": str, "label": true | false}  (KTO: desirable or not)
- PPO prompts: {"prompt": str}  or  {"messages": [...]}
- PTX text:    {"text": str}

Files are UTF-8. A malformed line (not UTF-8, not JSON, a missing or mistyped field) raises DataError naming
the file and the line number. Encoding turns records into token-id examples (what the trainers consume) with
the tokenizer's chat template when it has one. Preference pairs whose two responses are identical are
dropped by the reward trainer (drop_tied_pairs), with a warning that counts them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile


class DataError(ValueError):
    """Bad data file or line; the message names the file and line. The CLI exits with code 2."""


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`."""
    if not path:
        raise DataError("no data file given (--data, a JSONL file)")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, expected a JSONL file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    out = []
    try:
        with open(path, "rb") as f:  # bytes, so that a line that is not UTF-8 can be named
            for no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if no == 1 else "utf-8")  # -sig: a leading BOM is not JSON
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{no}: not UTF-8 text (byte {e.start + 1} of the line: {e.reason}); "
                                    "JSONL files must be UTF-8") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{no}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{no}: expected a JSON object, got {type(obj).__name__}")
                out.append((no, obj))
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror or e})") from None
    if not out:
        raise DataError(f"{path}: the file holds no records")
    return out


def _str(obj: dict, key: str, where: str, *, empty_ok: bool = False) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r} (fields present: {sorted(obj)})")
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if not empty_ok and not v:
        raise DataError(f"{where}: field {key!r} is empty")
    return v


def _messages(obj: dict, where: str, *, last_assistant: bool) -> list[dict]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if last_assistant:
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer, after at least one other")
    elif msgs[-1]["role"] == "assistant":
        raise DataError(f"{where}: a prompt's last message must not be the assistant's")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def load_sft(path: str) -> list[dict]:
    """Records {"line", "prompt" (str or messages), "completion"} of an SFT file."""
    out = []
    for no, obj in read_jsonl(path):
        where = f"{path}:{no}"
        if "messages" in obj:
            msgs = _messages(obj, where, last_assistant=True)
            out.append({"line": no, "prompt": msgs[:-1], "completion": msgs[-1]["content"]})
        else:
            out.append({"line": no, "prompt": _str(obj, "prompt", where, empty_ok=True),
                        "completion": _str(obj, "completion", where)})
    return out


def load_rankings(path: str) -> list[dict]:
    """Records {"line", "prompt", "responses": [best, ..., worst], "margin"} of a preference or ranking file.

    A pair {"prompt", "chosen", "rejected", "margin"?} becomes the ranking [chosen, rejected]."""
    out = []
    for no, obj in read_jsonl(path):
        where = f"{path}:{no}"
        prompt = _str(obj, "prompt", where, empty_ok=True)
        margin = None
        if "responses" in obj:
            resp = obj["responses"]
            if not isinstance(resp, list) or len(resp) < 2 or not all(isinstance(r, str) and r for r in resp):
                raise DataError(f"{where}: 'responses' must be a list of at least 2 non-empty strings, best first")
            if "margin" in obj:
                raise DataError(f"{where}: 'margin' is only supported on chosen/rejected pairs")
        elif "chosen" in obj or "rejected" in obj:
            resp = [_str(obj, "chosen", where), _str(obj, "rejected", where)]
            if "margin" in obj:
                margin = obj["margin"]
                if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                    raise DataError(f"{where}: 'margin' must be a finite number, got {margin!r}")
                margin = float(margin)
        else:
            raise DataError(f"{where}: expected 'chosen' and 'rejected', or 'responses' (fields present: {sorted(obj)})")
        out.append({"line": no, "prompt": prompt, "responses": resp, "margin": margin})
    return out


def load_unpaired(path: str) -> list[dict]:
    """Records {"line", "prompt", "completion", "label": bool} of an unpaired-feedback (KTO) file; the label must
    be a JSON boolean (true: desirable), not a number or a string."""
    out = []
    for no, obj in read_jsonl(path):
        where = f"{path}:{no}"
        if "label" not in obj:
            raise DataError(f"{where}: missing field 'label' (fields present: {sorted(obj)})")
        if not isinstance(obj["label"], bool):
            raise DataError(f"{where}: field 'label' must be true or false, got {obj['label']!r}")
        out.append({"line": no, "prompt": _str(obj, "prompt", where, empty_ok=True),
                    "completion": _str(obj, "completion", where), "label": obj["label"]})
    return out


def load_prompts(path: str) -> list[dict]:
    """Records {"line", "prompt" (str or messages)} of a PPO prompt file."""
    out = []
    for no, obj in read_jsonl(path):
        where = f"{path}:{no}"
        if "messages" in obj:
            out.append({"line": no, "prompt": _messages(obj, where, last_assistant=False)})
        else:
            out.append({"line": no, "prompt": _str(obj, "prompt", where)})
    return out


def load_texts(path: str) -> list[dict]:
    """Records {"line", "text"} of a pretraining-text file (the PPO PTX term)."""
    return [{"line": no, "text": _str(obj, "text", f"{path}:{no}")} for no, obj in read_jsonl(path)]


# ----------------------------------------------------------------------------------------- encoding
def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt: through the chat template (with the generation prompt) when the tokenizer
    has one, else the plain text with the tokenizer's usual special tokens (e.g. BOS)."""
    if _has_chat_template(tokenizer):
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, list):
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "
    return list(tokenizer(prompt)["input_ids"])


def encode_response(tokenizer, text: str, *, eos: bool = True) -> list[int]:
    """Token ids of a response, ending with EOS so the policy learns to stop."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def _check_prompt(ids: list[int], max_length: int, where: str, room: int = 1, *, nonempty: bool = False) -> None:
    if nonempty and not ids:
        raise DataError(f"{where}: the prompt encodes to no tokens (does the tokenizer fit the data?)")
    if len(ids) + room > max_length:
        raise DataError(f"{where}: the prompt has {len(ids)} tokens, too long for the context "
                        f"max_length={max_length} (at least {room} response token(s) must fit)")


def encode_sft(records: list[dict], tokenizer, max_length: int, source: str = "") -> list[dict]:
    """{"prompt_ids", "completion_ids"} per record; completions are cut to fit max_length."""
    out = []
    for r in records:
        p = encode_prompt(tokenizer, r["prompt"])
        _check_prompt(p, max_length, f"{source}:{r['line']}")
        c = encode_response(tokenizer, r["completion"])[: max_length - len(p)]
        out.append({"prompt_ids": p, "completion_ids": c})
    return out


def encode_rankings(records: list[dict], tokenizer, max_length: int, source: str = "") -> list[dict]:
    """{"prompt_ids", "response_ids": [best, ..., worst], "margin"} per record."""
    out = []
    for r in records:
        p = encode_prompt(tokenizer, r["prompt"])
        _check_prompt(p, max_length, f"{source}:{r['line']}")
        resp = [encode_response(tokenizer, t)[: max_length - len(p)] for t in r["responses"]]
        out.append({"prompt_ids": p, "response_ids": resp, "margin": r["margin"]})
    return out


def encode_prompts(records: list[dict], tokenizer, max_length: int, response_length: int,
                   source: str = "") -> list[dict]:
    """{"prompt_ids"} per record; prompt + response_length must fit the context."""
    out = []
    for r in records:
        p = encode_prompt(tokenizer, r["prompt"])
        _check_prompt(p, max_length, f"{source}:{r['line']}", room=response_length, nonempty=True)
        out.append({"prompt_ids": p})
    return out


def load_prompt_examples(path: str, tokenizer, max_length: int, response_length: int) -> list[dict]:
    """{"prompt_ids", "text", "columns"} per line of a {"prompt" | "messages", ...columns} JSONL file: what the
    reward functions of RL with verifiable rewards read (columns: every other field, e.g. "answer", "tests")."""
    records = load_prompts(path)
    ids = encode_prompts(records, tokenizer, max_length, response_length, path)
    raw = dict(read_jsonl(path))
    return [{"prompt_ids": e["prompt_ids"], "text": r["prompt"],
             "columns": {k: v for k, v in raw[r["line"]].items() if k not in ("prompt", "messages")}}
            for r, e in zip(records, ids)]


def encode_texts(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """{"input_ids"} per record, cut to max_length."""
    out = []
    for r in records:
        ids = list(tokenizer(r["text"])["input_ids"])[:max_length]
        if len(ids) >= 2:
            out.append({"input_ids": ids})
    return out


def check_examples(examples: list[dict], keys: tuple[str, ...], what: str) -> None:
    """Examples handed to a trainer directly (not from a file) must carry token-id lists under `keys`."""
    if not examples:
        raise DataError(f"{what}: no examples")
    for i, ex in enumerate(examples[:1] + examples[-1:]):
        for k in keys:
            if k not in ex:
                raise DataError(f"{what}: example {i} lacks {k!r} (has {sorted(ex)})")



def drop_tied_pairs(examples: list[dict], what: str) -> tuple[list[dict], int, int]:
    """Rankings without the pairs that can teach no preference: two responses with the same token ids. They come
    from chosen == rejected, a response listed twice in a ranking, or two responses that are equal once cut to
    the context; trained on, such a pair pins its loss at log 2 and pulls nothing apart.

    Call after the responses are cut to the context (fit_context). A response listed twice keeps its first, i.e.
    best, place (the later copy's pairs would contradict it); an example left with fewer than 2 distinct
    responses is dropped whole. Returns (examples, dropped pairs, pairs before); DataError when none is left.
    """
    out, dropped, total = [], 0, 0
    for e in examples:
        resp = e["response_ids"]
        k = len(resp)
        seen, kept = set(), []
        for r in resp:
            if tuple(r) not in seen:
                seen.add(tuple(r))
                kept.append(r)
        total += k * (k - 1) // 2
        dropped += k * (k - 1) // 2 - len(kept) * (len(kept) - 1) // 2
        if len(kept) >= 2:
            out.append(e if len(kept) == k else dict(e, response_ids=kept))
    if total and not out:
        raise DataError(f"{what}: every pair has two identical responses (chosen == rejected, or equal once cut "
                        "to max_length): nothing to train on")
    return out, dropped, total


def fit_context(examples: list[dict], max_length: int, what: str) -> list[dict]:
    """In-memory examples cut to the context: responses ("completion_ids" or each of "response_ids") are
    truncated to max_length - len(prompt); a prompt that leaves no room is a DataError."""
    out = []
    for i, e in enumerate(examples):
        room = max_length - len(e["prompt_ids"])
        if room < 1:
            raise DataError(f"{what}: example {i} has a prompt of {len(e['prompt_ids'])} tokens, too long for "
                            f"the context max_length={max_length}")
        e = dict(e)
        if "completion_ids" in e:
            e["completion_ids"] = e["completion_ids"][:room]
        if "response_ids" in e:
            e["response_ids"] = [r[:room] for r in e["response_ids"]]
        out.append(e)
    return out


def write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    """Write `rows` as JSONL into a temporary sibling (its folder made if missing), then rename it over `path`: a
    reader, or a crash, never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
