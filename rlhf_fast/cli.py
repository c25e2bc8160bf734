"""The `rlhf-fast` command.

    rlhf-fast sft   --model PATH --data sft.jsonl    --out_dir out/sft      supervised fine-tuning (+ merge)
    rlhf-fast rm    --model out/sft/model/base --data prefs.jsonl --out_dir out/rm
    rlhf-fast ppo   --model out/sft/model/base --reward_model out/rm/model --data prompts.jsonl --out_dir out/ppo
    rlhf-fast grpo  --model PATH --data prompts.jsonl --reward_funcs accuracy,format --out_dir out/grpo
    rlhf-fast dpo   --model out/sft/model/base --data prefs.jsonl --out_dir out/dpo   (--online: prompts + rewards)
    rlhf-fast kto   --model out/sft/model/base --data feedback.jsonl --out_dir out/kto
    rlhf-fast raft  --model PATH --data prompts.jsonl --reward_model out/rm/model --rounds 2 --n 8 --out_dir out/raft
    rlhf-fast best-of-n --model PATH --data prompts.jsonl --n 8 --reward_model out/rm/model --out picks.jsonl
    rlhf-fast demo  --out DIR                                              the embedded end-to-end demo
    rlhf-fast bench ...                                                    benchmarks
    rlhf-fast label --judge M --constitution c.txt --data pairs.jsonl --out prefs.jsonl   RLAIF labels
    rlhf-fast revise --model M --constitution c.txt --data prompts.jsonl --out sft.jsonl  critique-revision

The options of sft, rm, ppo, grpo, dpo and kto are generated from their config dataclasses (nested dataclasses are
flattened); `--config run.yaml` supplies any of them (flat, or nested under `optim:` / `lora:`) and flags
given on the command line override it. A boolean option takes TRL's forms and ours: `--progress`,
`--progress true|false` (also yes/no, on/off, 1/0), `--no-progress` or `--no_progress`. A list option takes
`--lora_target_modules q_proj,v_proj` or a YAML list. Usage errors (bad options, missing, unreadable or
malformed files, a model folder without a tokenizer or whose weights do not load) print one line and exit
with code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import typing

SUBCOMMANDS = ("sft", "rm", "ppo", "grpo", "dpo", "kto", "label", "revise", "raft", "best-of-n", "demo", "bench")
DELEGATED = {"demo": ("rlhf_fast.demo.run", "the embedded demo"), "bench": ("rlhf_fast.bench.cli", "the benchmark runner")}
DELEGATED |= {"label": ("rlhf_fast.rl.label", "RLAIF labelling"), "revise": ("rlhf_fast.rl.revise", "critique-revision")}
DELEGATED["best-of-n"] = ("rlhf_fast.rl.best_of_n", "Best-of-N sampling")


class UsageError(Exception):
    """Bad command line or config file: exit code 2."""


def _stages():
    from rlhf_fast.trainers import (
        DPOConfig,
        GRPOConfig,
        KTOConfig,
        PPOConfig,
        RMConfig,
        SFTConfig,
        train_dpo,
        train_grpo,
        train_kto,
        train_ppo,
        train_rm,
        train_sft,
    )
    from rlhf_fast.trainers.raft import RAFTConfig, train_raft

    return {"sft": (SFTConfig, train_sft, "supervised fine-tuning of the policy adapter"),
            "rm": (RMConfig, train_rm, "reward model (Bradley-Terry on pairs or rankings)"),
            "ppo": (PPOConfig, train_ppo, "PPO against the reward model"),
            "grpo": (GRPOConfig, train_grpo, "GRPO / Dr. GRPO / DAPO / GSPO / RLOO / REINFORCE++ with reward "
                                             "functions (no critic)"),
            "dpo": (DPOConfig, train_dpo, "DPO / IPO / SimPO / ORPO on preference pairs, or online / iterative DPO"),
            "kto": (KTOConfig, train_kto, "KTO on unpaired desirable / undesirable completions"),
            "raft": (RAFTConfig, train_raft, "RAFT: rounds of Best-of-N sampling, then SFT on the picks")}


# ----------------------------------------------------------------------------------------- options
# Options of these nested groups carry the group's name as a prefix: --lora_r, not --r.
_PREFIXED = ("lora",)


@dataclasses.dataclass
class _Option:
    name: str             # flag and dest: --name
    group: str | None     # nested dataclass field, or None
    leaf: str             # the field's name inside its dataclass
    field: dataclasses.Field
    type: typing.Any
    default: typing.Any   # the trainer's default (a nested group's default comes from the outer field)


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _fields(cls) -> list[_Option]:
    """Every leaf option of a config dataclass (nested dataclasses flattened)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            sub, outer = typing.get_type_hints(t), _default(f)
            for g in dataclasses.fields(t):
                name = f"{f.name}_{g.name}" if f.name in _PREFIXED else g.name
                out.append(_Option(name, f.name, g.name, g, sub[g.name], getattr(outer, g.name)))
        else:
            out.append(_Option(f.name, None, f.name, f, t, _default(f)))
    return out


