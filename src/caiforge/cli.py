"""The command line: parse, build one config object, call the library, print. Nothing else lives here.

Every flag of NeMo-Aligner's ``generate_rl_cai_dataset.py`` is accepted with its exact spelling, so switching
is one line: ``python generate_rl_cai_dataset.py ARGS`` becomes ``caiforge run ARGS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__, backends
from .errors import CaiforgeError, InputError, RunAborted

COMMANDS = ("run", "revise", "plan", "view", "init", "eval-judge", "report", "export", "blend")
TRUE, FALSE = ("True", "true", "1", "yes"), ("False", "false", "0", "no")


def _bool(text: str) -> bool:
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


FORMATS_HELP = (
    "trainer formats besides the seed's files, repeatable or a comma list: nemo-rm, nemo-dpo, nemo-rl, "
    "trl (standard and conversational, JSONL and Parquet), trl-kto"
)


def _add_formats(p: Any, **kw: Any) -> None:
    """``--format`` for run, export and blend: one spelling, parsed by config.parse_formats."""
    p.add_argument("--format", dest="formats", action="append", **kw)


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    p.add_argument("--config", type=Path, default=s, help="YAML file with any of these settings (flags win)")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument(
        "--red-teaming-file-path",
        "--prompts",
        dest="prompts_path",
        type=Path,
        default=s,
        help="red-team prompts: hh-rlhf JSON array or JSON Lines (gzip or not), .txt or .csv",
    )
    io.add_argument(
        "--sys-prompt-constitution-file-path",
        "--constitution",
        dest="constitution_path",
        type=Path,
        default=s,
        help="the judge's system prompt: instructions and principles",
    )
    io.add_argument("--output-dir", type=Path, default=s, help="where files and the run database go")
    io.add_argument("--output-filename-prefix", default=s)
    io.add_argument("--splits", default=s, help="e.g. \"{'train': 0.8, 'test': 0.2}\"")
    io.add_argument("--shuffle", type=_bool, default=s)
    io.add_argument("--seed", type=int, default=s)
    io.add_argument("--blend-with", default=s, help="the seed's blend dict: name, then per split files")
    _add_formats(io, default=s, help=FORMATS_HELP + " (default: nemo-rm,trl)")
    _add_run_state_flags(io)
    _add_policy_flags(p, "policy (candidate responses)", sweep=True)
    _add_judge_flags(p)
    _add_local_flags(p)
    _add_request_flags(p)
    scale = p.add_argument_group("scale out (caiforge[ray])")
    scale.add_argument(
        "--engine",
        choices=("local", "ray"),
        default=s,
        help="ray: shard the prompts over a Ray cluster's actors; results land in this run's store (default local)",
    )
    scale.add_argument("--ray-address", default=s, help="a running cluster ('auto' after `ray start --head`)")
    scale.add_argument("--ray-actors", type=int, default=s, help="actors in the pool (default: one per 2 CPUs)")


def _add_run_state_flags(io: Any) -> None:
    s = argparse.SUPPRESS
    io.add_argument(
        "--on-bad-record",
        choices=("error", "skip"),
        default=s,
        help="skip: continue past bad input records and list them in failures.jsonl",
    )
    io.add_argument("--fresh", action="store_true", default=s, help="ignore finished work and start over")
    io.add_argument("--quiet", action="store_true", default=s, help="no progress bars")


def _add_policy_flags(p: argparse.ArgumentParser, title: str, sweep: bool) -> None:
    """The policy's endpoint, sampling and template flags (the seeds' spellings): ``run`` sweeps temperatures,
    ``revise`` uses the seed's one ``--temperature``."""
    s = argparse.SUPPRESS
    pol = p.add_argument_group(title)
    pol.add_argument("--policy-backend", choices=backends.choices("policy"), default=s)
    pol.add_argument(
        "--policy-url",
        action="append",
        default=s,
        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1; repeat for replicas (least loaded first)",
    )
    pol.add_argument("--policy-model", default=s)
    pol.add_argument("--policy-concurrency", type=int, default=s, help="requests in flight (default per backend)")
    pol.add_argument("--host", default=s, help="NeMo inference server host")
    pol.add_argument("--port", type=int, default=s, help="NeMo inference server port")
    pol.add_argument("--nemo-servers", default=s, help="several NeMo servers: host1:port1,host2:port2")
    pol.add_argument(
        "--batch-size",
        "--batch_size",
        dest="batch_size",
        type=int,
        default=s,
        help=f"requests per NeMo call (default {128 if sweep else 32})",
    )
    pol.add_argument(
        "--policy-output-retries",
        type=int,
        default=s,
        help="resends of a candidate request whose reply was unusable (no text, no response pattern; default 3)",
    )
    if sweep:
        pol.add_argument("--temperatures", type=_temperatures, default=s, help="default 0.01,0.51,1.01,1.51")
        pol.add_argument(
            "--temperature",
            type=float,
            default=s,
            help="accepted for compatibility; the seed overrides it with the sweep, so does caiforge",
        )
    else:
        pol.add_argument(
            "--temperature",
            dest="revise_temperature",
            type=float,
            default=s,
            help="every request's temperature (default 1.0; --greedy True, the default, ignores it)",
        )
    for flag, kind in (
        ("--add_bos", _bool),
        ("--top_k", int),
        ("--top_p", float),
        ("--all_probs", _bool),
        ("--repetition_penalty", float),
        ("--min_tokens_to_generate", int),
        ("--greedy", _bool),
        ("--tokens_to_generate", int),
    ):
        pol.add_argument(flag, type=kind, default=s)
    pol.add_argument("--end_strings", nargs="*", default=s)

    tpl = p.add_argument_group("prompt template (values are unescaped: \\n is a newline)")
    for flag in (
        "--user_format",
        "--assistant_format",
        "--system_format",
        "--system_default_message",
        "--bos_token",
        "--eos_token",
        "--response_extract_pattern",
    ):
        tpl.add_argument(flag, default=s)
    tpl.add_argument(
        "--apply_chat_template",
        type=_bool,
        default=s,
        help="NeMo, chats of several turns: True renders them with these formats; False sends message lists for "
        "the server's own chat template (revise's default)",
    )


