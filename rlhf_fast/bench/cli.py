"""`rlhf-fast bench`: the benchmark runner (also behind bench/gpu.py and bench/cpu_report.py).

    rlhf-fast bench                      # GPU script when CUDA is present, else the CPU report
    rlhf-fast bench --mode cpu           # CPU report: GAE vs the Python loop, fused log-probs time and memory
    rlhf-fast bench --mode gpu --smoke   # the GPU script's code paths at tiny shapes on the CPU (Triton interpreter)
    rlhf-fast bench --only gae,ceilings --out DIR

Writes <out>/<device>-<date>.md and .json (device, versions, git commit, every figure) and prints the markdown
last. The measurements themselves live in rlhf_fast/bench/measure.py and rlhf_fast/bench/sections.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run order: the quick sections first, so a run cut short by its budget loses only the slowest rows.
GPU_SECTIONS = ("check", "ceilings", "gae", "role_model", "logprobs", "ppo")
CPU_SECTIONS = ("gae", "logprobs")
REPO_ROOT = Path(__file__).resolve().parents[2]  # the source checkout when run from one


# ----------------------------------------------------------------------------------------------- build


def _import_probe(require_cuda: bool) -> tuple[bool, str]:
    """Can a fresh interpreter import rlhf_fast._C (with CUDA if asked) and the Triton kernels package?"""
    code = ("import torch, rlhf_fast, rlhf_fast._C as C, rlhf_fast.kernels.logprobs; "
            f"assert {not require_cuda} or C.with_cuda(), 'rlhf_fast._C built without CUDA'; "
            "print(rlhf_fast.__file__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    return p.returncode == 0, (p.stdout + p.stderr).strip().splitlines()[-1] if (p.stdout + p.stderr).strip() else ""


def ensure_built(require_cuda: bool) -> dict:
    """Build rlhf_fast._C in place when a fresh interpreter cannot import it: `pip install --no-build-isolation
    --no-deps -e .`, else `python setup.py build_ext --inplace`. Returns
    {"status", "log"}; status "already built" | "built: <how>" | "FAILED". The caller must re-exec itself
    after a build so the editable install's import hook is seen."""
    ok, msg = _import_probe(require_cuda)
    if ok:
        return {"status": "already built", "log": msg}
    log = [f"import probe: {msg}"]
    for how in ([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
                [sys.executable, "setup.py", "build_ext", "--inplace"]):
        t0 = time.monotonic()
        p = subprocess.run(how, capture_output=True, text=True, cwd=REPO_ROOT)
        log.append(f"$ {' '.join(how[1:])}  (rc {p.returncode}, {time.monotonic() - t0:.0f} s)\n"
                   + (p.stdout + p.stderr)[-3000:])
        ok, msg = _import_probe(require_cuda)
        if ok:
            return {"status": f"built: {' '.join(how[1:])}", "log": "\n".join(log)}
        log.append(f"import probe after build: {msg}")
    return {"status": "FAILED", "log": "\n".join(log)}


# ----------------------------------------------------------------------------------------------- report


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def meta(device, args) -> dict:
    import torch

    from rlhf_fast import __version__
    from rlhf_fast.bench import measure as _bench

    m = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "mode": args.mode, "smoke": args.smoke, "rlhf_fast": __version__, "python": platform.python_version(),
         "torch": torch.__version__, "cuda": torch.version.cuda, "git_commit": _bench.git_commit(str(REPO_ROOT)),
         "host": platform.node(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
         "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
    for pkg in ("triton", "transformers", "peft", "liger_kernel"):
        try:
            mod = __import__(pkg)
            m[pkg] = getattr(mod, "__version__", None) or _dist_version(pkg)
        except Exception:  # noqa: BLE001 - optional packages
            m[pkg] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        m.update(device=props.name, device_slug=_slug(props.name), sms=props.multi_processor_count,
                 gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        m.update(device=f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})",
                 device_slug="cpu")
    m["machine_note"] = args.note or ""
    return m


def _dist_version(pkg: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg.replace("_", "-"))
    except PackageNotFoundError:
        return None


def to_markdown(report: dict) -> str:
    from rlhf_fast.bench.measure import markdown_table

    m = report["meta"]
    head = f"# rlhf_fast benchmarks: {m['device']} ({m['date']})"
    if m["smoke"]:
        head += " - SMOKE RUN (tiny shapes, not a measurement)"
    lines = [head, ""]
    if m.get("machine_note"):
        lines += [f"Machine: {m['machine_note']}.", ""]
    lines += [f"torch {m['torch']} (CUDA {m['cuda']}), triton {m['triton']}, transformers {m['transformers']}, "
              f"peft {m['peft']}, liger_kernel {m['liger_kernel']}, python {m['python']}; torch threads "
              f"{m['torch_threads']}; git commit {m['git_commit']}; TRITON_INTERPRET={m['TRITON_INTERPRET']}.", ""]
    if report.get("build"):
        lines += [f"rlhf_fast._C: {report['build']['status']}.", ""]
    for name, sec in report["sections"].items():
        lines += [f"## {sec.get('title', name)}", ""]
        if sec.get("rows"):
            lines.append(markdown_table(sec["rows"], sec.get("columns") or None))
        for n in sec.get("notes", []):
            lines.append(f"- {n}")
        if sec.get("seconds") is not None:
            load = sec.get("load_avg_1min") or [None, None]
            lines.append(f"- section wall time {sec['seconds']:.0f} s; 1-minute load average before / after: "
                         f"{load[0]:.1f} / {load[1]:.1f} (on {m['cpu_count']} CPUs)")
        lines.append("")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    m = report["meta"]
    stem = f"{m['device_slug']}{'-smoke' if m['smoke'] else ''}-{m['date'][:10]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md.write_text(to_markdown(report))
    js.write_text(json.dumps(_jsonable(report), indent=1) + "\n")
    return md, js


# ----------------------------------------------------------------------------------------------- main


def parse(argv):
    p = argparse.ArgumentParser(prog="rlhf-fast bench", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto",
                   help="gpu: the GPU script (needs CUDA unless --smoke); cpu: the CPU report; auto: gpu when "
                        "CUDA is present")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes; off CUDA the GPU script runs on the CPU under TRITON_INTERPRET=1 "
                        "(exercises the code paths, measures nothing worth reporting)")
    p.add_argument("--out", default=None,
                   help="output folder (default bench/results, or a temporary folder for --smoke)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated sections; gpu: {','.join(GPU_SECTIONS)}; cpu: {','.join(CPU_SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall-clock budget; sections skip what is left once it is spent (default 540 s, to fit "
                        "one 10-minute device call)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run (default: torch's)")
    p.add_argument("--note", default=None, help="machine description for the report (e.g. shared CPU)")
    p.add_argument("--build-status", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    # bench/gpu.py sets RLHF_FAST_BENCH_T0 before building: the build counts against the budget too.
    t_start = time.monotonic() - max(0.0, time.time() - float(os.environ.get("RLHF_FAST_BENCH_T0", time.time())))
    import torch

    cuda = torch.cuda.is_available()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the memory-measuring children too
    if args.mode == "auto":
        args.mode = "gpu" if cuda else "cpu"
    if args.mode == "gpu" and not cuda:
        if not args.smoke:
            print("rlhf-fast bench: --mode gpu needs a CUDA device (use --smoke to run its code paths on the CPU)",
                  file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    valid = GPU_SECTIONS if args.mode == "gpu" else CPU_SECTIONS
    only = [s.strip() for s in args.only.split(",")] if args.only else list(valid)
    bad = [s for s in only if s not in valid]
    if bad:
        print(f"rlhf-fast bench: unknown section(s) {bad} for --mode {args.mode}; choose from {list(valid)}",
              file=sys.stderr)
        return 2
    if args.smoke and args.out is None:
        args.out = tempfile.mkdtemp(prefix="rlhf_fast_bench_smoke_")
    out_dir = Path(args.out or (REPO_ROOT / "bench" / "results" if (REPO_ROOT / "bench").is_dir()
                                else "bench_results"))

    from rlhf_fast.bench import sections as S

    device = torch.device("cuda" if cuda and args.mode == "gpu" else "cpu")
    run = S.Run(device=device, smoke=args.smoke, deadline=t_start + args.budget_s, repo_root=REPO_ROOT)
    report = {"meta": meta(device, args), "sections": {}}
    if args.build_status:
        report["build"] = {"status": args.build_status}
    funcs = ({"check": S.check_section, "ceilings": S.ceilings_section, "logprobs": S.logprobs_section,
              "ppo": S.ppo_section, "gae": S.gae_section, "role_model": S.role_model_section}
             if args.mode == "gpu" else
             {"gae": lambda r: S.gae_section(r, B_=64 if not r.smoke else 8, T=4096 if not r.smoke else 64,
                                             backends=("native", "torch"), peer_loop=True),
              "logprobs": S.cpu_logprobs_section})
    if args.mode == "gpu" and "ceilings" not in only and any(s in only for s in ("logprobs", "ppo", "gae")):
        only = ["ceilings", *only]  # the ratios need the ceilings
        print("(ceilings added: the other sections' ratios need them)")
    only = [s for s in valid if s in only]  # always the run order above
    for name in only:
        t0 = time.monotonic()
        load0 = os.getloadavg()[0]
        print(f"== {name} (t = {t0 - t_start:.0f} s of {args.budget_s:.0f} s)", flush=True)
        if run.left() < 5:
            sec = S.section(name, [], [], ["skipped: time budget spent"])
        else:
            try:
                sec = funcs[name](run)
            except Exception as e:  # noqa: BLE001 - one broken section must not lose the others' figures
                import traceback

                sec = S.section(name, [], [], [f"section failed: {S._short_error(e)}",
                                                traceback.format_exc()[-2000:]])
        sec["seconds"] = time.monotonic() - t0
        sec["load_avg_1min"] = [load0, os.getloadavg()[0]]  # other work on the machine, before and after
        report["sections"][name] = sec
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_report(report, out_dir)  # after every section, so a cut-off run keeps what it measured
        print(S.B.markdown_table(sec["rows"], sec.get("columns") or None) if sec["rows"] else "", flush=True)
    report["meta"]["total_seconds"] = time.monotonic() - t_start
    md, js = write_report(report, out_dir)
    print(to_markdown(report))
    print(f"wrote {md} and {js}")
    failures = report["sections"].get("check", {}).get("failures", 0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
