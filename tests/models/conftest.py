"""Tiny causal LMs built from configs (no downloads), saved with a local tokenizer. Trainer tests may reuse
`tiny_model_factory` (import it from here or list this conftest's fixtures in their own)."""

from __future__ import annotations

import pytest
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


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """factory(arch="llama", with_pad=True, seed=0, dtype=torch.float32, **config) -> folder, cached per session."""
    cache = {}

    def make(arch: str = "llama", **kwargs):
        key = (arch, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            cache[key] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **kwargs)
        return cache[key]

    return make