def _converter(t, name: str):
    """str -> value of type t (also used on YAML values); Optional[X] accepts 'none'/'null'."""
    args = typing.get_args(t)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), t) if args else t
    if typing.get_origin(base) is list:  # list[str]: comma-separated on the command line, a list in YAML

        def conv_list(v):
            if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "null", "")):
                if optional:
                    return None
                raise UsageError(f"--{name} needs a value")
            items = v.split(",") if isinstance(v, str) else v
            if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
                raise UsageError(f"--{name}: expected a comma-separated list or a YAML list of names, got {v!r}")
            return [x.strip() for x in items if x.strip()] or (None if optional else [])

        conv_list.__name__ = "list"
        return conv_list

    def conv(v):
        if v is None or (optional and isinstance(v, str) and v.strip().lower() in ("none", "null", "")):
            if optional:
                return None
            raise UsageError(f"--{name} needs a value")
        if base is bool:
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(v, str) and v.lower() in ("0", "false", "no", "off"):
                return False
            raise UsageError(f"--{name}: expected true or false, got {v!r}")
        if isinstance(v, bool) and base is not bool:
            raise UsageError(f"--{name}: expected {base.__name__}, got {v!r}")
        try:
            if base is int and isinstance(v, float):
                if not v.is_integer():
                    raise ValueError
                return int(v)
            return base(v)
        except (TypeError, ValueError):
            raise UsageError(f"--{name}: expected {base.__name__}, got {v!r}") from None

    conv.__name__ = base.__name__  # argparse names the type in its own messages
    return conv


def _argparse_type(conv):
    def f(v):
        try:
            return conv(v)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

    f.__name__ = conv.__name__
    return f


def _shown(v) -> str:
    """A default as one would type it: true/false, none, comma-separated lists."""
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def build_parser(stage: str) -> argparse.ArgumentParser:
    cls, _, desc = _stages()[stage]
    p = argparse.ArgumentParser(prog=f"rlhf-fast {stage}", description=f"{desc}. {cls.__doc__ or ''}".strip(),
                                usage=f"rlhf-fast {stage} [--config YAML] [--OPTION VALUE ...]",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="YAML", help="YAML file of options; flags on the command line override it")
    groups = {None: p.add_argument_group(f"{stage} options")}
    for o in _fields(cls):
        if o.group not in groups:
            groups[o.group] = p.add_argument_group(f"{o.group} options")
        choices = o.field.metadata.get("choices")
        helptext = o.field.metadata.get("help", "") + (f"; one of {', '.join(choices)}" if choices else "")
        if "default:" not in helptext:  # a help that explains its default itself (clip_high) keeps its own
            helptext = f"{helptext} (default: {_shown(o.default)})"
        names = [o.name] + ([o.name.replace("_", "-")] if "_" in o.name else [])
        flags = [f"--{n}" for n in names]
        conv = _converter(o.type, o.name)
        if conv.__name__ == "bool":  # --flag, --flag true|false (TRL / HfArgumentParser), --no-flag, --no_flag
            groups[o.group].add_argument(*flags, dest=o.name, nargs="?", const=True, type=_argparse_type(conv),
                                         metavar="true|false", help=f"{helptext}; --no-{names[-1]} turns it off")
            negative = dict.fromkeys(f"--no{sep}{n}" for n in names for sep in ("-", "_"))
            groups[o.group].add_argument(*negative, dest=o.name, action="store_false", help=argparse.SUPPRESS)
        else:
            groups[o.group].add_argument(*flags, dest=o.name, type=_argparse_type(conv), help=helptext,
                                         choices=choices, metavar=o.name.upper())
    return p


def _read_yaml(path: str) -> dict:
    import yaml

    if os.path.isdir(path):
        raise UsageError(f"config file {path!r} is a folder, not a YAML file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file {path!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UsageError(f"config file {path!r} is unreadable: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"config file {path!r} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of option: value")
    return data


