"""The dataset card (``README.md`` in the output folder): where the data came from and what it is not for."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from .manifest import Manifest

TOY_JUDGE_WARNING = (
    "The judge was the bundled SmolLM2-135M-Instruct. Its labels are for trying the tool, not for training: "
    "on 300 real hh-rlhf harmless-base pairs it agreed with the human label 50% of the time (chance) and named "
    "the first response 98% of the time."
)


def dataset_card(manifest: Manifest) -> str:
    cfg, counts, warnings = manifest.config, manifest.counts, manifest.warnings
    judge_cfg = manifest.judge_config()
    rate = counts.consistency_rate
    consistency = "not measured (one pass)" if rate is None else f"{100 * rate:.1f}%"
    splits = ", ".join(f"{name}: {n}" for name, n in counts.splits.items())
    lines = [
        "# caiforge preference dataset",
        "",
        *(f"> **Warning.** {w}\n" for w in warnings),
        "Pairs of (prompt, chosen, rejected) made from AI feedback by caiforge "
        f"{manifest.caiforge}: a policy answered each prompt at temperatures "
        f"{', '.join(str(t) for t in cfg['temperatures'])}, and a judge picked the most and least harmless answer "
        "under the constitution.",
        "",
        "| | |",
        "|---|---|",
        f"| prompts | {cfg['prompts_path'] or 'bundled red-team prompts'} |",
        f"| policy | {manifest.policy.get('backend')} `{manifest.policy.get('model')}` |",
        f"| judge | {manifest.judge.get('backend')} `{manifest.judge.get('model')}` |",
        f"| judge mode | {judge_cfg.get('mode', 'whole')}, {judge_cfg.get('passes', 1)} pass(es), "
        f"{judge_cfg.get('layout', 'caiforge')} layout |",
        f"| consistency under reversed order | {consistency} |",
        f"| constitution sha256 | `{manifest.constitution_sha256}` |",
        f"| unique prompts | {counts.unique_prompts} ({counts.duplicate_prompts} duplicates merged) |",
        f"| pairs | {counts.pairs} ({splits}) |",
        f"| failures | {counts.failures} (see `failures.jsonl`) |",
        *(
            [f"| human reviews | {r.get('flagged', 0)} pairs flagged and left out, {r.get('swapped', 0)} swapped |"]
            if (r := manifest.reviews)
            else []
        ),
        f"| seed | {cfg['seed']} |",
        "",
        "## Known limitations",
        "",
        "- Labels come from one judge model. LLM judges favour positions and longer answers; caiforge shows "
        "candidates in a seeded random order (unless the seed's layout was asked for), and `report.md` measures "
        "how often the chosen answer stood first and was the longer one.",
        "- Candidates come from one policy at a few temperatures, so chosen and rejected are often similar.",
        "- Prompts are red-team attempts: the data contains harmful requests and possibly harmful responses.",
        "- The NeMo comparison files hold hard labels; soft labels (`chosen_prob`, principle modes) are in "
        "`cai_preference_dataset.json` and in the `chosen_prob` column of the TRL files.",
        "",
        *_trainers(manifest),
    ]
    return _front_matter(manifest) + "\n".join(lines)


NOT_CONFIGS = ("cai_output", "removed_long_dialogs")  # revise's seed folders: one file each, not splits


def _configs(manifest: Manifest) -> dict[str, dict[str, str]]:
    """Per format folder, its JSONL file per split. (``datasets`` picks one reader for all of a folder's
    configs, and every format has JSONL; the Parquet files sit beside them for direct loading.)"""
    found: dict[str, dict[str, str]] = {}
    for name in manifest.files:
        path = PurePosixPath(name)
        if len(path.parts) == 2 and path.suffix == ".jsonl" and path.parts[0] not in NOT_CONFIGS:
            found.setdefault(path.parts[0], {})[path.stem] = name
    order = list(manifest.counts.splits)  # the run's split order, not the alphabet's
    rank = {name: i for i, name in enumerate(order)}
    return {k: dict(sorted(v.items(), key=lambda kv: (rank.get(kv[0], len(order)), kv[0]))) for k, v in found.items()}


def _front_matter(manifest: Manifest) -> str:
    """The Hub's dataset-card YAML: one config per format, so ``load_dataset(folder, "trl")`` and the Hub
    viewer read the folder as it is. Values are JSON strings, which YAML reads as they are."""
    configs = _configs(manifest)
    if not configs:
        return ""
    lines = ["---", "configs:"]
    default = next((c for c in ("trl-sft", "trl") if c in configs), next(iter(configs)))  # revise's, run's
    for config, files in configs.items():
        lines.append(f"- config_name: {json.dumps(config)}")
        if config == default:
            lines.append("  default: true")
        lines.append("  data_files:")
        for split, path in files.items():
            lines += [f"  - split: {json.dumps(split)}", f"    path: {json.dumps(path)}"]
    return "\n".join([*lines, "---", "", ""])


def _trainers(manifest: Manifest) -> list[str]:
    """How each trainer reads the files written here."""
    configs, splits = _configs(manifest), list(manifest.counts.splits)
    prefix = manifest.config.get("output_filename_prefix") or ""
    lines = ["## Training on it", ""]
    if "trl" in configs:
        lines += [
            "TRL (`trl` is standard text, `trl-conversational` is chat messages; both carry `prompt_id`, the "
            "temperatures, the judge's explanation and mode):",
            "",
            "```python",
            "from datasets import load_dataset",
            'data = load_dataset("path/to/this/folder", "trl")  # or "trl-conversational"',
            'trainer = DPOTrainer(model=model, ref_model=ref_model, train_dataset=data["train"], ...)',
            'trainer = RewardTrainer(model=reward_model, train_dataset=data["train"], ...)',
            "```",
            "",
            "OpenRLHF reads the conversational files: `--dataset trl-conversational --data.prompt_key prompt "
            "--data.chosen_key chosen --data.rejected_key rejected --data.apply_chat_template`.",
            "",
        ]
    if "nemo-rl" in configs:
        lines += [
            "NeMo-RL (`PreferenceDataset`): `data.dataset_name=PreferenceDataset "
            f"data.train.data_path=nemo-rl/{splits[0] if splits else 'train'}.jsonl`.",
            "",
        ]
    if "nemo-dpo" in configs:
        lines += ["NeMo-Aligner DPO: `model.data.data_prefix` pointing at `nemo-dpo/<split>.jsonl`.", ""]
    if splits:
        stem = f"{prefix}_" if prefix else ""
        comparisons = {s: f"{stem}{s}_comparisons_with_chat_prompt.jsonl" for s in splits}
        validation = comparisons.get("validation") or comparisons.get("test") or comparisons[splits[-1]]
        test = comparisons.get("test") or validation
        lines += [
            "NeMo-Aligner reward model (it expects `train`, `validation` and `test` keys; without a validation "
            "split the test file serves as both): "
            f"`model.data.data_prefix={{train:[{comparisons.get('train', comparisons[splits[0]])}],"
            f"validation:[{validation}],test:[{test}]}}`.",
            "",
        ]
    return lines


def blend_card(manifest: Manifest) -> str:
    """A blend's card: the same Hub configs and trainer commands, and where every pair came from."""
    blend, counts = manifest.blend, manifest.counts
    splits = ", ".join(f"{name}: {n}" for name, n in counts.splits.items())
    lines = [
        "# caiforge preference blend",
        "",
        f"{counts.pairs} pairs ({splits}) combined by caiforge {manifest.caiforge} from the sources below, "
        f"sampled and split with seed {blend.get('seed')}. A prompt found in two splits was moved to one "
        f"(test wins): {blend.get('leaks_moved', 0)} pairs moved.",
        "",
        "| source | kind | pairs in it | asked for | taken |",
        "|---|---|---|---|---|",
        *(
            f"| `{s['path']}` | {s['kind']} | {s['rows']} | {s['amount'] or 'all'} | {s['taken']} |"
            for s in blend.get("sources", [])
        ),
        "",
        *(
            [
                "| | |",
                "|---|---|",
                f"| human reviews | {r.get('flagged', 0)} pairs flagged and left out, {r.get('swapped', 0)} swapped "
                "(summed over the runs) |",
                "",
            ]
            if (r := manifest.reviews)
            else []
        ),
        *_trainers(manifest),
    ]
    return _front_matter(manifest) + "\n".join(lines)


