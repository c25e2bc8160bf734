"""--rollout vllm against the native rollout loop, the adapter hot-swap against a merged full-weight push, and the
log-prob parity between vLLM and the trainer (run from the repo root, in the vLLM venv):

    .venv-vllm/bin/python bench/vllm_rollout.py --shape tiny                      # the CPU check
    .venv-vllm/bin/python bench/vllm_rollout.py --shape qwen2-0.5b --prompts 64 --new_tokens 512   # on a GPU
    .venv-vllm/bin/python bench/vllm_rollout.py --shape qwen2-1.5b --prompts 64 --new_tokens 512 --sleep
        -> bench/results/<cpu|gpu>-vllm-rollout-<shape>-<date>.{md,json}

The model is Qwen2-shaped with random weights (from a config: no download), bf16 on a GPU, fp32 on the CPU, with
the default LoRA adapters (every linear layer of the decoder blocks, r = 8). No token stops a row, so every
response has exactly new_tokens tokens on both sides. Per repetition, alternating: one native rollout
(rl.rollout.sample without an engine: the KV-cached loop, policy merged) and one vLLM rollout (with the engine);
tokens/s = prompts x new_tokens / wall seconds. Then the adapter push: the policy adapter is changed in place and
VLLMEngine.sync() times the export (PEFT files in /dev/shm) and vLLM's in-place load; and a merged full-weight
push (what peers do: W + BA for every adapted layer, then the whole state dict into vLLM's load_weights), which
also breaks the engine's base, so it runs last. Medians with min and max.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch

SHAPES = {  # Qwen2 configs (vocabulary, width, depth, heads as the released models)
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2),
    "qwen2-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2),
}


def build(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhf_fast.models import RoleModel

    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)
    model = RoleModel.from_pretrained(Qwen2ForCausalLM(cfg).to(dtype)).to(device).eval()
    with torch.no_grad():  # a policy adapter away from zero, so vLLM really applies LoRA
        for name, p in model.peft.named_parameters():
            if "lora_B.policy" in name:
                p.normal_(0, 0.02)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def used_gib(device) -> float | None:
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def merged_push(llm, model) -> float:
    """Seconds to fold the policy LoRA into every base weight and push the full state dict into `llm` (a plain
    vLLM engine without LoRA, as peers run it)."""
    from peft.tuners.lora import LoraLayer

    t0 = time.perf_counter()
    with torch.no_grad():
        deltas = {}
        for name, module in model.lm.named_modules():
            if isinstance(module, LoraLayer) and "policy" in module.lora_A:
                deltas[name + ".weight"] = module.get_delta_weight("policy")
        weights = []
        for name, t in model.base_state_dict().items():
            d = deltas.get(name)
            weights.append((name, t + d.to(t.dtype) if d is not None else t))
    vllm_model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    vllm_model.load_weights(weights=iter(weights))
    sync(model.lm_head.weight.device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--gpu_memory_utilization", type=float, default=0.5)
    ap.add_argument("--sleep", action="store_true", help="also measure GPU memory with vLLM's sleep mode")
    ap.add_argument("--note", default="")
    ap.add_argument("--out_dir", default="bench/results")
    args = ap.parse_args()

    from rlhf_fast.rl import rollout
    from rlhf_fast.rl.vllm_engine import VLLMEngine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    memory = {"before": used_gib(device)}
    model = build(args.shape, device, dtype)
    memory["trainer model"] = used_gib(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, SHAPES[args.shape]["vocab_size"], (args.prompts, args.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    sampling = rollout.SamplingConfig(max_new_tokens=args.new_tokens)
    t0 = time.perf_counter()
    engine = VLLMEngine(model, max_model_len=args.prompt_len + args.new_tokens + 8, sampling=sampling,
                        gpu_memory_utilization=args.gpu_memory_utilization)
    start_s = time.perf_counter() - t0
    memory["trainer + vLLM engine"] = used_gib(device)
    tokens = args.prompts * args.new_tokens
    times, cpu = {"native": [], "vllm": []}, {"native": [], "vllm": []}
    parity = None
    for rep in range(args.reps + 1):  # repetition 0 warms both up and is not counted
        for name in ("native", "vllm") if rep % 2 == 0 else ("vllm", "native"):
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            ro = rollout.sample(model, ids, mask, sampling, eos_token_id=[], engine=engine if name == "vllm" else None)
            sync(device)
            if rep > 0:
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
            assert int(ro.response_mask.sum()) == tokens, "every row must have new_tokens tokens"
            if name == "vllm" and parity is None:
                with torch.no_grad():
                    lp = model.logprobs(ro.sequences, ro.attention_mask)
                _, parity = rollout.importance_correction(lp, ro.logprobs, ro.mask, mode="tis", cap=2.0)
    swaps, exports = [], []
    policy = [p for n, p in model.peft.named_parameters() if ".policy." in n]
    for _ in range(args.swaps):
        with torch.no_grad():
            policy[0].add_(1e-4)  # an optimiser step's worth of change: the engine sees new weights
        assert engine.sync()
        swaps.append(engine.sync_seconds)
        exports.append(engine.export_seconds)
    adapter_mb = sum(p.numel() * p.element_size() for p in policy) / 2**20
    if args.sleep and device.type == "cuda":
        engine.close()
        sleeper = VLLMEngine(model, max_model_len=args.prompt_len + args.new_tokens + 8, sampling=sampling,
                             gpu_memory_utilization=args.gpu_memory_utilization, sleep=True)
        rollout.sample(model, ids[:2], mask[:2], sampling, eos_token_id=[], engine=sleeper)  # ends asleep
        memory["trainer + vLLM asleep (sleep mode 1)"] = used_gib(device)
        engine = sleeper
    engine.close()  # its GPU memory goes before the second engine takes its share
    import gc
    import shutil
    import tempfile

    gc.collect()
    base = tempfile.mkdtemp(prefix="bench_vllm_base_")
    model.lm.save_pretrained(base, state_dict={k: v.detach().cpu() for k, v in model.base_state_dict().items()})
    plain = None
    try:  # the peers' way: an engine without LoRA, the merged weights pushed whole after each update
        from vllm import LLM

        kw = {"gpu_memory_utilization": args.gpu_memory_utilization} if device.type == "cuda" else {}
        plain = LLM(model=base, skip_tokenizer_init=True,
                    dtype=str(dtype).removeprefix("torch."), max_model_len=args.prompt_len + args.new_tokens + 8,
                    enforce_eager=device.type != "cuda", distributed_executor_backend="uni", **kw)
        merged = [merged_push(plain, model) for _ in range(3)]
        merged_error = None
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        merged, merged_error = [], f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    del plain
    shutil.rmtree(base, ignore_errors=True)

    native, vllm = stats(times["native"]), stats(times["vllm"])
    res = {
        "date": datetime.date.today().isoformat(), "shape": args.shape, "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "dtype": str(dtype),
        "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
        "tokens_per_s": {"native": tokens / native["median"], "vllm": tokens / vllm["median"]},
        "rollout_s": {"native": native, "vllm": vllm},
        "rollout_cpu_s": {"native": stats(cpu["native"]), "vllm": stats(cpu["vllm"])}, "speedup_vllm": native["median"] / vllm["median"],
        "engine_start_s": start_s, "adapter_mb": adapter_mb, "hot_swap_s": stats(swaps),
        "export_s": stats(exports), "merged_push_s": stats(merged) if merged else None,
        "merged_push_error": merged_error, "parity": parity, "memory_gib": memory,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "torch": torch.__version__, "vllm": __import__("vllm").__version__, "python": platform.python_version(),
        "note": args.note,
    }
    kind = "gpu" if device.type == "cuda" else "cpu"
    stem = os.path.join(args.out_dir, f"{kind}-vllm-rollout-{args.shape}-{res['date']}")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=2)
    ms = lambda s: f"{s['median'] * 1e3:.1f} ms (min {s['min'] * 1e3:.1f}, max {s['max'] * 1e3:.1f})"  # noqa: E731
    lines = [
        f"# --rollout vllm vs native, {args.shape} ({res['gpu'] or 'CPU'}, {dtype})", "",
        f"{res['date']}, commit {res['commit']}, torch {res['torch']}, vLLM {res['vllm']}. "
        f"{args.prompts} prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens each (no stop token), "
        f"{args.reps} alternating repetitions after a warm-up. {args.note}", "",
        "| rollout | wall seconds (median, min, max) | CPU seconds (median) | new tokens/s (wall) |",
        "|---|---|---|---|",
        f"| native (KV-cached loop, policy merged) | {native['median']:.3f} ({native['min']:.3f}, {native['max']:.3f}) "
        f"| {res['rollout_cpu_s']['native']['median']:.3f} | {res['tokens_per_s']['native']:.0f} |",
        f"| vLLM (engine, LoRA live) | {vllm['median']:.3f} ({vllm['min']:.3f}, {vllm['max']:.3f}) "
        f"| {res['rollout_cpu_s']['vllm']['median']:.3f} | {res['tokens_per_s']['vllm']:.0f} |", "",
        "CPU / wall seconds (about the cores in use): native "
        f"{res['rollout_cpu_s']['native']['median'] / native['median']:.2f} (the trainer: one torch thread on a "
        f"CPU), vLLM {res['rollout_cpu_s']['vllm']['median'] / vllm['median']:.2f} (its worker binds its own "
        "OpenMP threads).", "",
        f"vLLM / native: **{res['speedup_vllm']:.2f}x** new tokens/s. Engine start (base export + load): "
        f"{start_s:.1f} s, once per run.", "",
        f"Adapter push ({adapter_mb:.2f} MB of policy LoRA), {args.swaps} times: **{ms(res['hot_swap_s'])}** "
        f"(of which the PEFT export to /dev/shm {ms(res['export_s'])}); merged full-weight push: "
        + (ms(res["merged_push_s"]) if merged else f"failed here ({merged_error})") + ".", "",
        f"Log-prob parity (vLLM vs the trainer's fused log-probs, the first vLLM rollout's "
        f"{tokens} tokens): mean |diff| {parity['rollout/logprob_diff_mean']:.2e}, max "
        f"{parity['rollout/logprob_diff_max']:.2e}; TIS weight mean {parity['rollout/is_weight_mean']:.4f}, "
        f"capped share {parity['rollout/is_clipped_frac']:.4f}.",
    ]
    if device.type == "cuda":
        lines += ["", "GPU memory in use (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in memory.items() if v is not None)]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
