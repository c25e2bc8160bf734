"""`rlhf-fast dpo` and `rlhf-fast kto` through the command: help lists every option, tiny offline runs write a
model and TRL's metrics, bad input exits 2 with one line before anything is written."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from rlhf_fast import cli
from rlhf_fast.trainers import DPOConfig, KTOConfig
from tests.tiny import write_jsonl

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def command(*args):
    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-fast")
    return subprocess.run([exe, *args], env=ENV, capture_output=True, text=True, timeout=300)


def leaf_fields(cls):
    out = []
    for f in dataclasses.fields(cls):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        prefix = "lora_" if f.name == "lora" else ""
        out += [prefix + g.name for g in dataclasses.fields(sub)] if dataclasses.is_dataclass(sub) else [f.name]
    return out


def test_help_lists_every_option(capsys):
    assert cli.main(["dpo", "--help"]) == 0
    text = capsys.readouterr().out
    for name in leaf_fields(DPOConfig):
        assert f"--{name}" in text, name
    assert "sigmoid, ipo, hinge, robust, simpo, orpo" in " ".join(text.split())
    text = cli.build_parser("kto").format_help()
    assert all(f"--{n}" in text for n in leaf_fields(KTOConfig))
    assert "dpo" in cli._usage() and "kto" in cli._usage()


def test_tiny_dpo_and_kto_runs(tiny_model, data_files, tmp_path, capsys):
    common = ["--model", tiny_model, "--max_steps", "2", "--batch_size", "4", "--no-progress"]
    r = command("dpo", *common, "--data", data_files["ranks"], "--out_dir", str(tmp_path / "dpo"),
                "--loss_type", "ipo", "--beta", "0.5", "--precompute_ref_logprobs")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in open(tmp_path / "dpo" / "metrics.jsonl")]
    assert len(rows) == 2 and {"loss", "rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(rows[-1])
    assert os.path.isfile(tmp_path / "dpo" / "ref_logprobs.pt")
    assert os.path.isfile(tmp_path / "dpo" / "model" / "adapters" / "policy" / "adapter_model.safetensors")

    data = write_jsonl(tmp_path / "k.jsonl", [{"prompt": f"w{10 + i}", "completion": f"w{20 + i} w7",
                                               "label": i % 3 == 0} for i in range(8)])
    assert cli.main(["kto", *common, "--data", data, "--out_dir", str(tmp_path / "kto")]) == 0
    assert "rlhf-fast kto: done" in capsys.readouterr().out
    rows = [json.loads(ln) for ln in open(tmp_path / "kto" / "metrics.jsonl")]
    assert {"loss", "kl", "rewards/chosen"} <= set(rows[-1])


@pytest.mark.parametrize("stage,extra,needle", [
    ("dpo", ["--loss_type", "dpo"], "loss_type"),  # argparse's own choices check
    ("dpo", ["--beta", "0"], "beta must be > 0"),
    ("dpo", ["--loss_type", "robust", "--label_smoothing", "0.5"], "label_smoothing"),
    ("dpo", ["--loss_type", "orpo", "--precompute_ref_logprobs"], "not needed"),
    ("dpo", ["--online"], "--online needs"),
    ("dpo", ["--data", "PROMPTS"], "expected 'chosen' and 'rejected'"),
    ("kto", ["--data", "PAIRS"], "missing field 'label'"),
    ("kto", ["--batch_size", "1"], "batch_size"),
])
def test_bad_input_exits_2_before_writing(tiny_model, data_files, tmp_path, capsys, stage, extra, needle):
    out = tmp_path / "out"
    data = data_files["pairs"]
    extra = [{"PROMPTS": data_files["prompts"], "PAIRS": data_files["pairs"]}.get(x, x) for x in extra]
    code = cli.main([stage, "--model", tiny_model, "--data", data, "--out_dir", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err, err
    if "expected" in needle:
        assert "prompts.jsonl:1" in err  # the file and the line
    assert not out.exists()