def make_config(stage: str, argv: list[str]):
    """The stage's config dataclass from defaults, then --config YAML, then flags."""
    cls = _stages()[stage][0]
    args = vars(build_parser(stage).parse_args(argv))
    options = {o.name: o for o in _fields(cls)}
    by_leaf = {(o.group, o.leaf): o for o in options.values()}
    groups = {o.group for o in options.values() if o.group}
    values: dict[str, typing.Any] = {}
    if "config" in args:
        for key, v in _read_yaml(args.pop("config")).items():
            if key in groups and not isinstance(v, dict):
                raise UsageError(f"config file: {key!r} must hold a mapping of its options (e.g. {key}: {{...}}), "
                                 f"got {v!r}")
            if key in groups:  # nested: `lora: {r: 8}` (or `lora: {lora_r: 8}`)
                for k2, v2 in v.items():
                    o = by_leaf.get((key, k2)) or (options[k2] if options.get(k2) and options[k2].group == key
                                                   else None)
                    if o is None:
                        raise UsageError(f"config file: unknown option {key}.{k2}")
                    values[o.name] = _converter(o.type, o.name)(v2)
            elif key in options:
                values[key] = _converter(options[key].type, key)(v)
            else:
                raise UsageError(f"config file: unknown option {key!r} for `rlhf-fast {stage}`")
    values.update(args)
    nested: dict[str, dict] = {g: {} for g in groups}
    top = {}
    for k, v in values.items():
        o = options[k]
        (nested[o.group] if o.group else top)[o.leaf] = v
    outer = {f.name: f for f in dataclasses.fields(cls)}
    for g in groups:  # start from the trainer's default of the group, then apply what was given
        top[g] = dataclasses.replace(_default(outer[g]), **nested[g])
    return cls(**top)


# ----------------------------------------------------------------------------------------- main
def _delegate(name: str, argv: list[str]) -> int:
    module, what = DELEGATED[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if e.name != module:
            raise
        print(f"rlhf-fast {name}: {what} is not available in this installation ({module} is missing)",
              file=sys.stderr)
        return 2
    if not hasattr(mod, "main"):
        print(f"rlhf-fast {name}: {module} has no main(argv)", file=sys.stderr)
        return 2
    return int(mod.main(argv) or 0)


def _usage() -> str:
    lines = [f"usage: rlhf-fast {{{','.join(SUBCOMMANDS)}}} [options]", "",
             "RLHF on one model copy: SFT -> reward model -> PPO, with fused kernels.", "", "commands:"]
    rows = [(name, desc) for name, (_, _, desc) in _stages().items()]
    rows += [("label", "RLAIF: preference pairs labelled by a judge LM from a written constitution"),
             ("revise", "Constitutional AI: sample, critique, revise -> SFT data"),
             ("best-of-n", "Best-of-N: N samples per prompt, scored, the best kept as JSONL"),
             ("demo", "the embedded end-to-end demo (no downloads)"), ("bench", "benchmarks")]
    lines += [f"  {name:10s} {desc}" for name, desc in rows]
    lines += ["", "`rlhf-fast COMMAND --help` lists a command's options."]
    return "\n".join(lines)


def _one_line(e: BaseException) -> str:
    # the first line: messages passed on from transformers or peft may carry paragraphs of advice
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from rlhf_fast import __version__

        print(f"rlhf-fast {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in DELEGATED:
        return _delegate(cmd, rest)
    if cmd not in _stages():
        print(f"rlhf-fast: error: unknown command {cmd!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    from rlhf_fast.data.jsonl import DataError
    from rlhf_fast.errors import ConfigError
    from rlhf_fast.rl.rewards import RewardFunctionError
    from rlhf_fast.trainers.loop import TrainingDiverged

    try:
        cfg = make_config(cmd, rest)
        result = _stages()[cmd][1](cfg)
    except (UsageError, ConfigError, DataError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            PermissionError) as e:
        print(f"rlhf-fast {cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (TrainingDiverged, RewardFunctionError) as e:  # the run started but cannot go on: exit 1, one line
        print(f"rlhf-fast {cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except SystemExit as e:  # argparse: bad flag (code 2) or --help (code 0)
        return int(e.code or 0)
    metrics = {k: round(v, 4) for k, v in result["metrics"].items() if isinstance(v, float)}
    print(f"rlhf-fast {cmd}: done; model saved to {result['out']}; last metrics {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
