"""RoleModel: one frozen base serving the four PPO roles through PEFT LoRA adapters.

    policy     base + LoRA "policy"                   -> per-token log-probs, generation
    reference  base with every adapter off            -> per-token log-probs (the KL anchor)
    critic     base + LoRA "critic" + value head      -> per-token values
    reward     base + LoRA "reward" + score head      -> one score per sequence

There is exactly one copy of the base weights; only the adapters and the two Linear(H, 1) heads train.
Log-probs come from the backbone's final hidden state and the lm_head weight through
`rlhf_fast.ops.fused_linear_logprobs`: the (B, T, V) logits are never materialised.

Alignment of every per-token output (B, T): entry t belongs to token input_ids[:, t] and is computed from the
hidden state at t - 1. An entry is 0 unless both token t and token t - 1 are real (attention_mask 1): entry 0
is always 0, padded positions are 0, and so is the first real token of a left-padded row (it has no context).

Usage (one PPO step's model calls):

    model = RoleModel.from_pretrained("path/to/sft-or-base", lora=LoraSettings(r=16, alpha=32))
    model.merge_policy_into_base()          # only if SFT trained the policy adapter: reference := SFT model
    out = model.generate(prompt_ids, prompt_mask, max_new_tokens=128, temperature=0.7)
    exp = model.experience(out["sequences"], out["attention_mask"], temperature=0.7)
    f = model.policy_forward(out["sequences"], out["attention_mask"])
    loss, stats = ops.fused_linear_ppo_loss(f.hidden, f.weight, f.targets, exp["logprobs"], advantages,
                                            out["response_mask"] * f.mask, f.bias, temperature=0.7)
    model.save("ckpt")                      # adapters (PEFT format) + heads + settings; save_base=True for the base
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from rlhf_fast import ops
from rlhf_fast.errors import ConfigError
from rlhf_fast.models import generation, gguf, io, lean_lora, prefix_pass
from rlhf_fast.models.conventions import (
    ADAPTERS,
    IGNORE_INDEX,
    ROLES,
    LoraSettings,
    check_inputs,
    position_ids,
    reward_member_name,
    shift_right,
    token_mask,
)


@dataclass
class PolicyForward:
    """The policy's training forward, aligned with input_ids: feed it to `ops.fused_linear_ppo_loss`.

    hidden (B, T, H): hidden[:, t] is the final hidden state at t - 1 (row 0 is zeros), so that
    hidden[:, t] @ weight.T scores token input_ids[:, t]. targets (B, T) int64: input_ids with IGNORE_INDEX
    where the entry is not defined (see the module docstring). weight (V, H) and bias (V,) | None: the lm_head.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    mask: torch.Tensor = field(repr=False)


# ----------------------------------------------------------------------------------------------- helpers

def _linear_types() -> tuple[type, ...]:
    # GPT-2 style models use transformers' Conv1D (a transposed Linear); peft adapts it with fan_in_fan_out.
    return (nn.Linear, Conv1D)


def _decoder_blocks(backbone: nn.Module) -> nn.ModuleList:
    # The decoder blocks are the longest ModuleList in the backbone (model.layers, transformer.h, ...).
    lists = [m for m in backbone.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(backbone).__name__}: found no decoder blocks (no nn.ModuleList)")
    return max(lists, key=len)


def default_target_modules(lm: nn.Module) -> tuple[list[str], bool]:
    """Every linear layer inside the decoder blocks, as leaf names when they are unambiguous, else full names.

    Returns (names, fan_in_fan_out) where fan_in_fan_out is True when the targets are transformers Conv1D layers.
    """
    linear = _linear_types()
    blocks = _decoder_blocks(lm.base_model)
    inside = {id(m) for m in blocks.modules()}
    head = lm.get_output_embeddings()
    leaf_in, leaf_out, full, conv1d = set(), set(), [], False
    for name, mod in lm.named_modules():
        if not isinstance(mod, linear) or mod is head:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if id(mod) in inside:
            leaf_in.add(leaf)
            full.append(name)
            conv1d |= not isinstance(mod, nn.Linear)
        else:
            leaf_out.add(leaf)
    if not leaf_in:
        raise ValueError(f"{type(lm).__name__}: no linear layers inside the decoder blocks to adapt")
    names = sorted(leaf_in) if not (leaf_in & leaf_out) else full
    return names, conv1d


def _peft_config(lora: LoraSettings, default_targets: list[str], fan_in_fan_out: bool):
    targets = list(lora.target_modules) if lora.target_modules is not None else list(default_targets)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM")