def _add_judge_flags(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    jg = p.add_argument_group("judge (AI preference)")
    jg.add_argument("--judge-backend", choices=backends.choices("judge"), default=s)
    jg.add_argument(
        "--judge-url",
        "--ngc-url",
        dest="judge_url",
        action="append",
        default=s,
        help="OpenAI-compatible chat URL: base (.../v1) or full (.../chat/completions); repeat for replicas",
    )
    jg.add_argument("--judge-model", "--ngc-model", dest="judge_model", default=s)
    jg.add_argument("--ngc-api-key", default=s, help="prefer the NGC_API_KEY environment variable")
    jg.add_argument("--judge-concurrency", type=int, default=s, help="judge requests in flight (64 remote, 1 local)")
    jg.add_argument("--judge-max-tokens", type=int, default=s)
    jg.add_argument(
        "--judge-mode",
        choices=("whole", "principle", "principle-cot"),
        default=s,
        help="whole: the seed's multiple choice over the whole constitution (default); principle: the CAI paper's "
        "pairwise (A)/(B) under one sampled principle, soft labels from log-probabilities",
    )
    jg.add_argument(
        "--judge-passes",
        type=int,
        choices=(1, 2),
        default=s,
        help="2: ask again with the order reversed and keep only pairs where both passes agree",
    )
    jg.add_argument(
        "--judge-layout",
        choices=("caiforge", "seed"),
        default=s,
        help="caiforge: seeded random order, candidates quoted between unpredictable markers (default); "
        "seed: NeMo-Aligner's prompt byte for byte",
    )
    jg.add_argument(
        "--judge-structured",
        choices=("auto", "off"),
        default=s,
        help="auto: request a JSON schema of valid decisions, falling back when the server refuses it",
    )
    jg.add_argument(
        "--judge-parse-retries",
        type=int,
        default=s,
        help="extra attempts, with other seeds, when a reply holds no valid decision",
    )


def _add_local_flags(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    loc = p.add_argument_group("embedded local model (llama.cpp)")
    loc.add_argument("--local-model", type=Path, default=s, help="a GGUF file (default: bundled SmolLM2-135M)")
    loc.add_argument("--local-threads", type=int, default=s, help="llama.cpp threads (default: cores - 1)")


def _add_budget_flags(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS
    bud = p.add_argument_group("cost and budget (caiforge plan estimates them first)")
    bud.add_argument("--price-in", type=float, default=s, help="dollars per million prompt tokens")
    bud.add_argument("--price-out", type=float, default=s, help="dollars per million completion tokens")
    bud.add_argument(
        "--max-tokens",
        type=int,
        default=s,
        help="stop cleanly (resumable) once this invocation has used this many tokens, as the servers report them",
    )
    bud.add_argument("--max-cost", type=float, default=s, help="the same in dollars (needs --price-in/--price-out)")


def _add_request_flags(p: argparse.ArgumentParser, judge: bool = True) -> None:
    s = argparse.SUPPRESS
    _add_budget_flags(p)
    net = p.add_argument_group("requests")
    net.add_argument("--request-timeout", type=float, default=s, help="seconds per request (default 300)")
    net.add_argument(
        "--max-retries",
        type=int,
        default=s,
        help="retries on 5xx, timeouts, resets, bad bodies (default 8; x3 for 429)",
    )
    net.add_argument(
        "--retry-backoff",
        type=float,
        default=s,
        help="seconds; retry n waits a random time up to this x 2^(n-1), or the server's Retry-After",
    )
    net.add_argument("--policy-rpm", type=float, default=s, help="cap policy requests per minute, evenly spaced")
    if judge:
        net.add_argument("--judge-rpm", type=float, default=s, help="cap judge requests per minute (NVIDIA: about 40)")
    net.add_argument(
        "--max-failure-rate",
        type=float,
        default=s,
        help="stop when more than this share of the last 50 prompts failed (default 0.5; 1 = never)",
    )
    net.add_argument(
        "--fixed-concurrency",
        dest="adaptive_concurrency",
        action="store_false",
        default=s,
        help="keep the concurrency limits fixed instead of adapting to 429s and latency",
    )


def _add_revise_flags(p: argparse.ArgumentParser) -> None:
    """NeMo-Aligner's ``generate_sl_cai_dataset.py`` flags, same spellings, with its defaults (config.SL_DEFAULTS)."""
    s = argparse.SUPPRESS
    p.add_argument("--config", type=Path, default=s, help="YAML file with any of these settings (flags win)")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument(
        "--red-teaming-prompts-dataset-path",
        "--red-teaming-file-path",
        "--prompts",
        dest="prompts_path",
        type=Path,
        default=s,
        help="red-team prompts: hh-rlhf JSON array or JSON Lines (gzip or not), .txt or .csv (default: bundled)",
    )
    io.add_argument(
        "--critique-revision-instructions-path",
        dest="instructions_path",
        type=Path,
        default=s,
        help="NeMo's {harmful0: {prompt, edit_request}} JSON, llm-swarm's {constitutions, system_chat}, or a YAML "
        "list of {critique, revision} (default: bundled)",
    )
    io.add_argument(
        "--few-shot-prompts-dataset-path",
        dest="few_shot_path",
        type=Path,
        default=s,
        help="NeMo's {samples: [[{role, content}, ...]]} (default: the instruction file's system_chat, else bundled)",
    )
    io.add_argument(
        "--output-filepath",
        type=Path,
        default=s,
        help="the SFT JSONL; cai_output/ goes beside it "
        "(default <output-dir>/cai_revisions_aligner_chat_template.jsonl)",
    )
    io.add_argument(
        "--output-dir",
        type=Path,
        default=s,
        help="the run's database, manifest, card and report (default: the folder of --output-filepath, else "
        "caiforge-revise)",
    )
    io.add_argument(
        "--helpfulness-dataset-path",
        dest="helpfulness_path",
        type=Path,
        default=s,
        help="NeMo SFT JSONL to blend in, seeded: --output-filepath then holds the blend, cai_output/ the CAI part",
    )
    io.add_argument(
        "--max-seq-length",
        type=int,
        default=s,
        help="also write removed_long_dialogs/: the SFT file without dialogs over this many tokens",
    )
    io.add_argument("--tokenizer-model", type=Path, default=s, help="a tokenizer.json, or a .gguf model's vocabulary")
    io.add_argument("--tokenizer-library", default=s, help="huggingface (tokenizer.json) or gguf (default: by file)")
    io.add_argument("--num-examples", type=int, default=s, help="the first N input records (default -1: all)")
    io.add_argument(
        "--pairs",
        action="store_true",
        default=s,
        help="half of each split becomes preference pairs (final revision chosen, initial answer rejected) in each "
        "--format; the other half stays SFT data, so no prompt is in both",
    )
    io.add_argument("--splits", default=s, help="of the TRL SFT files, e.g. \"{'train': 0.8, 'test': 0.2}\"")
    io.add_argument("--shuffle", type=_bool, default=s)
    _add_formats(io, default=s, help=FORMATS_HELP + " (with --pairs; default: nemo-rm,trl)")
    io.add_argument("--revisions", type=int, default=s, help="critique/revision rounds per prompt (default 1)")
    io.add_argument("--seed", type=int, default=s, help="draws each prompt's instructions (default 1234)")
    io.add_argument(
        "--save-to-file-interval",
        type=int,
        default=s,
        help="accepted for compatibility: every step is stored as it is answered",
    )
    _add_run_state_flags(io)
    _add_policy_flags(p, "policy (writes, critiques and revises)", sweep=False)
    _add_local_flags(p)
    _add_request_flags(p, judge=False)


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``command`` only that command's flags (the others are listed, not built): the
    run flags' backend choices import every backend module, which ``caiforge --help`` has no use for."""
    full = command is None
    root = argparse.ArgumentParser(
        prog="caiforge",
        description="Constitutional-AI (RLAIF) preference datasets from AI feedback: a faster, resumable drop-in "
        "for NeMo-Aligner's generate_rl_cai_dataset.py (same flags, same files).",
        epilog="examples:\n"
        "  caiforge run                      # bundled prompts and constitution, embedded model, ./caiforge-out\n"
        "  caiforge run --red-teaming-file-path red_team_attempts.jsonl.gz \\\n"
        "      --sys-prompt-constitution-file-path constitution.txt --host localhost --port 5656\n"
        "  caiforge eval-judge --pairs harmless-base/test.jsonl.gz --limit 300\n"
        "  caiforge run --help               # every flag",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    root.add_argument("--version", action="version", version=f"caiforge {__version__}")
    sub = root.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="make a preference dataset (the default command)")
    if full or command == "run":
        _add_run_flags(run)
    rev = sub.add_parser(
        "revise",
        help="critique-and-revision SFT data (SL-CAI): a drop-in for generate_sl_cai_dataset.py",
        description="The first stage of Constitutional AI: the policy answers each prompt, critiques its answer "
        "under a sampled instruction and revises it. Same flags and files as NeMo-Aligner's "
        "generate_sl_cai_dataset.py; resumable like run.",
    )
    if full or command == "revise":
        _add_revise_flags(rev)
    sub.add_parser(
        "plan",
        help="what a run or revise would send: requests, tokens, time and cost; nothing is sent",
        description="caiforge plan [run|revise] [that command's flags] [--assume-latency S] [--json]",
        add_help=False,
    )
    ev = sub.add_parser("eval-judge", help="measure a judge against human preference labels (hh-rlhf harmless-base)")
    ev.add_argument("--pairs", type=Path, required=True, help="harmless-base JSONL (gzip or not)")
    ev.add_argument("--limit", type=int, default=None, help="only the first N usable pairs")
    if full or command == "eval-judge":
        _add_run_flags(ev)
    exp = sub.add_parser("export", help="write trainer formats from a run's store (no model, no server)")
    exp.add_argument("directory", type=Path, help="the run's output folder (holds caiforge.db)")
    _add_formats(exp, required=True, help=FORMATS_HELP)
    exp.add_argument("--output-dir", type=Path, default=None, help="where to write (default: the run's folder)")
    bl = sub.add_parser(
        "blend",
        help="combine runs and outside preference data into one set of splits (no model is called)",
        description="With one run and --blend-with alone: the seed's blend_* files in the run's folder. Otherwise "
        "every run, --source and --blend-with file is sampled, split (leaks resolved, test wins) and written in "
        "each --format to --output-dir.",
    )
    bl.add_argument("directories", nargs="*", type=Path, metavar="RUN_DIR", help="run folders (hold caiforge.db)")
    bl.add_argument("--blend-with", default=None, help="the seed's blend dict: name, then per split NeMo files")
    bl.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="PATH[:AMOUNT]",
        help="a TRL JSONL/Parquet file, a folder of split files, or a run; AMOUNT is a weight in (0, 1] or a count",
    )
    _add_formats(bl, default=None, help=FORMATS_HELP + " (default: nemo-rm,trl)")
    bl.add_argument("--seed", type=int, default=None, help="sampling and shuffling (default: the first run's)")
    bl.add_argument("--output-dir", type=Path, default=None, help="where to write")
    view = sub.add_parser("view", help="browse a run (while it runs, too) and review its pairs, on 127.0.0.1")
    view.add_argument("directory", type=Path, help="the run's folder (holds caiforge.db)")
    view.add_argument("--port", type=int, default=0, help="default: any free port")
    view.add_argument("--open", action="store_true", help="open the page in the browser")
    rep = sub.add_parser("report", help="rebuild report.md and its plots from a finished run")
    rep.add_argument("directory", type=Path)
    init = sub.add_parser("init", help="copy the bundled red-team prompts and constitution here, for editing")
    init.add_argument("directory", nargs="?", type=Path, default=Path("."))
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    return root


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        if tree.get(key) is None:  # `policy:` alone in YAML is None
            tree[key] = {}
        if not isinstance(tree[key], dict):
            raise InputError(f"config: '{key}' must be a mapping, got {type(tree[key]).__name__}")
        tree = tree[key]
    tree[leaf] = value


FLAT = {  # flag dest -> config path
    "prompts_path": "prompts_path",
    "constitution_path": "constitution_path",
    "output_dir": "output_dir",
    "output_filename_prefix": "output_filename_prefix",
    "shuffle": "shuffle",
    "seed": "seed",
    "on_bad_record": "on_bad_record",
    "quiet": "quiet",
    "temperatures": "temperatures",
    "request_timeout": "request_timeout",
    "max_retries": "max_retries",
    "retry_backoff": "retry_backoff",
    "max_failure_rate": "max_failure_rate",
    "adaptive_concurrency": "adaptive_concurrency",
    "policy_rpm": "policy.rpm",
    "judge_rpm": "judge.rpm",
    "policy_backend": "policy.backend",
    "policy_url": "policy.url",
    "policy_model": "policy.model",
    "policy_concurrency": "policy.concurrency",
    "host": "policy.host",
    "port": "policy.port",
    "nemo_servers": "policy.servers",
    "batch_size": "policy.batch_size",
    "policy_output_retries": "policy.output_retries",
    "judge_backend": "judge.backend",
    "judge_url": "judge.url",
    "judge_model": "judge.model",
    "judge_concurrency": "judge.concurrency",
    "judge_max_tokens": "judge.max_tokens",
    "judge_parse_retries": "judge.parse_retries",
    "judge_mode": "judge.mode",
    "judge_passes": "judge.passes",
    "judge_layout": "judge.layout",
    "judge_structured": "judge.structured",
    "local_model": "local.model_path",
    "local_threads": "local.threads",
    "formats": "formats",
    "engine": "engine",
    "ray_address": "ray_address",
    "ray_actors": "ray_actors",
    "instructions_path": "revise.instructions_path",
    "few_shot_path": "revise.few_shot_path",
    "output_filepath": "revise.output_filepath",
    "num_examples": "revise.num_examples",
    "revisions": "revise.revisions",
    "revise_temperature": "revise.temperature",
    "save_to_file_interval": "revise.save_to_file_interval",
    "helpfulness_path": "revise.helpfulness_path",
    "pairs": "revise.pairs",
    "max_seq_length": "revise.max_seq_length",
    "tokenizer_model": "revise.tokenizer_model",
    "tokenizer_library": "revise.tokenizer_library",
    "apply_chat_template": "policy.apply_chat_template",
    "price_in": "budget.price_in",
    "price_out": "budget.price_out",
    "max_tokens": "budget.max_tokens",
    "max_cost": "budget.max_cost",
}
SPECIAL = (
    "limit",
    "directory",
    "force",
    "config",
    "command",
    "fresh",
    "end_strings",
    "splits",
    "blend_with",
    "ngc_api_key",
    "temperature",
)
TEMPLATE = (
    "user_format",
    "assistant_format",
    "system_format",
    "system_default_message",
    "bos_token",
    "eos_token",
    "response_extract_pattern",
)


def _apply_flags(data: dict[str, Any], given: dict[str, Any]) -> None:
    """Lay the flags that were given over the YAML settings."""
    from .config import Sampling, parse_blend_with, parse_splits
    from .template import unescape

    for dest, path in FLAT.items():
        if dest in given:
            _set(data, path, given[dest])
    for name in Sampling.model_fields:
        if name in given and name != "end_strings":  # end_strings is unescaped
            _set(data, f"policy.sampling.{name}", given[name])
    if "end_strings" in given:
        _set(data, "policy.sampling.end_strings", [unescape(v) for v in given["end_strings"]])
    for name in TEMPLATE:
        if name in given:
            _set(data, f"template.{name}", unescape(given[name]))
    if "splits" in given:
        data["splits"] = parse_splits(given["splits"])
    if "blend_with" in given:
        data["blend_with"] = parse_blend_with(given["blend_with"])
    if given.get("ngc_api_key"):  # NGC_API_KEY in the environment is read by the config, for every caller
        _set(data, "judge.api_key", given["ngc_api_key"])


def config_from_args(args: argparse.Namespace) -> tuple[Any, bool]:
    """Defaults < YAML file (``--config``) < flags; one validated config, or an InputError. ``revise`` lays the
    SL seed's defaults under both."""
    from .config import build_config, load_yaml, revise_config

    given = vars(args)
    data: dict[str, Any] = load_yaml(given["config"]) if "config" in given else {}
    try:
        _apply_flags(data, given)
        build = revise_config if given.get("command") == "revise" else build_config
        return build(data), bool(given.get("fresh", False))
    except InputError as exc:
        if "config" in given and not str(exc).startswith("--"):  # the problem may be in the file: say which
            raise InputError(f"{given['config']}: {exc}") from exc
        raise


def _export(directory: Path, formats: list[str] | None, output_dir: Path | None, blend: str | None = None) -> int:
    """``export`` (formats) and ``blend`` (the seed's blend files): both read the run's store alone."""
    from .config import parse_blend_with, parse_formats
    from .export import blend_run, export

    try:
        if blend is not None:
            done = blend_run(directory, parse_blend_with(blend), output_dir)
        else:
            done = export(directory, parse_formats(formats or []), output_dir)
    except ValueError as exc:  # an unknown format name
        print(f"caiforge: error: --format: {exc}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"caiforge: error: {exc}", file=sys.stderr)
        return 2
    for name in done.files:
        print(f"wrote {done.output_dir / name}")
    print(f"caiforge: exported {done.pairs} pairs from {done.prompts} prompts")
    _print_reviews(done.reviews)
    if done.pending:
        print(
            f"caiforge: the run is not finished: {done.pending} of {done.prompts} prompts have no outcome yet; "
            "rerun it to finish, then export again",
            file=sys.stderr,
        )
    return 0


def _blend(args: argparse.Namespace) -> int:
    from .config import parse_blend_with, parse_formats
    from .export import blend_many

    dirs, seed_only = args.directories, not args.source and args.formats is None
    if len(dirs) == 1 and args.blend_with is not None and seed_only:
        return _export(dirs[0], None, args.output_dir, blend=args.blend_with)
    try:
        if args.output_dir is None:
            raise InputError("blend: --output-dir is needed to combine sources (a blend is not a run's folder)")
        formats = parse_formats(args.formats or ["nemo-rm,trl"])
        spec = parse_blend_with(args.blend_with) if args.blend_with is not None else None
        done = blend_many(dirs, args.source, spec, formats, args.output_dir, args.seed)
    except ValueError as exc:
        print(f"caiforge: error: --format: {exc}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"caiforge: error: {exc}", file=sys.stderr)
        return 2
    _print_reviews(done.manifest.reviews)
    blend = done.manifest.blend
    for source in blend["sources"]:
        print(f"caiforge: {source['path']}: {source['taken']} of {source['rows']} pairs")
    splits = ", ".join(f"{k} {v}" for k, v in done.manifest.counts.splits.items())
    print(
        f"caiforge: blended {done.manifest.counts.pairs} pairs ({splits}); {blend['leaks_moved']} moved to stop a leak"
    )
    print(f"  output: {done.output_dir}")
    return 0


def _print_reviews(reviews: dict[str, int]) -> None:
    if reviews:
        print(
            f"caiforge: honoured the reviews: {reviews.get('flagged', 0)} flagged pairs left out, "
            f"{reviews.get('swapped', 0)} written swapped"
        )


def _view(directory: Path, port: int, open_browser: bool) -> int:
    import asyncio

    from .view import serve

    async def forever() -> None:
        print(
            f"caiforge view: indexing {directory / 'view.db'} (the first time about 4 minutes a million prompts; "
            "then only what changed)",
            flush=True,
        )
        runner, url = await serve(directory, port)
        print(f"caiforge view: {url}  (reviews need this URL's token; Ctrl-C stops)", flush=True)
        if open_browser:
            import webbrowser

            webbrowser.open(url)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(forever())
    except InputError as exc:
        print(f"caiforge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, or not ours to bind
        print(f"caiforge: error: cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


def _report(directory: Path) -> int:
    from .report import write_report

    try:
        print(f"wrote {write_report(directory)}")
    except InputError as exc:
        print(f"caiforge: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _eval_judge(args: argparse.Namespace) -> int:
    from .evaluate import SUMMARY_FILE, eval_judge, table

    given = vars(args)
    if "output_dir" not in given:
        args.output_dir = Path("caiforge-eval")
    try:
        if args.limit is not None and args.limit < 1:
            raise InputError("--limit must be at least 1")
        pairs, limit = given.pop("pairs"), given.pop("limit")
        cfg, fresh = config_from_args(args)
        summary = eval_judge(cfg, pairs, limit, fresh)
    except InputError as exc:
        print(f"caiforge: error: {exc}", file=sys.stderr)
        return 2
    except CaiforgeError as exc:
        print(f"caiforge: failed: {exc}", file=sys.stderr)
        return 1
    print(table(summary))
    print(f"wrote {cfg.output_dir / SUMMARY_FILE}")
    return 0


def _plan(argv: list[str]) -> int:
    """``plan [run|revise] FLAGS``: the command's own parser, plus the plan's two flags."""
    from .plan import plan_revise, plan_run

    pipeline = argv[0] if argv[:1] in (["run"], ["revise"]) else "run"
    rest = argv[1:] if argv[:1] in (["run"], ["revise"]) else argv
    extra = argparse.ArgumentParser(prog="caiforge plan", add_help=False)
    extra.add_argument("--assume-latency", type=float, default=1.0, help="seconds a request (default 1)")
    extra.add_argument("--json", action="store_true", help="the plan as JSON")
    extra.add_argument("--chars-per-token", type=float, default=None, help="count tokens by this rule instead")
    own, remaining = extra.parse_known_args(rest)
    if any(a in ("-h", "--help") for a in remaining):
        print("usage: caiforge plan [run|revise] [that command's flags] [--assume-latency S] [--json]\n")
    args = parser(pipeline).parse_args([pipeline, *remaining])
    try:
        if own.assume_latency <= 0 or (own.chars_per_token is not None and own.chars_per_token <= 0):
            raise InputError("--assume-latency and --chars-per-token must be above 0")
        cfg, _ = config_from_args(args)
        make = plan_revise if pipeline == "revise" else plan_run
        found = make(cfg, own.assume_latency, own.chars_per_token)
    except InputError as exc:
        print(f"caiforge: error: {exc}", file=sys.stderr)
        return 2
    if own.json:
        import json

        print(json.dumps(found.as_dict(), indent=2))
    else:
        print(found.text())
    return 0


def _generate(args: argparse.Namespace, command: Callable[[Any, bool], Any], made: str, what: str) -> int:
    """``run`` and ``revise``: config, the run, the summary; exit 2 for bad input, 1 for a failed or empty run."""
    try:
        cfg, fresh = config_from_args(args)
        result = command(cfg, fresh)
    except InputError as exc:
        print(f"caiforge: error: {exc}", file=sys.stderr)
        return 2
    except RunAborted as exc:
        print(f"\ncaiforge: {exc}", file=sys.stderr)
        return 1
    except CaiforgeError as exc:
        print(f"caiforge: failed: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    if getattr(result, made) == 0:
        print(f"caiforge: failed: no {what} were made; see failures.jsonl for why", file=sys.stderr)
        return 1
    return 0


def _init(directory: Path, force: bool) -> int:
    from .bundled import init

    try:
        written = init(directory, force)
    except (InputError, OSError) as exc:
        print(f"caiforge: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    prompts, constitution = written
    print(
        f"edit them, then: caiforge run --red-teaming-file-path {prompts} --sys-prompt-constitution-file-path "
        f"{constitution}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        argv.insert(0, "run")  # the seed has no subcommand: `caiforge --batch-size 8 ...` is a run
    if argv[0] == "plan":
        return _plan(argv[1:])
    args = parser(argv[0]).parse_args(argv)
    if args.command == "init":
        return _init(args.directory, args.force)
    if args.command == "report":
        return _report(args.directory)
    if args.command == "view":
        return _view(args.directory, args.port, args.open)
    if args.command == "export":
        return _export(args.directory, args.formats, args.output_dir)
    if args.command == "blend":
        return _blend(args)
    if args.command == "eval-judge":
        return _eval_judge(args)
    if args.command == "revise":
        from .revise import revise  # imported late: `caiforge --help` stays fast

        return _generate(args, revise, "revised", "revisions")
    from .pipeline import run

    return _generate(args, run, "pairs", "pairs")


if __name__ == "__main__":
    sys.exit(main())
