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
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROLES = ("policy", "reference", "critic", "reward")
ADAPTERS = ("policy", "critic", "reward")
IGNORE_INDEX = -100
SETTINGS_FILE = "role_model.json"
HEADS_FILE = "heads.safetensors"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters shared by the three adapters (Hu et al. 2021: W + (alpha / r) * B @ A)."""

    r: int = 16
    """Rank of each adapter."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapter input (training mode only)."""
    target_modules: list[str] | None = None
    """Module names to adapt; None: every linear layer inside the decoder blocks (not the embeddings or lm_head)."""

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


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
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return (nn.Linear,)
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


def check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Shapes and dtypes at the public boundary: input_ids (B, T) integer, attention_mask (B, T), B, T >= 1."""
    if not isinstance(input_ids, torch.Tensor) or not isinstance(attention_mask, torch.Tensor):
        raise TypeError("input_ids and attention_mask must be torch.Tensor")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"empty batch: input_ids has shape {tuple(input_ids.shape)}")


def token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where token t and its predecessor t - 1 are both real; column 0 is False."""
    m = attention_mask.bool()
    out = torch.zeros_like(m)
    out[:, 1:] = m[:, 1:] & m[:, :-1]
    return out


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Positions count real tokens only, so left-padded rows score as if unpadded (as transformers' generate does).
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def _shift_right(x: torch.Tensor) -> torch.Tensor:
    # (B, T, ...) -> (B, T, ...) with x[:, t] moved to t + 1 and zeros at 0.
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


# ----------------------------------------------------------------------------------------------- the model

class RoleModel(nn.Module):
    """One frozen causal LM with LoRA adapters "policy", "critic", "reward" and value / score heads.

    Build with `RoleModel.from_pretrained(...)`; restore with `RoleModel.load(dir)`.

    The reference is the base with all adapters off. When SFT trained the policy adapter, call
    `merge_policy_into_base()` before PPO so the base (= the reference) becomes the SFT model and a fresh,
    zero-initialised policy adapter starts from it.
    """

    def __init__(self, peft_model, *, lora: LoraSettings, tokenizer=None, base_name_or_path: str | None = None):
        super().__init__()
        self.peft = peft_model
        self.lora = lora
        self.tokenizer = tokenizer
        self.base_name_or_path = base_name_or_path
        self.merged_into_base = 0
        h = self.lm_head.weight.shape[1]
        self.value_head = nn.Linear(h, 1, dtype=torch.float32, device=self.lm_head.weight.device)
        self.score_head = nn.Linear(h, 1, dtype=torch.float32, device=self.lm_head.weight.device)
        for head in (self.value_head, self.score_head):
            nn.init.normal_(head.weight, std=1.0 / math.sqrt(h + 1))
            nn.init.zeros_(head.bias)
        self._adapter_params = {
            name: [p for n, p in self.peft.named_parameters() if f".{name}." in n and "lora_" in n]
            for name in ADAPTERS
        }
        self._set_trainable()
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
            model_or_path: a local folder with config.json and safetensors weights, or a PreTrainedModel
                (used in place: its weights become the shared base, nothing is copied).
            lora: LoraSettings for all three adapters (default: r=16, alpha=32, every linear of the blocks).
            dtype: the base's dtype; None keeps the checkpoint's (or the object's). Adapters and heads stay fp32.
            attn_implementation: "auto" (flash_attention_2 when flash-attn imports, CUDA is present and dtype is
                16-bit; else sdpa), or any name transformers accepts ("sdpa", "eager", ...).
            trust_remote_code: allow a folder's own modelling code to run (off by default).
            gradient_checkpointing: recompute the blocks in the backward (non-reentrant) to save memory.
            tokenizer: optional; when None and the folder holds one, it is loaded (used for pad / eos ids).
        """
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

        lora = lora or LoraSettings()
        if isinstance(model_or_path, (str, os.PathLike)):
            path = Path(model_or_path)
            _check_local_model_dir(path)
            kwargs = dict(dtype=dtype or "auto", trust_remote_code=trust_remote_code, use_safetensors=True)
            # "auto": the first of these the architecture supports
            tries = ([_resolve_attn("auto", dtype), "sdpa", "eager"] if attn_implementation == "auto"
                     else [attn_implementation])
            for i, attn in enumerate(dict.fromkeys(tries)):
                try:
                    lm = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **kwargs)
                    break
                except (ValueError, ImportError):
                    if i == len(dict.fromkeys(tries)) - 1:
                        raise
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
        targets, fan_in_fan_out = default_target_modules(lm)
        if lora.target_modules is not None:
            targets = list(lora.target_modules)
        lm.requires_grad_(False)
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                         fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM")
        peft_model = get_peft_model(lm, cfg, adapter_name="policy")
        for name_ in ADAPTERS[1:]:
            peft_model.add_adapter(name_, cfg)
        model = cls(peft_model, lora=lora, tokenizer=tokenizer, base_name_or_path=name)
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
        return list(self._adapter_params[role]) + head.get(role, [])

    def _set_trainable(self) -> None:
        # peft's set_adapter flips requires_grad of the inactive adapters off; a policy graph recorded before a
        # switch to the critic must still reach the policy adapter in the backward, so all stay trainable.
        for params in self._adapter_params.values():
            for p in params:
                p.requires_grad_(True)

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
                self._set_trainable()  # peft's re-enable leaves only the active adapter trainable
            return
        if self._active != role:
            self.peft.base_model.set_adapter(role)
            self._set_trainable()
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

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask), use_cache=False)
        return out[0]  # (B, T, H) final hidden states (after the final norm)

    def _logprobs_from_hidden(self, hidden, input_ids, attention_mask, temperature=1.0, return_entropy=False):
        from rlhf_fast import ops

        valid = token_mask(attention_mask)
        b, t = input_ids.shape
        if t == 1:
            zeros = hidden.new_zeros((b, t), dtype=torch.float32)
            return (zeros, zeros.clone()) if return_entropy else zeros
        targets = input_ids[:, 1:].long().masked_fill(~valid[:, 1:], IGNORE_INDEX)  # (B, T-1)
        head = self.lm_head
        out = ops.fused_linear_logprobs(hidden[:, :-1], head.weight, targets, getattr(head, "bias", None),
                                        temperature=temperature, ignore_index=IGNORE_INDEX,
                                        return_entropy=return_entropy)
        if return_entropy:
            lp, ent = out
            return F.pad(lp, (1, 0)), F.pad(ent * valid[:, 1:], (1, 0))
        return F.pad(out, (1, 0))

    # -- per-role outputs ----------------------------------------------------------------------------------

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, role: str = "policy", *,
                 temperature: float = 1.0, return_entropy: bool = False):
        """Log-probability of each token under the policy or the reference.

        Args:
            input_ids: (B, T) int64 token ids (left or right padding).
            attention_mask: (B, T) 0/1, 1 on real tokens.
            role: "policy" or "reference".
            temperature: the logits are divided by it (use the sampling temperature in PPO).
            return_entropy: also return the entropy -sum p log p of each predictive distribution.
        Returns:
            (B, T) fp32: logprobs[:, t] = log softmax(h[:, t-1] @ W_head.T / temperature)[input_ids[:, t]], 0 where
            undefined (column 0, padding); with return_entropy a pair (logprobs, entropy).
            Runs with gradients when grad mode is on (only the policy adapter receives them).
        """
        check_inputs(input_ids, attention_mask)
        if role not in ("policy", "reference"):
            self._check_role(role)
            raise ValueError(f"logprobs() needs role 'policy' or 'reference', got {role!r}")
        with self.role(role):
            hidden = self._hidden(input_ids, attention_mask)
        return self._logprobs_from_hidden(hidden, input_ids, attention_mask, temperature, return_entropy)

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

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reward model's score of each sequence: (B,) fp32, the score head on the last real token's hidden.

        A row without any real token scores 0. With grad mode on this is the reward model's training forward.
        """
        check_inputs(input_ids, attention_mask)
        with self.role("reward"):
            hidden = self._hidden(input_ids, attention_mask)
        return self._scores_from_hidden(hidden, attention_mask)

    def _scores_from_hidden(self, hidden, attention_mask):
        m = attention_mask.bool()
        t = m.shape[1]
        last = (t - 1) - m.flip(1).long().argmax(1)  # (B,) index of the last real token
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.score_head(h_last.float()).squeeze(-1) * m.any(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, role: str = "policy"):
        """The role's natural output: log-probs (policy, reference), values (critic) or scores (reward)."""
        self._check_role(role)
        if role == "critic":
            return self.values(input_ids, attention_mask)
        if role == "reward":
            return self.scores(input_ids, attention_mask)
        return self.logprobs(input_ids, attention_mask, role)

    def policy_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PolicyForward:
        """The policy's training forward for `ops.fused_linear_ppo_loss` (or the SFT loss): hidden states aligned
        with input_ids, the lm_head weight and bias, and targets. No logits are computed.

        Usage: f = model.policy_forward(ids, mask); loss, stats = ops.fused_linear_ppo_loss(f.hidden, f.weight,
        f.targets, old_logprobs, advantages, response_mask * f.mask, f.bias, ...)
        """
        check_inputs(input_ids, attention_mask)
        with self.role("policy"):
            hidden = self._hidden(input_ids, attention_mask)
        valid = token_mask(attention_mask)
        head = self.lm_head
        return PolicyForward(hidden=_shift_right(hidden), weight=head.weight, bias=getattr(head, "bias", None),
                             targets=input_ids.long().masked_fill(~valid, IGNORE_INDEX), mask=valid)

    # -- experience ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def experience(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, temperature: float = 1.0,
                   mode: str = "sequential") -> dict[str, torch.Tensor]:
        """The PPO experience step for all four roles, without gradients, in eval mode.

        Returns {"logprobs": (B, T), "ref_logprobs": (B, T), "values": (B, T), "scores": (B,)}, fp32, equal to
        logprobs(role="policy"), logprobs(role="reference"), values() and scores().
        mode: "sequential" (four forwards over the shared base, one after the other) or "mixed" (one forward of
        4B rows with peft's per-row adapter_names, "__base__" for the reference). Sequential is the default:
        mixed ran at 0.83-0.99x its speed on the CPU (bench/results/cpu-role-model-2026-11-22.md; peft
        gathers and scatters each adapter's rows in every layer) and needs 4x the activation memory.
        """
        check_inputs(input_ids, attention_mask)
        if mode not in ("sequential", "mixed"):
            raise ValueError(f"mode must be 'sequential' or 'mixed', got {mode!r}")
        with self._eval():
            if mode == "sequential":
                with self.role("policy"):
                    h = self._hidden(input_ids, attention_mask)
                lp = self._logprobs_from_hidden(h, input_ids, attention_mask, temperature)
                with self.role("reference"):
                    h = self._hidden(input_ids, attention_mask)
                ref = self._logprobs_from_hidden(h, input_ids, attention_mask, temperature)
                with self.role("critic"):
                    h = self._hidden(input_ids, attention_mask)
                values = self._values_from_hidden(h, attention_mask)
                with self.role("reward"):
                    h = self._hidden(input_ids, attention_mask)
                scores = self._scores_from_hidden(h, attention_mask)
            else:
                b = input_ids.shape[0]
                names = ["policy"] * b + ["__base__"] * b + ["critic"] * b + ["reward"] * b
                ids4, mask4 = input_ids.repeat(4, 1), attention_mask.repeat(4, 1)
                # peft's own per-row adapter routing (what PeftModel.forward(adapter_names=...) uses), applied
                # around the backbone so the lm_head is never run.
                with self.peft.base_model._enable_peft_forward_hooks(adapter_names=names):
                    h = self._hidden(ids4, mask4)
                hp, hr, hc, hs = h.split(b)
                lp = self._logprobs_from_hidden(hp, input_ids, attention_mask, temperature)
                ref = self._logprobs_from_hidden(hr, input_ids, attention_mask, temperature)
                values = self._values_from_hidden(hc, attention_mask)
                scores = self._scores_from_hidden(hs, attention_mask)
        return {"logprobs": lp, "ref_logprobs": ref, "values": values, "scores": scores}

    # -- generation --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, merge: bool = True) -> dict[str, torch.Tensor]:
        """Sample responses from the policy with a KV cache.

        Args:
            prompt_ids: (B, P) int64 prompts, left-padded (right padding also works: positions follow the mask).
            prompt_mask: (B, P) 0/1, 1 on prompt tokens; every row needs at least one.
            max_new_tokens: response length limit R.
            temperature: logits / temperature before sampling; 0 means greedy.
            top_p: nucleus sampling, keep the smallest set of tokens with probability >= top_p (1 = off).
            top_k: keep the k most likely tokens (0 = off).
            eos_token_id: stop token(s) of a row; default the model's EOS.
            pad_token_id: fills each row after its EOS; default the model's pad (or EOS).
            generator: a torch.Generator for reproducible sampling.
            merge: fold the policy LoRA into the base weights for the rollout and restore them bit for bit
                after (default), instead of running the adapter live: 1.1-1.2x the new tokens/s on the CPU
                (bench/results/cpu-role-model-2026-11-22.md). With a 16-bit base the merged weights are rounded
                to that dtype, so sampling differs from the live policy by that rounding; merge=False samples
                from exactly the policy that logprobs() scores.
        Returns:
            {"sequences": (B, P + R'), "attention_mask": (B, P + R'), "response_mask": (B, P + R')} with R' <= R
            (generation stops early when every row has finished); response_mask is 1 on generated tokens up to
            and including the first EOS, attention_mask = prompt_mask followed by the response mask.
        """
        check_inputs(prompt_ids, prompt_mask)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
        if not bool(prompt_mask.bool().any(1).all()):
            raise ValueError("every prompt needs at least one real token (a row of prompt_mask is all zeros)")
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        if pad is None:
            pad = eos_ids[0] if eos_ids else 0
        device = prompt_ids.device
        b = prompt_ids.shape[0]
        eos_t = torch.tensor(eos_ids, device=device, dtype=torch.long)
        mask = prompt_mask.long()
        pos = position_ids(mask)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        tokens, alive = [], []
        with self._eval(), self.role("policy"), self._merged("policy", merge):
            out = self.lm(input_ids=prompt_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                          logits_to_keep=1)
            next_pos = mask.sum(1, keepdim=True)  # (B, 1) position of the first response token
            for step in range(max_new_tokens):
                tok = _sample(out.logits[:, -1].float(), temperature, top_p, top_k, generator)  # (B,)
                tok = tok.masked_fill(finished, pad)
                alive.append(~finished)
                tokens.append(tok)
                if eos_ids:
                    finished = finished | torch.isin(tok, eos_t)
                if step == max_new_tokens - 1 or bool(finished.all()):
                    break
                mask = torch.cat([mask, alive[-1].long()[:, None]], dim=1)  # the token fed now is real iff alive
                out = self.lm(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                              past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
                next_pos = next_pos + 1
        response = torch.stack(tokens, 1)  # (B, R')
        resp_mask = torch.stack(alive, 1).long()
        zeros = torch.zeros_like(prompt_mask, dtype=torch.long)
        return {"sequences": torch.cat([prompt_ids, response], 1),
                "attention_mask": torch.cat([prompt_mask.long(), resp_mask], 1),
                "response_mask": torch.cat([zeros, resp_mask], 1)}

    @contextlib.contextmanager
    def _merged(self, adapter: str, merge: bool):
        """Fold `adapter` into the base for the duration (the LM then runs with adapters off), restoring the
        base bit for bit after.

        W - D after W + D is not W in floating point (about 0.4-11% of elements differ by an ulp, growing with
        |D| / |W|; see bench/results). So, one layer at a time, the elements that would not restore are
        recorded (flat index, original value) and written back after the subtraction: exact, and the stash is
        proportional to those elements only, not a copy of the base.
        """
        if not merge:
            yield
            return
        from peft.tuners.lora import LoraLayer

        stash = []
        try:
            with torch.no_grad():
                for module in self.peft.modules():
                    if isinstance(module, LoraLayer) and adapter in module.lora_A:
                        # .data: no version bump, so a graph that saved W stays usable (W is restored exactly)
                        w = module.get_base_layer().weight.data
                        d = module.get_delta_weight(adapter).to(w.dtype)
                        merged = w + d
                        wrong = ((merged - d) != w).view(-1).nonzero().squeeze(-1)  # (K,) flat indices
                        stash.append((module, d, wrong, w.view(-1)[wrong].clone()))
                        w.copy_(merged)
                        del merged
            with self.peft.disable_adapter():
                yield
        finally:
            self._set_trainable()
            with torch.no_grad():
                for module, d, wrong, original in stash:
                    w = module.get_base_layer().weight.data
                    w.sub_(d)
                    w.view(-1)[wrong] = original

    # -- SFT -> reference -----------------------------------------------------------------------------------

    @torch.no_grad()
    def merge_policy_into_base(self) -> None:
        """Fold the policy adapter into the base weights for good, then re-initialise a fresh policy adapter
        (B = 0, so the policy equals the new base).

        Use after SFT trained the policy adapter: the reference ("adapters off") becomes the SFT model, which is
        the anchor PPO's KL penalty needs (Ouyang et al. 2022). The critic and reward adapters are kept as they
        are (train the reward model after this call). Irreversible in place; save(save_base=True) to keep it.
        """
        from peft.tuners.lora import LoraLayer

        for module in self.peft.modules():
            if isinstance(module, LoraLayer) and "policy" in module.lora_A:
                base = module.get_base_layer()
                delta = module.get_delta_weight("policy")
                base.weight.add_(delta.to(base.weight.dtype))
                module.reset_lora_parameters("policy", True)
        self.merged_into_base += 1

    # -- save / load ------------------------------------------------------------------------------------------

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's own state dict (LoRA layers stripped, names as in the plain transformers model)."""
        sd = {}
        for name, t in self.lm.state_dict().items():
            if "lora_" in name:
                continue
            sd[name.replace(".base_layer.", ".")] = t
        return sd

    def save(self, path: str | os.PathLike, *, save_base: bool = False) -> Path:
        """Write the adapters (PEFT format, loadable by peft.PeftModel.from_pretrained), the heads and the
        settings to `path`, atomically (a temp folder renamed into place).

        Layout: path/adapters/{policy,critic,reward}/adapter_{config.json,model.safetensors},
        path/heads.safetensors, path/role_model.json, and path/base/ (transformers format + tokenizer) only
        with save_base=True.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            for name in ADAPTERS:
                self.peft.peft_config[name].base_model_name_or_path = self.base_name_or_path
            self.peft.save_pretrained(str(tmp / "adapters"), selected_adapters=list(ADAPTERS))
            heads = {f"value_head.{k}": v.detach().contiguous() for k, v in self.value_head.state_dict().items()}
            heads |= {f"score_head.{k}": v.detach().contiguous() for k, v in self.score_head.state_dict().items()}
            save_file(heads, str(tmp / HEADS_FILE))
            if save_base:
                self.lm.save_pretrained(str(tmp / "base"), state_dict=self.base_state_dict())
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(str(tmp / "base"))
            import peft
            import transformers

            settings = {"lora": asdict(self.lora), "base_model": self.base_name_or_path,
                        "has_base": save_base, "merged_into_base": self.merged_into_base,
                        "model_type": self.config.model_type, "dtype": str(self.lm_head.weight.dtype),
                        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                     "peft": peft.__version__}}
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

    @torch.no_grad()
    def load_adapters(self, path: str | os.PathLike) -> None:
        """Load adapters and heads written by save() into this model (same LoRA settings and base shape)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / SETTINGS_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a RoleModel folder (no {SETTINGS_FILE})")
        for name in ADAPTERS:
            f = path / "adapters" / name / "adapter_model.safetensors"
            if not f.is_file():
                raise FileNotFoundError(f"missing adapter file {f}")
            result = set_peft_model_state_dict(self.peft, load_file(str(f)), adapter_name=name)
            missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
            if missing:
                raise ValueError(f"adapter {name!r} in {f} lacks {len(missing)} tensors, e.g. {missing[0]}")
        heads = load_file(str(path / HEADS_FILE))
        for head_name, head in (("value_head", self.value_head), ("score_head", self.score_head)):
            head.load_state_dict({k.split(".", 1)[1]: v for k, v in heads.items() if k.startswith(head_name + ".")})
        self._set_trainable()

    @classmethod
    def load(cls, path: str | os.PathLike, base=None, *, dtype: torch.dtype | None = None,
             attn_implementation: str = "auto", trust_remote_code: bool = False,
             gradient_checkpointing: bool = False) -> RoleModel:
        """Rebuild a RoleModel from save()'s folder. The base comes from `base` (a folder or model object) when
        given, else from path/base when it was saved, else from the folder recorded at save time."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"RoleModel folder {str(path)!r} does not exist")
        if not (path / SETTINGS_FILE).is_file():
            raise ValueError(f"{str(path)!r} is not a RoleModel folder (no {SETTINGS_FILE})")
        settings = json.loads((path / SETTINGS_FILE).read_text())
        if base is None:
            base = path / "base" if (path / "base" / "config.json").is_file() else settings.get("base_model")
        if base is None:
            raise ValueError(f"{str(path)!r} holds no base model and records none: pass base=")
        model = cls.from_pretrained(base, lora=LoraSettings(**settings["lora"]), dtype=dtype,
                                    attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                                    gradient_checkpointing=gradient_checkpointing)
        model.load_adapters(path)
        model.merged_into_base = settings.get("merged_into_base", 0)
        return model


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
            generator: torch.Generator | None) -> torch.Tensor:
    # logits (B, V) fp32 -> (B,) int64 token ids.
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