def _resolve_attn(attn_implementation: str, dtype: torch.dtype | None) -> str:
    if attn_implementation != "auto":
        return attn_implementation
    if torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def _check_local_model_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (RoleModel loads local folders only)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"model path {str(path)!r} holds no transformers model (no config.json in it)")


class ModelLoadError(ConfigError):
    """A model folder whose weights do not load (truncated or corrupt safetensors, a config.json that does not
    match the weights, ...); a ConfigError, hence a ValueError: the trainers and the CLI report it in one line,
    after the folder's path (the message does not repeat it)."""


def _load_causal_lm(path: Path, attns: list[str], kwargs: dict):
    # Whatever transformers raises for a broken folder (SafetensorError, RuntimeError on a size mismatch, ...)
    # becomes one ModelLoadError line; OSError (no weights file, unreadable config.json) names the file itself.
    try:
        for attn in attns[:-1]:
            try:
                return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **kwargs)
            except (ValueError, ImportError):
                pass  # the architecture does not support this attention implementation: try the next
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attns[-1], **kwargs)
    except (ImportError, OSError):
        raise
    except ValueError as e:
        raise ModelLoadError(_first_line(e)) from e
    except SafetensorError as e:
        raise ModelLoadError(f"its safetensors weights are unreadable (truncated or corrupt?): {_first_line(e)}") from e
    except RuntimeError as e:
        if "mismatch" in str(e):
            raise ModelLoadError("its weights do not match its config.json (a tensor's shape differs from what the "
                                 "config's sizes, e.g. hidden_size or vocab_size, imply)") from e
        raise ModelLoadError(f"its weights do not load: {_first_line(e)}") from e
    except (KeyError, TypeError, AttributeError) as e:  # a config.json transformers cannot make sense of
        raise ModelLoadError(f"its config.json does not describe a loadable model ({type(e).__name__}: "
                             f"{_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


# ----------------------------------------------------------------------------------------------- the model

class RoleModel(nn.Module):
    """One frozen causal LM with LoRA adapters "policy", "critic", "reward" and value / score heads.

    Build with `RoleModel.from_pretrained(...)`; restore with `RoleModel.load(dir)`.

    The reference is the base with all adapters off. When SFT trained the policy adapter, call
    `merge_policy_into_base()` before PPO so the base (= the reference) becomes the SFT model and a fresh,
    zero-initialised policy adapter starts from it.
    """

    def __init__(self, peft_model, *, lora: LoraSettings, tokenizer=None, base_name_or_path: str | None = None,
                 default_targets: list[str] | None = None):
        super().__init__()
        self.peft = peft_model
        self.lora = lora
        # each adapter's own settings (a reward adapter loaded from an RM trained at another rank differs)
        self.adapter_lora = {name: lora for name in ADAPTERS}
        self.trained_roles: set[str] = set()  # recorded on save: a later stage refuses an untrained reward adapter
        self._default_targets = default_targets or list(peft_model.peft_config["policy"].target_modules)
        self.tokenizer = tokenizer
        self.base_name_or_path = base_name_or_path
        self.merged_into_base = 0
        # set when the base is sharded over processes (trainers.distributed.shard_base, FSDP2): n_local -> the most
        # rows still decoding on any process, so that generate() runs the same number of forwards everywhere
        self.lockstep = None
        h = self.lm_head.weight.shape[1]
        self.value_head = nn.Linear(h, 1, dtype=torch.float32, device=self.lm_head.weight.device)
        self.score_head = nn.Linear(h, 1, dtype=torch.float32, device=self.lm_head.weight.device)
        for head in (self.value_head, self.score_head):
            nn.init.normal_(head.weight, std=1.0 / math.sqrt(h + 1))
            nn.init.zeros_(head.bias)
        # reward-ensemble members 1..K-1: adapters "reward_1", ... and these score heads (set_reward_members);
        # member 0 is the "reward" adapter and score_head, so a single reward model is an ensemble of one
        self.member_heads = nn.ModuleList()
        self.reward_offsets = [0.0]  # the normalisation offset folded into each member's head bias (models/io.py)
        self.refresh_trainable()
        self._active = "policy"
        self.pad_token_id, self.eos_token_id = self._special_tokens()

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_or_path,
        *,
        lora: LoraSettings | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str = "auto",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        tokenizer=None,
    ) -> RoleModel:
        """Wrap a transformers causal LM (a local folder or a built model object) with the three adapters.

        Args:
            model_or_path: a local folder with config.json and safetensors weights, a .gguf file (or the
                shorthand "smollm2"; dequantised to fp32 by rlhf_fast.models.gguf), or a PreTrainedModel
                (used in place: its weights become the shared base, nothing is copied).
            lora: LoraSettings for all three adapters (default: r=16, alpha=32, every linear of the blocks).
            dtype: the base's dtype; None keeps the checkpoint's (or the object's). Adapters and heads stay fp32.
            attn_implementation: "auto" (flash_attention_2 when flash-attn imports, CUDA is present and dtype is
                16-bit; else sdpa), or any name transformers accepts ("sdpa", "eager", ...).
            trust_remote_code: allow a folder's own modelling code to run (off by default).
            gradient_checkpointing: recompute the blocks in the backward (non-reentrant) to save memory.
            tokenizer: optional; when None and the folder holds one, it is loaded (used for pad / eos ids).
        """
        lora = lora or LoraSettings()
        gguf_file = gguf.gguf_path(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
        if gguf_file is not None:  # --- a GGUF file (models/gguf.py) ---
            lm = gguf.load_gguf_model(gguf_file, dtype=dtype, attn_implementation=_resolve_attn(attn_implementation,
                                                                                                 dtype))
            if tokenizer is None:
                tokenizer = gguf.load_gguf_tokenizer(gguf_file, context_length=getattr(
                    lm.config, "max_position_embeddings", None))
            name = gguf_file  # --- end GGUF ---
        elif isinstance(model_or_path, (str, os.PathLike)):
            path = Path(model_or_path)
            _check_local_model_dir(path)
            kwargs = dict(dtype=dtype or "auto", trust_remote_code=trust_remote_code, use_safetensors=True)
            # "auto": the first of these the architecture supports
            tries = ([_resolve_attn("auto", dtype), "sdpa", "eager"] if attn_implementation == "auto"
                     else [attn_implementation])
            lm = _load_causal_lm(path, list(dict.fromkeys(tries)), kwargs)
            if tokenizer is None and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            name = str(path.resolve())
        elif isinstance(model_or_path, PreTrainedModel):
            lm = model_or_path
            if dtype is not None:
                lm.to(dtype)
            if attn_implementation != "auto":
                lm.set_attn_implementation(attn_implementation)
            name = getattr(lm.config, "_name_or_path", None) or None
        else:
            raise TypeError(f"model_or_path must be a folder path or a transformers PreTrainedModel, "
                            f"got {type(model_or_path).__name__}")
        if lm.get_output_embeddings() is None:
            raise ValueError(f"{type(lm).__name__} has no lm_head (get_output_embeddings() is None)")
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(lm.config, attr, None) not in (None, 1.0):
                raise NotImplementedError(f"{lm.config.model_type}: {attr} transforms the logits after the "
                                          "lm_head; the fused log-prob path does not support it yet")
        default_targets, fan_in_fan_out = default_target_modules(lm)
        lm.requires_grad_(False)
        cfg = _peft_config(lora, default_targets, fan_in_fan_out)
        peft_model = get_peft_model(lm, cfg, adapter_name="policy")
        for name_ in ADAPTERS[1:]:
            peft_model.add_adapter(name_, cfg)
        lean_lora.install(peft_model)
        model = cls(peft_model, lora=lora, tokenizer=tokenizer, base_name_or_path=name,
                    default_targets=default_targets)
        if gradient_checkpointing:
            # transformers >= 5 renamed it (the old name warns on every call); older releases have only the old one
            if hasattr(model.lm, "activation_checkpointing_enable"):
                model.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _special_tokens(self) -> tuple[int | None, int | None]:
        cfg, tok = self.lm.config, self.tokenizer
        gen = getattr(self.lm, "generation_config", None)
        eos = next((v for v in (getattr(tok, "eos_token_id", None), getattr(cfg, "eos_token_id", None),
                                getattr(gen, "eos_token_id", None)) if v is not None), None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        pad = next((v for v in (getattr(tok, "pad_token_id", None), getattr(cfg, "pad_token_id", None),
                                getattr(gen, "pad_token_id", None)) if v is not None), None)
        if pad is None and eos is not None:
            warnings.warn(f"the model has no pad token: using the EOS token ({eos}) as pad", stacklevel=3)
            pad = eos
        return pad, eos

    # -- modules -------------------------------------------------------------------------------------------

    @property
    def lm(self) -> nn.Module:
        """The transformers causal LM, with the LoRA layers injected."""
        return self.peft.base_model.model

    @property
    def backbone(self) -> nn.Module:
        """The decoder without its head (model.model, transformer, ...): returns the final hidden states."""
        return self.lm.base_model

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    @property
    def config(self):
        return self.lm.config

    def role_parameters(self, role: str) -> list[nn.Parameter]:
        """The parameters a role trains: its adapter, plus the value head (critic) or score head (reward)."""
        self._check_role(role)
        if role == "reference":
            return []
        head = {"critic": list(self.value_head.parameters()), "reward": list(self.score_head.parameters())}
        return self._adapter_parameters(role) + head.get(role, [])

    def _adapter_parameters(self, name: str) -> list[nn.Parameter]:
        # looked up each time, never cached: sharding (FSDP) or replace_adapter() swap the parameter objects
        return [p for n, p in self.peft.named_parameters() if f".{name}." in n and "lora_" in n]

    def refresh_trainable(self) -> None:
        """Every adapter trainable, the base frozen. peft's set_adapter flips requires_grad of the inactive
        adapters off; a policy graph recorded before a switch to the critic must still reach the policy adapter
        in the backward, so all stay trainable."""
        for name in self.adapter_names:
            for p in self._adapter_parameters(name):
                p.requires_grad_(True)

    @torch.no_grad()
    def replace_adapter(self, name: str, lora: LoraSettings) -> None:
        """Re-create adapter `name` with other LoRA settings (a zero update, B = 0): e.g. before loading a reward
        adapter that was trained at another rank. Optimisers holding the old parameters must be rebuilt."""
        if name not in self.adapter_names:
            raise ValueError(f"unknown adapter {name!r}; adapters are {', '.join(self.adapter_names)}")
        fan_in_fan_out = bool(self.peft.peft_config[name].fan_in_fan_out)
        device = self.lm_head.weight.device
        if self._active == name:
            other = next(a for a in self.adapter_names if a != name)
            self.peft.base_model.set_adapter(other)
            self._active = other
        self.peft.delete_adapter(name)
        self.peft.add_adapter(name, _peft_config(lora, self._default_targets, fan_in_fan_out))
        self.peft.to(device)
        self.adapter_lora[name] = lora
        self.refresh_trainable()

    # -- reward ensemble ---------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Every adapter on the base: policy, critic, reward, then the reward members reward_1 ... reward_{K-1}."""
        return ADAPTERS + tuple(reward_member_name(k) for k in range(1, self.reward_members))

    @property
    def reward_members(self) -> int:
        """K, the reward models on this base: 1 (the "reward" adapter) plus the extra ensemble members."""
        return 1 + len(getattr(self, "member_heads", ()))

    def reward_head(self, k: int = 0) -> nn.Linear:
        """Member k's score head: score_head for k = 0, else member_heads[k - 1]."""
        if not 0 <= k < self.reward_members:
            raise ValueError(f"reward member {k} does not exist; this model has {self.reward_members}")
        return self.score_head if k == 0 else self.member_heads[k - 1]

    def member_parameters(self, k: int) -> list[nn.Parameter]:
        """What reward member k trains: its adapter and its score head (k = 0: role_parameters("reward"))."""
        return self._adapter_parameters(reward_member_name(k)) + list(self.reward_head(k).parameters())

    @torch.no_grad()
    def set_reward_members(self, k: int) -> None:
        """Grow (or shrink) the reward ensemble to k members on the same base: member j >= 1 is a new LoRA adapter
        "reward_j" (the reward adapter's LoRA settings, B = 0) and a new score head. Only k - 1 small adapters and
        heads are added, never a copy of the base. Optimisers holding the old parameters must be rebuilt."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"a reward ensemble needs an integer number of members >= 1, got {k!r}")
        lora, device = self.adapter_lora["reward"], self.lm_head.weight.device
        fan_in_fan_out = bool(self.peft.peft_config["reward"].fan_in_fan_out)
        h = self.lm_head.weight.shape[1]
        while self.reward_members > k:
            name = reward_member_name(self.reward_members - 1)
            if self._active == name:
                self.peft.base_model.set_adapter("reward")
                self._active = "reward"
            self.peft.delete_adapter(name)
            del self.member_heads[-1], self.adapter_lora[name]
        while self.reward_members < k:
            name = reward_member_name(self.reward_members)
            self.peft.add_adapter(name, _peft_config(lora, self._default_targets, fan_in_fan_out))
            self.adapter_lora[name] = lora
            head = nn.Linear(h, 1, dtype=torch.float32, device=device)
            nn.init.normal_(head.weight, std=1.0 / math.sqrt(h + 1))
            nn.init.zeros_(head.bias)
            self.member_heads.append(head)
        self.reward_offsets = (list(self.reward_offsets) + [0.0] * k)[:k]
        self.peft.to(device)
        self.refresh_trainable()

    @torch.no_grad()
    def reset_reward_member(self, k: int, seed: int) -> None:
        """Re-initialise member k from its own seed (LoRA A random, B = 0, a fresh score head), leaving the global
        random state as it was: the members of an ensemble start from different points."""
        name, head = reward_member_name(k), self.reward_head(k)
        device = self.lm_head.weight.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for module in self.peft.modules():
                if isinstance(module, LoraLayer) and name in module.lora_A:
                    module.reset_lora_parameters(name, True)
            nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.weight.shape[1] + 1))
            nn.init.zeros_(head.bias)

    @contextlib.contextmanager
    def reward_member(self, k: int):
        """Context in which the LM runs as reward member k (k = 0 is role("reward"))."""
        name = reward_member_name(k)
        self.reward_head(k)  # checks that it exists
        if self._active != name:
            self.peft.base_model.set_adapter(name)
            self.refresh_trainable()
            self._active = name
        yield

    # -- roles -------------------------------------------------------------------------------------------

    @staticmethod
    def _check_role(role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")

    @contextlib.contextmanager
    def role(self, role: str):
        """Context in which the LM runs as `role` (the adapter on, or all adapters off for the reference)."""
        self._check_role(role)
        if role == "reference":
            try:
                with self.peft.disable_adapter():
                    yield
            finally:
                self.refresh_trainable()  # peft's re-enable leaves only the active adapter trainable
            return
        if self._active != role:
            self.peft.base_model.set_adapter(role)
            self.refresh_trainable()
            self._active = role
        yield

    @contextlib.contextmanager
    def _eval(self):
        was = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was)

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, shared_prefix: int = 0,
                prefix_outputs: bool = True) -> torch.Tensor:
        # (B, T, H) final hidden states (after the final norm); shared_prefix, prefix_outputs: see policy_forward
        if not isinstance(shared_prefix, int) or isinstance(shared_prefix, bool) or shared_prefix < 0:
            raise ValueError(f"shared_prefix must be an integer >= 0, got {shared_prefix!r}")
        if 0 < shared_prefix < input_ids.shape[1]:
            hidden = self._hidden_shared_prefix(input_ids, attention_mask, shared_prefix, prefix_outputs)
            if hidden is not None:
                return hidden
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask), use_cache=False)
        return out[0]

    def _hidden_shared_prefix(self, input_ids, attention_mask, p: int, prefix_outputs: bool = True
                              ) -> torch.Tensor | None:
        """_hidden with the first p columns run once per distinct (ids, mask) prefix, or None when no row shares
        one or the backbone's cache is not transformers' plain DynamicCache (the caller then runs the plain pass).

        Two backbone passes: the U distinct prefixes (U, p) with use_cache=True, then every row's remaining
        columns (B, T - p) attending to its prefix's keys and values (the cache rows gathered by `owner`). By
        causality a prefix's hidden states, keys and values do not depend on what follows it, so this is the
        plain forward's arithmetic on fewer rows; gradients reach the prefix pass through the gathered cache.
        prefix_outputs False: the prefix pass runs its last layer in full at its last column only (prefix_pass.py);
        the hidden states of the columns before it come back as zeros."""
        if self.lockstep is not None:
            return None  # a sharded base (FSDP2): every process must run the same forwards, whatever its rows
        if self.training and torch.is_grad_enabled() and self._checkpointing():
            return None  # transformers turns the cache off in checkpointed training-mode layers
        mask = attention_mask.long()
        key = torch.cat([input_ids[:, :p], mask[:, :p]], 1)  # (B, 2p)
        uniq, owner = torch.unique(key, dim=0, return_inverse=True)  # (U, 2p), (B,)
        if uniq.shape[0] == key.shape[0]:
            return None
        # positions count the mask's ones from column 0, so a prefix's are its own and the rest continue them
        light = prefix_pass.last_layer_at_last_column(self.lm) if not prefix_outputs and prefix_pass.supported(
            self.lm) else contextlib.nullcontext()
        with light:
            first = self.backbone(input_ids=uniq[:, :p], attention_mask=uniq[:, p:],
                                  position_ids=position_ids(uniq[:, p:]), use_cache=True)
        cache = generation._cache_of(first)
        if generation.plain_layers(cache) is None:
            return None
        cache.batch_select_indices(owner)  # (U, ...) -> (B, ...), differentiable gathers
        rest = self.backbone(input_ids=input_ids[:, p:], attention_mask=mask, position_ids=position_ids(mask)[:, p:],
                             **{generation.cache_kwarg(self.backbone): cache}, use_cache=True)
        return torch.cat([first[0][owner], rest[0]], 1)

    def _checkpointing(self) -> bool:
        # transformers >= 5 renamed is_gradient_checkpointing (the old name warns); older releases have only it
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
            try:
                return bool(getattr(self.lm, name))
            except AttributeError:
                continue
        return False

    def _logprobs_from_hidden(self, hidden, input_ids, attention_mask, temperature=1.0, return_entropy=False,
                              start=1):
        # Columns start.. of the (B, T) log-probs (those before are 0): the lm head runs on T - start positions.
        valid = token_mask(attention_mask)
        b, t = input_ids.shape
        start = max(1, start)  # column 0 has no predecessor
        if t <= start:
            zeros = hidden.new_zeros((b, t), dtype=torch.float32)
            return (zeros, zeros.clone()) if return_entropy else zeros
        targets = input_ids[:, start:].long().masked_fill(~valid[:, start:], IGNORE_INDEX)  # (B, T - start)
        head = self.lm_head
        out = ops.fused_linear_logprobs(hidden[:, start - 1:-1], head.weight, targets, getattr(head, "bias", None),
                                        temperature=temperature, ignore_index=IGNORE_INDEX,
                                        return_entropy=return_entropy)
        if return_entropy:
            lp, ent = out
            return F.pad(lp, (start, 0)), F.pad(ent * valid[:, start:], (start, 0))
        return F.pad(out, (start, 0))

    # -- per-role outputs ----------------------------------------------------------------------------------

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, role: str = "policy", *,
                 temperature: float = 1.0, return_entropy: bool = False, start: int = 0,
                 shared_prefix: int = 0):
        """Log-probability of each token under the policy or the reference.

        Args:
            input_ids: (B, T) int64 token ids (left or right padding).
            attention_mask: (B, T) 0/1, 1 on real tokens.
            role: "policy" or "reference".
            temperature: the logits are divided by it (use the sampling temperature in PPO).
            return_entropy: also return the entropy -sum p log p of each predictive distribution.
            start: columns before it are returned as 0 and skip the lm head (e.g. the prompt's, when only the
                responses are scored).
            shared_prefix: rows whose first shared_prefix columns are identical run them once (policy_forward).
        Returns:
            (B, T) fp32: logprobs[:, t] = log softmax(h[:, t-1] @ W_head.T / temperature)[input_ids[:, t]], 0 where
            undefined (column 0, padding) and before `start`; with return_entropy a pair (logprobs, entropy).
            Runs with gradients when grad mode is on (only the policy adapter receives them).
        """
        check_inputs(input_ids, attention_mask)
        if role not in ("policy", "reference"):
            self._check_role(role)
            raise ValueError(f"logprobs() needs role 'policy' or 'reference', got {role!r}")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ValueError(f"start must be an integer >= 0, got {start!r}")
        with self.role(role):  # the columns scored from `start` on read the prefix's hidden states at its end only
            hidden = self._hidden(input_ids, attention_mask, shared_prefix, prefix_outputs=start < shared_prefix)
        return self._logprobs_from_hidden(hidden, input_ids, attention_mask, temperature, return_entropy,
                                          start=start)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The critic's value of the state before each token: (B, T) fp32, values[:, t] = v(h_critic[:, t-1]).

        0 where undefined (column 0, padding). With grad mode on this is the critic's training forward
        (gradients reach only the critic adapter and the value head).
        """
        check_inputs(input_ids, attention_mask)
        with self.role("critic"):
            hidden = self._hidden(input_ids, attention_mask)
        return self._values_from_hidden(hidden, attention_mask)

    def _values_from_hidden(self, hidden, attention_mask):
        v = self.value_head(hidden[:, :-1].float()).squeeze(-1)  # (B, T-1)
        return F.pad(v, (1, 0)) * token_mask(attention_mask)

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, member: int = 0) -> torch.Tensor:
        """The reward model's score of each sequence: (B,) fp32, the score head on the last real token's hidden.

        A row without any real token scores 0. With grad mode on this is the reward model's training forward.
        member: which reward-ensemble member scores (0, the "reward" adapter, unless set_reward_members added more).
        """
        check_inputs(input_ids, attention_mask)
        with self.reward_member(member):
            hidden = self._hidden(input_ids, attention_mask)
        return self._scores_from_hidden(hidden, attention_mask, self.reward_head(member))

    def ensemble_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Every reward member's score of each sequence: (K, B) fp32, row k = scores(..., member=k).

        One backbone forward of the B rows per member, one after the other (as experience()'s sequential mode:
        peft's per-row adapter routing in one K*B-row forward ran slower on the CPU and needs K times the
        activations). The members share the frozen base: only their adapters and heads differ.
        """
        check_inputs(input_ids, attention_mask)
        return torch.stack([self.scores(input_ids, attention_mask, k) for k in range(self.reward_members)])

    def _scores_from_hidden(self, hidden, attention_mask, head: nn.Module | None = None):
        m = attention_mask.bool()
        t = m.shape[1]
        last = (t - 1) - m.flip(1).long().argmax(1)  # (B,) index of the last real token
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return (self.score_head if head is None else head)(h_last.float()).squeeze(-1) * m.any(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, role: str = "policy"):
        """The role's natural output: log-probs (policy, reference), values (critic) or scores (reward)."""
        self._check_role(role)
        if role == "critic":
            return self.values(input_ids, attention_mask)
        if role == "reward":
            return self.scores(input_ids, attention_mask)
        return self.logprobs(input_ids, attention_mask, role)

    def policy_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                       shared_prefix: int = 0, prefix_outputs: bool = True) -> PolicyForward:
        """The policy's training forward for `ops.fused_linear_ppo_loss` (or the SFT loss): hidden states aligned
        with input_ids, the lm_head weight and bias, and targets. No logits are computed.

        shared_prefix: P >= 0. Rows whose first P columns are identical (ids and mask: GRPO's G samples of one
        prompt, DPO's chosen and rejected) run those columns through the backbone once: a pass over the U
        distinct prefixes (U, P) keeps their keys and values, then each row's columns P.. (B, T - P) attend to
        its prefix's. The result is the plain forward's up to float rounding (causal attention: a prefix does
        not see what follows it), gradients included, for (U P + B (T - P)) / (B T) of the backbone's tokens.
        0 (the default), P >= T, no two rows alike, a cache other than transformers' DynamicCache,
        training-mode gradient checkpointing (which turns the cache off) or a base sharded over processes (FSDP2:
        every process must run the same forwards): the plain single pass.
        prefix_outputs: False when only the columns from P on are scored (hidden[:, P:], the first of which is the
        prefix's last state): with a shared prefix, the prefix pass then runs its last decoder layer in full at its
        last column only (keys and values at every column: models/prefix_pass.py, Llama-family classes), and
        hidden[:, 1:P] are zeros instead of the prefix's states.

        Usage: f = model.policy_forward(ids, mask); loss, stats = ops.fused_linear_ppo_loss(f.hidden, f.weight,
        f.targets, old_logprobs, advantages, response_mask * f.mask, f.bias, ...)
        """
        check_inputs(input_ids, attention_mask)
        with self.role("policy"):
            hidden = self._hidden(input_ids, attention_mask, shared_prefix, prefix_outputs)
        valid = token_mask(attention_mask)
        head = self.lm_head
        return PolicyForward(hidden=shift_right(hidden), weight=head.weight, bias=getattr(head, "bias", None),
                             targets=input_ids.long().masked_fill(~valid, IGNORE_INDEX), mask=valid)

    # -- experience ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def experience(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, temperature: float = 1.0,
                   mode: str = "sequential", start: int = 0,
                   policy_logprobs: torch.Tensor | None = None, critic: bool = True) -> dict[str, torch.Tensor]:
        """The PPO experience step for all four roles, without gradients, in eval mode.

        Returns {"logprobs": (B, T), "ref_logprobs": (B, T), "values": (B, T), "scores": (B,)}, fp32, equal to
        logprobs(role="policy"), logprobs(role="reference"), values() and scores(); with start > 0 the two
        log-probs only from column `start` on (0 before it: the lm head skips those positions; PPO passes the
        first response column, as the prompt's tokens carry no loss and no KL).
        policy_logprobs: (B, T) the policy's log-probs already at hand (the rollout's, generate(return_logprobs=
        True)): returned as "logprobs" and the policy forward is skipped (sequential mode only).
        critic=False: no critic forward, "values" is None (PPO with one minibatch takes the old values from its
        first update's critic forward instead, trainers/ppo.py).
        mode: "sequential" (four forwards over the shared base, one after the other) or "mixed" (one forward of
        4B rows with peft's per-row adapter_names, "__base__" for the reference). Sequential is the default:
        mixed ran at 0.83-0.99x its speed on the CPU (bench/results/cpu-role-model-2026-11-22.md; peft
        gathers and scatters each adapter's rows in every layer) and needs 4x the activation memory.
        """
        check_inputs(input_ids, attention_mask)
        if mode not in ("sequential", "mixed"):
            raise ValueError(f"mode must be 'sequential' or 'mixed', got {mode!r}")
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an integer >= 0, got {start!r}")
        if policy_logprobs is not None and (mode != "sequential" or policy_logprobs.shape != input_ids.shape):
            raise ValueError(f"policy_logprobs needs mode 'sequential' and the shape of input_ids "
                             f"{tuple(input_ids.shape)}, got {mode!r} and {tuple(policy_logprobs.shape)}")
        with self._eval():
            if mode == "sequential":
                if policy_logprobs is not None:
                    lp = policy_logprobs.float()
                else:
                    with self.role("policy"):
                        h = self._hidden(input_ids, attention_mask)
                    lp = self._logprobs_from_hidden(h, input_ids, attention_mask, temperature, start=start)
                with self.role("reference"):
                    h = self._hidden(input_ids, attention_mask)
                ref = self._logprobs_from_hidden(h, input_ids, attention_mask, temperature, start=start)
                values = None
                if critic:
                    with self.role("critic"):
                        h = self._hidden(input_ids, attention_mask)
                    values = self._values_from_hidden(h, attention_mask)
                with self.role("reward"):
                    h = self._hidden(input_ids, attention_mask)
                scores = self._scores_from_hidden(h, attention_mask)
            else:
                b = input_ids.shape[0]
                roles = ["policy", "__base__"] + (["critic"] if critic else []) + ["reward"]
                names = [r for r in roles for _ in range(b)]
                ids, mask = input_ids.repeat(len(roles), 1), attention_mask.repeat(len(roles), 1)
                # peft's own per-row adapter routing (what PeftModel.forward(adapter_names=...) uses), applied
                # around the backbone so the lm_head is never run.
                with self.peft.base_model._enable_peft_forward_hooks(adapter_names=names):
                    h = dict(zip(roles, self._hidden(ids, mask).split(b)))
                lp = self._logprobs_from_hidden(h["policy"], input_ids, attention_mask, temperature, start=start)
                ref = self._logprobs_from_hidden(h["__base__"], input_ids, attention_mask, temperature, start=start)
                values = self._values_from_hidden(h["critic"], attention_mask) if critic else None
                scores = self._scores_from_hidden(h["reward"], attention_mask)
        return {"logprobs": lp, "ref_logprobs": ref, "values": values, "scores": scores}

    # -- generation, save / load (models/generation.py, models/io.py) -----------------------------------------

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        """Sample responses from the policy with a KV cache; see rlhf_fast.models.generation.generate for the
        arguments (max_new_tokens, temperature, top_p, top_k, eos_token_id, pad_token_id, generator, merge)."""
        return generation.generate(self, prompt_ids, prompt_mask, **kwargs)

    def _merged(self, adapter: str, merge: bool):
        return generation.merged(self, adapter, merge)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's own state dict (LoRA layers stripped, names as in the plain transformers model)."""
        return io.base_state_dict(self)

    def save(self, path: str | os.PathLike, *, save_base: bool = False, gathered: dict | None = None) -> Path:
        """Write adapters (PEFT format), heads and settings to `path` atomically; save_base=True adds path/base
        (transformers format + tokenizer). See rlhf_fast.models.io for the layout (and `gathered`, for a base
        sharded by FSDP2)."""
        return io.save(self, path, save_base=save_base, gathered=gathered)

    def load_adapters(self, path: str | os.PathLike) -> None:
        """Load the adapters and heads written by save() into this model."""
        io.load_adapters(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, base=None, **kwargs) -> RoleModel:
        """Rebuild a RoleModel from save()'s folder (kwargs: dtype, attn_implementation, trust_remote_code,
        gradient_checkpointing). The base comes from `base` when given, else path/base, else the recorded one."""
        return io.load(cls, path, base, **kwargs)

    # -- SFT -> reference -----------------------------------------------------------------------------------

    @torch.no_grad()
    def merge_policy_into_base(self) -> None:
        """Fold the policy adapter into the base weights for good, then re-initialise a fresh policy adapter
        (B = 0, so the policy equals the new base).

        Use after SFT trained the policy adapter: the reference ("adapters off") becomes the SFT model, which is
        the anchor PPO's KL penalty needs (Ouyang et al. 2022). The critic and reward adapters are kept as they
        are (train the reward model after this call). Irreversible in place; save(save_base=True) to keep it.
        """
        from torch.distributed.tensor import DTensor, distribute_tensor

        for module in self.peft.modules():
            if isinstance(module, LoraLayer) and "policy" in module.lora_A:
                base = module.get_base_layer()
                delta = module.get_delta_weight("policy").to(base.weight.dtype)
                if isinstance(base.weight, DTensor):  # sharded by FSDP2: each process adds its own rows
                    delta = distribute_tensor(delta, base.weight.device_mesh, base.weight.placements,
                                              src_data_rank=None)  # the same delta everywhere: sliced locally
                base.weight.add_(delta)
                module.reset_lora_parameters("policy", True)
        self.merged_into_base += 1
