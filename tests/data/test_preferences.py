"""Preference pairs that can teach nothing (two identical responses: chosen == rejected, a response repeated
in a ranking, or equal once cut to max_length) are dropped with a warning and a logged count, or refused when
nothing else is left; pair accuracy counts a tie as 0.5 in training and in validation alike."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_fast.data.collate import collate_rankings
from rlhf_fast.data.jsonl import DataError, drop_tied_pairs, fit_context
from rlhf_fast.models import RoleModel
from rlhf_fast.trainers import OptimConfig, RMConfig, train_rm
from rlhf_fast.trainers.rm import evaluate_rm, rm_loss
from tests import tiny as _tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(_tiny.build_tiny_model(tmp_path_factory.mktemp("prefs-llama"), "llama"))


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ex(*responses, prompt=(5,), margin=None):
    return {"prompt_ids": list(prompt), "response_ids": [list(r) for r in responses], "margin": margin}


def test_identical_pairs_and_repeats_are_dropped():
    examples = [ex([3, 4], [3, 4]),            # chosen == rejected: gone
                ex([3, 4], [6]),               # a real pair: kept
                ex([7], [8], [7]),             # the repeat of the best keeps its first place: [7] > [8]
                ex([7], [7], [7])]             # one distinct response: gone
    kept, dropped, total = drop_tied_pairs(examples, "x")
    assert [e["response_ids"] for e in kept] == [[[3, 4], [6]], [[7], [8]]]
    assert (dropped, total) == (1 + 2 + 3, 1 + 1 + 3 + 3)
    assert kept[0] is examples[1]  # untouched examples are not copied


def test_pairs_equal_once_cut_to_the_context_are_dropped():
    cut = fit_context([ex([3, 4, 9], [3, 4, 10]), ex([3], [4])], max_length=3, what="x")  # room 2: both [3, 4]
    kept, dropped, total = drop_tied_pairs(cut, "x")
    assert (dropped, total) == (1, 2) and kept == [cut[1]]


def test_nothing_but_ties_is_a_data_error():
    with pytest.raises(DataError, match="every pair has two identical responses"):
        drop_tied_pairs([ex([3], [3]), ex([4, 5], [4, 5], [4, 5])], "RM examples")


def test_train_rm_drops_ties_warns_and_logs_the_count(tiny_model, tmp_path):
    rows = [{"prompt": f"w{i}", "chosen": "w7 w7", "rejected": "w8 w8"} for i in range(10, 20)]
    rows += [{"prompt": "w1", "chosen": "w9", "rejected": "w9"},                        # identical
             {"prompt": "w2", "responses": ["w7", "w9", "w7"]},                           # a repeat: 2 pairs go
             {"prompt": "w3", "chosen": "w4 w5 w6 w7", "rejected": "w4 w5 w6 w8"}]        # equal once cut
    data = write(tmp_path / "prefs.jsonl", rows)
    cfg = RMConfig(model=tiny_model, data=data, out_dir=str(tmp_path / "rm"), max_length=4, max_steps=2,
                   batch_size=4, val_fraction=0.0, progress=False, optim=OptimConfig(lr=1e-2))
    with pytest.warns(UserWarning, match="dropped 4 of 15 pairs whose two responses are identical"):
        train_rm(cfg)
    last = [json.loads(ln) for ln in open(tmp_path / "rm" / "metrics.jsonl")][-1]
    assert last["data/dropped_pairs"] == 4 and last["data/val_dropped_pairs"] == 0


def test_train_rm_refuses_a_file_of_ties_before_writing(tiny_model, tmp_path):
    data = write(tmp_path / "ties.jsonl", [{"prompt": "w1", "chosen": "w2", "rejected": "w2"}] * 3)
    with pytest.raises(DataError, match="every pair has two identical responses"):
        train_rm(RMConfig(model=tiny_model, data=data, out_dir=str(tmp_path / "rm"), progress=False))
    assert not (tmp_path / "rm").exists()


def test_tied_scores_count_half_in_training_and_validation(tiny_model):
    model = RoleModel.from_pretrained(tiny_model)
    with torch.no_grad():
        model.score_head.weight.zero_()  # every response scores the bias: every pair is a tie
    examples = [ex([7, 7], [8, 8]), ex([9], [10], [11])]
    _, metrics = rm_loss(model, collate_rankings(examples, 0))
    assert float(metrics["accuracy"]) == 0.5
    assert evaluate_rm(model, examples, 0, torch.device("cpu"))["accuracy"] == 0.5
