"""Save and load: the only code that knows a RoleModel folder's on-disk format.

    path/role_model.json                     settings: LoRA of each adapter, base fingerprint, trained roles, ...
    path/adapters/{policy,critic,reward}/    adapter_config.json + adapter_model.safetensors (PEFT's format)
    path/heads.safetensors                   value_head.* and score_head.* (+ score_head_k.* of ensemble members)
    path/adapters/reward_k/                  reward-ensemble members k = 1 .. K-1 (an ensemble folder only; its
                                             settings hold "reward_ensemble": {"members": K, "offsets": [...]})
    path/base/                               the base in transformers format + tokenizer (save_base=True only)

Every folder is written into a temporary sibling and renamed into place, so a reader never sees half of one.
The base fingerprint (config + a strided sample of every base tensor) lets a later stage refuse adapters that
were trained on another base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import peft
import torch
import transformers
from peft import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rlhf_fast.errors import ConfigError
from rlhf_fast.models import gguf
from rlhf_fast.models.conventions import ADAPTERS, LoraSettings, reward_member_name

SETTINGS_FILE = "role_model.json"
HEADS_FILE = "heads.safetensors"
_FINGERPRINT_STRIDE = 4099  # a prime: the sample does not line up with rows of power-of-two widths


# ----------------------------------------------------------------------------------------------- the base

def base_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's own state dict (LoRA layers stripped, names as in the plain transformers model)."""
    return {name.replace(".base_layer.", "."): t for name, t in model.lm.state_dict().items() if "lora_" not in name}


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """A base weight sharded by FSDP2 (a DTensor) gathered whole: a collective every process must make, in the same
    order. Other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def base_fingerprint(model) -> str:
    """sha256 of the base's config (model type and sizes) and of every base tensor's name, shape and a strided
    sample of its values: equal for the same weights, different for another base or a merged one. With a base
    sharded by FSDP2 every process must call it (each sharded tensor is gathered in turn)."""
    h = hashlib.sha256()
    c = model.config
    h.update(json.dumps({k: getattr(c, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                            "vocab_size", "intermediate_size")}).encode())
    for name, t in sorted(base_state_dict(model).items()):
        # rounded to bf16: the same base loaded in another dtype keeps its fingerprint
        flat = whole_tensor(t).detach().reshape(-1)[::_FINGERPRINT_STRIDE].to(torch.bfloat16).float().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()[:32]


# ----------------------------------------------------------------------------------------------- settings

def read_settings(path: str | os.PathLike) -> dict:
    """role_model.json of a RoleModel folder; ConfigError when the folder is not one or the file is unreadable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"RoleModel folder {str(path)!r} is a file, not a folder (expected the out_dir/model "
                          "folder a trainer writes)")
    if not path.is_dir():
        raise ConfigError(f"RoleModel folder {str(path)!r} does not exist")
    f = path / SETTINGS_FILE
    if not f.is_file():
        raise ConfigError(f"{str(path)!r} is not a RoleModel folder (no {SETTINGS_FILE}; expected the "
                          "out_dir/model folder a trainer writes)")
    try:
        settings = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{f} is unreadable: {e}") from e
    if not isinstance(settings, dict) or not isinstance(settings.get("lora"), dict):
        raise ConfigError(f"{f} is not a RoleModel settings file (no 'lora' settings in it)")
    return settings


def _lora_settings(saved, f: str) -> LoraSettings:
    try:
        return LoraSettings(**saved)
    except TypeError as e:  # unknown or missing keys (a file from another version, or edited)
        raise ConfigError(f"{f} records LoRA settings this version cannot use ({saved!r}): {e}") from e


def adapter_settings(settings: dict, name: str) -> LoraSettings:
    """The LoRA settings adapter `name` was saved with (per adapter when recorded, else the shared ones)."""
    per = (settings.get("adapter_lora") or {}).get(name) or settings["lora"]
    return _lora_settings(per, SETTINGS_FILE)


# ----------------------------------------------------------------------------------------------- save

