"""JSONL loaders and collation: good files load, malformed lines name the file and the line."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_fast.data.collate import collate_prompts, collate_rankings, collate_sft
from rlhf_fast.data.jsonl import (
    DataError,
    encode_prompt,
    encode_prompts,
    encode_rankings,
    encode_sft,
    fit_context,
    load_prompts,
    load_rankings,
    load_sft,
    load_texts,
)
from tests import tiny as _tiny


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(p)


@pytest.fixture
def tok():
    return _tiny.tiny_tokenizer()


def test_sft_both_formats(tmp_path, tok):
    path = write(tmp_path, "sft.jsonl", [
        {"prompt": "w1 w2", "completion": "w3"},
        "",
        {"messages": [{"role": "user", "content": "w4"}, {"role": "assistant", "content": "w5 w6"}]},
    ])
    recs = load_sft(path)
    assert [r["line"] for r in recs] == [1, 3]
    assert recs[1]["prompt"] == [{"role": "user", "content": "w4"}] and recs[1]["completion"] == "w5 w6"
    ex = encode_sft(recs, tok, max_length=16, source=path)
    assert ex[0]["prompt_ids"] == [4, 5]
    assert ex[0]["completion_ids"] == [6, tok.eos_token_id]  # responses end with EOS


def test_chat_template_is_used(tmp_path, tok):
    tok.chat_template = ("{% for m in messages %}w50 {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}w51 {% endif %}")
    assert encode_prompt(tok, "w3 w4") == [53, 6, 7, 54]
    assert encode_prompt(tok, [{"role": "user", "content": "w3"}, {"role": "user", "content": "w4"}]) == \
        [53, 6, 53, 7, 54]


def test_preferences_and_rankings(tmp_path, tok):
    path = write(tmp_path, "prefs.jsonl", [
        {"prompt": "w1", "chosen": "w2", "rejected": "w3", "margin": 1.5},
        {"prompt": "w1", "chosen": "w2", "rejected": "w3"},
        {"prompt": "w1", "responses": ["w2", "w3", "w4"]},
    ])
    recs = load_rankings(path)
    assert recs[0]["responses"] == ["w2", "w3"] and recs[0]["margin"] == 1.5
    assert recs[1]["margin"] is None and len(recs[2]["responses"]) == 3
    ex = encode_rankings(recs, tok, 16, path)
    b = collate_rankings(ex, tok.pad_token_id)
    assert b["input_ids"].shape[0] == 2 + 2 + 3
    # C(2,2) + C(2,2) + C(3,2) pairs, chosen always ranked above rejected, within its own prompt
    assert b["chosen"].tolist() == [0, 2, 4, 4, 5] and b["rejected"].tolist() == [1, 3, 5, 6, 6]
    assert b["group"].tolist() == [0, 1, 2, 2, 2]
    assert b["margin"].tolist() == [1.5, 0.0, 0.0, 0.0, 0.0]


def test_prompts_and_texts(tmp_path, tok):
    p = write(tmp_path, "p.jsonl", [{"prompt": "w1 w2 w3"}, {"prompt": "w4"}])
    ex = encode_prompts(load_prompts(p), tok, max_length=8, response_length=4, source=p)
    b = collate_prompts(ex, tok.pad_token_id)
    assert b["prompt_ids"].tolist() == [[4, 5, 6], [0, 0, 7]]  # left-padded for generation
    assert b["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert load_texts(write(tmp_path, "t.jsonl", [{"text": "w1"}]))[0]["text"] == "w1"


def test_collate_sft_masks_the_prompt():
    b = collate_sft([{"prompt_ids": [5, 6], "completion_ids": [7, 1]}, {"prompt_ids": [5], "completion_ids": [8]}],
                    pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1], [5, 8, 0, 0]]
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert torch.equal(b["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))


@pytest.mark.parametrize("loader, lines, needle", [
    (load_sft, ['{"prompt": "w1", "completion": "w2"}', '{"prompt": "w1", "completion": '], "not valid JSON"),
    (load_sft, ['{"prompt": "w1", "completion": "w2"}', '["w1"]'], "expected a JSON object"),
    (load_sft, ['{"prompt": "w1", "completion": "w2"}', '{"prompt": "w1"}'], "missing field 'completion'"),
    (load_sft, ['{"prompt": "w1", "completion": "w2"}', '{"prompt": 3, "completion": "w2"}'], "must be a string"),
    (load_sft, ['{"prompt": "w1", "completion": "w2"}', '{"messages": [{"role": "user", "content": "w1"}]}'],
     "last message must be the assistant"),
    (load_rankings, ['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": "b"}'],
     "missing field 'rejected'"),
    (load_rankings, ['{"prompt": "a", "chosen": "b", "rejected": "c"}',
                     '{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}'], "'margin' must be a finite"),
    (load_rankings, ['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "responses": ["b"]}'],
     "at least 2"),
    (load_prompts, ['{"prompt": "a"}', '{"text": "a"}'], "missing field 'prompt'"),
])
def test_malformed_line_names_file_and_line(tmp_path, loader, lines, needle):
    path = write(tmp_path, "bad.jsonl", lines)
    with pytest.raises(DataError) as e:
        loader(path)
    assert f"{path}:2:" in str(e.value) and needle in str(e.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_sft(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no data file given"):
        load_prompts("")
    with pytest.raises(DataError, match="no records"):
        load_sft(write(tmp_path, "empty.jsonl", [""]))


def test_prompt_longer_than_context(tmp_path, tok):
    path = write(tmp_path, "p.jsonl", [{"prompt": "w1"}, {"prompt": " ".join(["w1"] * 10)}])
    with pytest.raises(DataError, match=r"p.jsonl:2: the prompt has 10 tokens"):
        encode_prompts(load_prompts(path), tok, max_length=12, response_length=4, source=path)


def test_fit_context_cuts_responses_and_refuses_long_prompts():
    ex = fit_context([{"prompt_ids": [1, 2], "completion_ids": [3, 4, 5]},
                      {"prompt_ids": [1], "response_ids": [[3, 4, 5], [6]]}], 4, "x")
    assert ex[0]["completion_ids"] == [3, 4] and ex[1]["response_ids"] == [[3, 4, 5], [6]]
    with pytest.raises(DataError, match="x: example 0 has a prompt of 4 tokens"):
        fit_context([{"prompt_ids": [1, 2, 3, 4], "completion_ids": [5]}], 4, "x")
