"""Test helpers every test folder imports (`from tests.tiny import ...`): tiny causal LMs built from configs and
saved with a local word-level tokenizer (no downloads), and small JSONL data files for the trainers."""

from __future__ import annotations

import json
import os
import random

import torch

ARCHS = ("llama", "qwen2", "gpt2")
VOCAB = 96  # 3 specials + 93 words


def tiny_tokenizer(with_pad: bool = True):
    """A whitespace WordLevel tokenizer: <pad>=0, <eos>=1, <unk>=2, then words w0..w92."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(VOCAB - 3)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = dict(eos_token="<eos>", unk_token="<unk>")
    if with_pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def tiny_config(arch: str, *, with_pad: bool = True, hidden: int = 32, layers: int = 2, vocab: int = VOCAB):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    pad = 0 if with_pad else None
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, pad_token_id=pad, eos_token_id=1, bos_token_id=1,
                           tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, pad_token_id=pad, eos_token_id=1, bos_token_id=1,
                           tie_word_embeddings=True)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=pad, eos_token_id=1,
                          bos_token_id=1)
    raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")


def build_tiny_model(path, arch: str = "llama", *, with_pad: bool = True, seed: int = 0,
                     dtype: torch.dtype = torch.float32, **config_kwargs):
    """Build a random tiny model of `arch`, save it (safetensors) and a tokenizer to `path`; return `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, with_pad=with_pad, **config_kwargs))
    with torch.no_grad():  # larger than the default init so the models are far from uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.to(dtype).save_pretrained(path)
    tiny_tokenizer(with_pad).save_pretrained(path)
    return path


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def make_data(folder, n: int = 24, seed: int = 0) -> dict[str, str]:
    """SFT (the completion copies the prompt backwards), preference pairs (chosen is full of w7, rejected of
    w8), 3-way rankings, PPO prompts and PTX text, as JSONL files in `folder`."""
    rng = random.Random(seed)
    sft, pairs, ranks, prompts, texts = [], [], [], [], []
    for _ in range(n):
        p = [rng.randrange(10, 40) for _ in range(rng.randrange(2, 5))]
        sft.append({"prompt": words(p), "completion": words(p[::-1])})
        k = rng.randrange(1, 4)
        pairs.append({"prompt": words(p), "chosen": words([7] * k + p), "rejected": words([8] * k + p)})
        ranks.append({"prompt": words(p), "responses": [words([7] * 3), words([7, 9, 9]), words([8] * 3)]})
        prompts.append({"prompt": words(p)})
        texts.append({"text": words(p + p)})
    out = {}
    for name, rows in (("sft", sft), ("pairs", pairs), ("ranks", ranks), ("prompts", prompts), ("ptx", texts)):
        out[name] = write_jsonl(os.path.join(folder, f"{name}.jsonl"), rows)
    return out