def save(model, path: str | os.PathLike, *, save_base: bool = False, gathered: dict | None = None) -> Path:
    """Write the adapters (PEFT format, loadable by peft.PeftModel.from_pretrained), the heads and the
    settings to `path`, atomically (a temp folder renamed into place); see the module docstring for the layout.
    An earlier folder at `path` is replaced whole. Refuses to write non-finite adapter or head weights.
    gathered: for a base sharded by FSDP2, what every process gathered beforehand (trainers.distributed.save_model):
    {"fingerprint", "base_state" (the whole base, with save_base)}, so that one process alone can write."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(f"refusing to save non-finite weights ({len(bad)} tensors, e.g. {bad[0]})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        names = list(getattr(model, "adapter_names", ADAPTERS))  # + the reward-ensemble members, if any
        for name in names:
            model.peft.peft_config[name].base_model_name_or_path = model.base_name_or_path
        model.peft.save_pretrained(str(tmp / "adapters"), selected_adapters=names)
        heads = {f"value_head.{k}": v.detach().contiguous() for k, v in model.value_head.state_dict().items()}
        heads |= {f"score_head.{k}": v.detach().contiguous() for k, v in model.score_head.state_dict().items()}
        members = getattr(model, "reward_members", 1)
        for j in range(1, members):
            heads |= {f"score_head_{j}.{k}": v.detach().contiguous()
                      for k, v in model.reward_head(j).state_dict().items()}
        save_file(heads, str(tmp / HEADS_FILE))
        if save_base:
            state = gathered["base_state"] if gathered else base_state_dict(model)
            model.lm.save_pretrained(str(tmp / "base"), state_dict=state)
            if model.tokenizer is not None:
                model.tokenizer.save_pretrained(str(tmp / "base"))
        settings = {"lora": dataclasses.asdict(model.lora),
                    "adapter_lora": {n: dataclasses.asdict(s) for n, s in model.adapter_lora.items()},
                    "base_model": model.base_name_or_path, "has_base": save_base,
                    "base_fingerprint": gathered["fingerprint"] if gathered else base_fingerprint(model),
                    "trained_roles": sorted(model.trained_roles),
                    "merged_into_base": model.merged_into_base, "model_type": model.config.model_type,
                    "dtype": str(model.lm_head.weight.dtype),
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "peft": peft.__version__}}
        if members > 1:  # only an ensemble writes this entry: a single reward model's folder is as before
            settings["reward_ensemble"] = {"members": members, "offsets": [float(o) for o in model.reward_offsets]}
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def remove_stale_temporaries(parent: str | os.PathLike) -> list[str]:
    """Delete `.NAME.tmp-*` / `.NAME.old-*` folders that a process killed during save() left in `parent`
    (a full base copy for SFT). Returns what was removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    gone = []
    for p in parent.iterdir():
        if p.is_dir() and p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(str(p))
    return gone


# ----------------------------------------------------------------------------------------------- load

def _load_tensors(f: Path) -> dict[str, torch.Tensor]:
    if not f.is_file():
        raise ConfigError(f"missing file {f}")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{f} is unreadable (truncated or not safetensors?): {e}") from e