TOY_POLICY_WARNING = (
    "The policy was the bundled SmolLM2-135M-Instruct. Its critiques and revisions are for trying the tool, not "
    "for training: a 135M model rarely critiques or revises in earnest."
)


def revision_card(manifest: Manifest) -> str:
    """A ``revise`` run's card: critique-and-revision SFT data, what it was made from and what it looks like."""
    cfg, counts, r = manifest.config, manifest.counts, manifest.revise
    q, inst, shots = r.get("quality", {}), r.get("instructions", {}), r.get("few_shot", {})
    revise_cfg = cfg.get("revise") or {}
    output = Path(str(revise_cfg.get("output_filepath") or "cai_revisions_aligner_chat_template.jsonl")).name

    def pct(key: str) -> str:
        value = q.get(key)
        return "n/a" if value is None else f"{100 * value:.1f}%"

    words_before, words_after = q.get("words_initial", {}), q.get("words_revised", {})
    drawn = ", ".join(f"#{i}: {n}" for i, n in enumerate(q.get("instruction_use", []))) or "none"
    lines = [
        "# caiforge critique-and-revision dataset (SL-CAI)",
        "",
        *(f"> **Warning.** {w}\n" for w in manifest.warnings),
        f"Supervised fine-tuning data made by caiforge {manifest.caiforge}, the first stage of Constitutional AI: "
        "the policy answered each red-team prompt after a few example dialogs, critiqued its answer under a "
        f"critique instruction drawn for the prompt, and revised it ({r.get('revisions', 1)} round(s), each building "
        "on the last revision). The final revision is the answer.",
        "",
        "| | |",
        "|---|---|",
        f"| prompts | {cfg.get('prompts_path') or 'bundled red-team prompts'} |",
        f"| policy | {manifest.policy.get('backend')} `{manifest.policy.get('model', 'embedded')}` |",
        f"| instructions | {inst.get('count')} ({inst.get('form')}, `{inst.get('source')}`) |",
        f"| few-shot turns | {shots.get('turns')} ({shots.get('source')}) |",
        f"| unique prompts | {counts.unique_prompts} ({counts.duplicate_prompts} duplicates merged) |",
        f"| revisions | {counts.revised} |",
        f"| failures | {counts.failures} (see `failures.jsonl`) |",
        f"| mere refusals | {pct('mere_refusal_rate')} ({q.get('refusal_rule', '')}) |",
        f"| unchanged from the initial answer | {pct('unchanged_rate')} |",
        f"| words, initial -> revised | mean {words_before.get('mean')} -> {words_after.get('mean')}, median "
        f"{words_before.get('median')} -> {words_after.get('median')} |",
        f"| instructions drawn (by index) | {drawn} |",
        f"| seed | {cfg.get('seed')} |",
        *(
            [
                f"| blended with | {b['helpfulness']} helpfulness records (`{b['helpfulness_path']}`), {b['blended']} "
                "in all |"
            ]
            if (b := r.get("blend"))
            else []
        ),
        "",
        "## Known limitations",
        "",
        "- The policy critiques itself: a weak model's critiques can miss the harm or invent it, and its "
        "revisions can turn into bare refusals (evasiveness); the refusal and unchanged shares above measure both.",
        "- Prompts are red-team attempts: the initial responses in `cai_output/` may be harmful.",
        "",
        "## Training on it",
        "",
        f"NeMo SFT (`GPTSFTChatDataset`): `model.data.train_ds.file_path={output}`; each line is "
        '`{"system", "conversations": [User, Assistant], "mask": "User", "dataset": "sl_cai_samples"}`.',
        "",
        "TRL (`trl-sft` holds chat messages, `trl-sft-prompt-completion` prompt and completion, loss on the "
        "completion only):",
        "",
        "```python",
        "from datasets import load_dataset",
        'data = load_dataset("path/to/this/folder", "trl-sft")  # or "trl-sft-prompt-completion"',
        'trainer = SFTTrainer(model=model, train_dataset=data["train"], ...)',
        "```",
        "",
    ]
    if r.get("pairs"):
        lines += [
            "With `--pairs`, half of each split became preference pairs (the final revision chosen, the initial "
            "answer rejected; revisions that changed nothing left out) in the folders below; no prompt is in both "
            "halves.",
            "",
            *_trainers(manifest)[2:],
        ]
    return _front_matter(manifest) + "\n".join(lines)
