"""The dataset card (``README.md`` in the output folder): where the data came from and what it is not for."""

from __future__ import annotations

from .manifest import Manifest

TOY_JUDGE_WARNING = (
    "The judge was the bundled SmolLM2-135M-Instruct. Its labels are for trying the tool, not for training: "
    "on 300 real hh-rlhf harmless-base pairs it agreed with the human label 50% of the time (chance) and named "
    "the first response 96% of the time."
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
        f"| seed | {cfg['seed']} |",
        "",
        "## Known limitations",
        "",
        "- Labels come from one judge model. LLM judges favour positions and longer answers; caiforge shows "
        "candidates in a seeded random order (unless the seed's layout was asked for), and `report.md` measures "
        "how often the chosen answer stood first and was the longer one.",
        "- Candidates come from one policy at a few temperatures, so chosen and rejected are often similar.",
        "- Prompts are red-team attempts: the data contains harmful requests and possibly harmful responses.",
        "- The comparison files hold hard labels; soft labels (`chosen_prob`, principle modes) are only in "
        "`cai_preference_dataset.json`.",
        "",
    ]
    return "\n".join(lines)