@torch.no_grad()
def load_adapters(model, path: str | os.PathLike, roles: tuple[str, ...] = ADAPTERS) -> None:
    """Load the adapters of `roles` (and their heads: critic -> value_head, reward -> score_head) written by
    save() into `model`. An adapter saved with other LoRA settings (rank, alpha, targets) is re-created with
    them first, so e.g. a reward model trained at r=4 loads into a model built at r=8. "reward" of an ensemble
    folder loads every member (the model grows or shrinks to the folder's K members)."""
    path = Path(path)
    settings = read_settings(path)
    heads = _load_tensors(path / HEADS_FILE)
    members = ensemble_size(settings, path)
    names = list(roles)
    if "reward" in roles:
        model.set_reward_members(members)
        names += [reward_member_name(j) for j in range(1, members)]
    for name in names:
        saved = adapter_settings(settings, name)
        if saved != model.adapter_lora[name]:
            model.replace_adapter(name, saved)
        f = path / "adapters" / name / "adapter_model.safetensors"
        result = set_peft_model_state_dict(model.peft, _load_tensors(f), adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if missing:
            raise ConfigError(f"adapter {name!r} in {f} does not fit this base: {len(missing)} tensors missing, "
                              f"e.g. {missing[0]}")
    member_heads = [("reward", f"score_head_{j}", model.reward_head(j)) for j in range(1, members) if "reward" in roles]
    for role, head_name, head in [("critic", "value_head", model.value_head), ("reward", "score_head", model.score_head),
                                  *member_heads]:
        if role in roles:
            sd = {k.split(".", 1)[1]: v for k, v in heads.items() if k.startswith(head_name + ".")}
            try:
                head.load_state_dict(sd)
            except RuntimeError as e:
                raise ConfigError(f"{path / HEADS_FILE}: {head_name} does not fit this base: {e}") from e
    if "reward" in roles:
        model.reward_offsets = list((settings.get("reward_ensemble") or {}).get("offsets", [0.0] * members))
    model.trained_roles |= set(settings.get("trained_roles", [])) & set(roles)
    model.refresh_trainable()


def ensemble_size(settings: dict, path: str | os.PathLike = SETTINGS_FILE) -> int:
    """K, the reward-ensemble members a folder's settings record (1 for a single reward model)."""
    entry = settings.get("reward_ensemble") or {}
    k = entry.get("members", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{path}: reward_ensemble records {k!r} members (expected an integer >= 1)")
    return k


def load_reward(model, path: str | os.PathLike) -> None:
    """Load only the reward adapter and score head from a folder written by `rlhf-fast rm` (its out_dir/model),
    leaving the policy and critic as they are. Refuses a folder whose reward adapter was never trained, or that
    was trained on another base (the base fingerprint differs)."""
    settings = read_settings(path)
    if "reward" not in settings.get("trained_roles", ["reward"]):
        raise ConfigError(f"{str(path)!r} holds no trained reward model (its reward adapter was never trained; "
                          "pass the out_dir/model folder written by `rlhf-fast rm`)")
    saved = settings.get("base_fingerprint")
    if saved is not None and saved != base_fingerprint(model):
        raise ConfigError(f"reward model {str(path)!r} was trained on another base than this model's "
                          f"(base fingerprint {saved} != {base_fingerprint(model)}); train it on --model "
                          f"{model.base_name_or_path}")
    load_adapters(model, path, roles=("reward",))


def load(cls, path: str | os.PathLike, base=None, *, dtype: torch.dtype | None = None,
         attn_implementation: str = "auto", trust_remote_code: bool = False, gradient_checkpointing: bool = False):
    """Rebuild a `cls` (RoleModel) from save()'s folder. The base comes from `base` (a folder or model object)
    when given, else from path/base when it was saved, else from the folder recorded at save time."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"RoleModel folder {str(path)!r} does not exist")
    settings = read_settings(path)
    if base is None:
        base = path / "base" if (path / "base" / "config.json").is_file() else settings.get("base_model")
    if base is None:
        raise ConfigError(f"{str(path)!r} holds no base model and records none: pass base=")
    model = cls.from_pretrained(base, lora=_lora_settings(settings["lora"], SETTINGS_FILE), dtype=dtype,
                                attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                                gradient_checkpointing=gradient_checkpointing)
    load_adapters(model, path)
    model.merged_into_base = settings.get("merged_into_base", 0)
    return model


def set_reward_offset(model, offset: float, member: int = 0) -> None:
    """Fold the reward normalisation offset into the score head's bias (of reward-ensemble member `member`): it
    is saved with the head, so every later score (PPO's included) is normalised without anyone having to
    remember it. The offsets are also recorded per member (settings "reward_ensemble" of an ensemble folder)."""
    with torch.no_grad():
        model.reward_head(member).bias.add_(offset)
    model.reward_offsets[member] += float(offset)


# ----------------------------------------------------------------------------------------------- tokenizers

def _tokenizer_class(path: str) -> str | None:
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            return json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def load_tokenizer(path: str):
    """The tokenizer of a local model folder or a .gguf file (pad = EOS when it has no pad token); ConfigError
    when there is none."""
    if not path:
        raise ConfigError("--model is required: a local transformers model folder")
    gguf_file = gguf.gguf_path(path)  # --- a .gguf file or "smollm2" (models/gguf.py) ---
    if gguf_file is not None:
        return gguf.load_gguf_tokenizer(gguf_file)  # --- end GGUF ---
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"model folder {path!r} is a file: --model takes a local transformers model folder")
    if not os.path.isdir(path):
        raise ConfigError(f"model folder {path!r} does not exist")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
        if _tokenizer_class(path) in ("TokenizersBackend", "PreTrainedTokenizerFast") and \
                type(tok).__name__ not in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            # transformers 5 picks the tokenizer class from config.json's model_type (e.g. Qwen2Tokenizer,
            # whose own pre-tokenizer drops the saved one); a folder that saved a plain tokenizers backend
            # must be read back as exactly that
            tok = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds here (OSError, ValueError, TypeError)
        raise ConfigError(f"model folder {path!r} has no usable tokenizer: {e}") from e
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok
