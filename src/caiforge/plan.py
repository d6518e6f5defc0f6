"""``caiforge plan``: what a ``run`` or ``revise`` would send, read from its inputs and config alone. Nothing is
sent and nothing is written.

Counts are exact: unique and duplicate prompts, requests per role (NeMo calls too). Tokens are estimates, and
the text says how each was made:

- prompt tokens with the local model's tokenizer (its GGUF vocabulary, no weights loaded) when it is installed,
  exactly for up to ``EXACT`` unique prompts and from a seeded sample beyond; else ``CHARS_PER_TOKEN``
  characters a token;
- output tokens from the token limits (an upper bound), or from the means of the replies already stored in the
  output folder when it holds a run;
- chat-template tokens are not counted (a few a turn).

The duration is a range at the given concurrency, rpm caps and ``--assume-latency``: the busiest role alone
(stages overlap fully) to every role one after the other. The cost needs ``--price-in``/``--price-out``.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bundled
from .config import BudgetConfig, RunConfig
from .errors import InputError
from .inputs import BadRecord, PromptRecord, iter_prompts
from .records import prompt_id
from .store import DB_NAME

CHARS_PER_TOKEN = 4.0  # the rule when no tokenizer is at hand (OpenAI's rule of thumb for English)
EXACT = 20_000  # unique prompts counted exactly; a seeded sample of this many beyond
TokenCount = Callable[[str], int]


@dataclass
class Role:
    name: str
    requests: int
    calls: int  # what goes over the wire: a NeMo call carries a batch
    tokens_in: int
    tokens_out: int
    out_rule: str
    concurrency: int
    rpm: float | None

    def seconds(self, latency: float) -> float:
        rate = self.concurrency / latency
        if self.rpm:
            rate = min(rate, self.rpm / 60)
        return self.calls / rate


@dataclass
class Plan:
    pipeline: str
    records: int
    unique: int
    bad: int
    roles: list[Role]
    token_rule: str
    latency: float
    chain: int  # requests one after the other for a prompt: the shortest the run can be is chain x latency
    stored: dict[str, int] = field(default_factory=dict)  # replies already in the folder's database, per role
    prices: BudgetConfig = field(default_factory=BudgetConfig)

    @property
    def duplicates(self) -> int:
        return self.records - self.unique

    def duration(self) -> tuple[float, float]:
        per_role = [r.seconds(self.latency) for r in self.roles]
        floor = self.chain * self.latency
        return max(max(per_role), floor), max(sum(per_role), floor)

    def cost(self) -> float | None:
        return self.prices.cost(sum(r.tokens_in for r in self.roles), sum(r.tokens_out for r in self.roles))

    def as_dict(self) -> dict[str, Any]:
        low, high = self.duration()
        return {
            "pipeline": self.pipeline,
            "input_records": self.records,
            "unique_prompts": self.unique,
            "duplicate_prompts": self.duplicates,
            "bad_records": self.bad,
            "roles": {
                r.name: {
                    "requests": r.requests,
                    "calls": r.calls,
                    "tokens_in": r.tokens_in,
                    "tokens_out": r.tokens_out,
                    "tokens_out_from": r.out_rule,
                    "concurrency": r.concurrency,
                    "rpm": r.rpm,
                }
                for r in self.roles
            },
            "token_rule": self.token_rule,
            "assume_latency_s": self.latency,
            "duration_s": [round(low, 1), round(high, 1)],
            "stored_replies": self.stored,
            "cost": None if self.cost() is None else round(self.cost() or 0.0, 4),
        }

    def text(self) -> str:
        low, high = self.duration()
        lines = [
            f"caiforge plan ({self.pipeline}): nothing was sent",
            f"  prompts: {self.unique:,} unique, {self.duplicates:,} duplicates merged, {self.bad:,} bad records",
        ]
        for r in self.roles:
            calls = f" in {r.calls:,} calls" if r.calls != r.requests else ""
            cap = f", {r.rpm:g} rpm" if r.rpm else ""
            lines.append(
                f"  {r.name}: {r.requests:,} requests{calls}; about {r.tokens_in:,} tokens in, {r.tokens_out:,} out "
                f"({r.out_rule}); {r.concurrency} in flight{cap}"
            )
        lines.append(f"  tokens counted {self.token_rule}; chat-template tokens (a few a turn) not counted")
        if self.stored:
            done = ", ".join(f"{k} {v:,}" for k, v in self.stored.items())
            lines.append(f"  already stored in the output folder: {done} replies (a rerun reuses them, at no cost)")
        lines.append(
            f"  duration at {self.latency:g} s a request: {_clock(low)} (roles overlapping) to {_clock(high)} "
            "(one after the other)"
        )
        cost = self.cost()
        if cost is not None:
            lines.append(
                f"  cost at ${self.prices.price_in:g} in / ${self.prices.price_out:g} out per million tokens: "
                f"about ${cost:,.2f}"
            )
        else:
            lines.append("  cost: give --price-in and --price-out (dollars per million tokens) for an estimate")
        return "\n".join(lines)


def _clock(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def token_counter(cfg: RunConfig, chars_per_token: float | None = None) -> tuple[TokenCount, str]:
    """The local model's tokenizer when it is installed (vocabulary only: 0.2 s), else the characters rule
    (``chars_per_token`` asks for the rule: a hosted model's tokenizer is not the local one)."""
    if chars_per_token is not None:
        return _chars(chars_per_token)
    try:
        from .backends.local import default_model_path
        from .seq_length import load_counter

        path = cfg.local.model_path or default_model_path()
        return load_counter(path, "gguf"), f"with the tokenizer of {path.name}"
    except InputError:  # the local model is not installed or not readable: the stated rule instead
        return _chars(CHARS_PER_TOKEN)


def _chars(per_token: float) -> tuple[TokenCount, str]:
    return (lambda text: round(len(text) / per_token)), f"at {per_token:g} characters a token"


@dataclass
class Prompts:
    records: int
    unique: list[str]  # at most EXACT texts: all of them, or a seeded sample
    total_chars: int  # of every unique prompt
    count: int  # unique prompts
    bad: int


def read_prompts(cfg: RunConfig, limit: int | None = None) -> Prompts:
    """Unique prompts by hash (8 bytes each), their characters, and a sample of at most EXACT of them."""
    path = cfg.prompts_path or bundled.path(bundled.PROMPTS)
    seen: set[int] = set()
    sample: list[str] = []
    rng = random.Random(cfg.seed)
    records = bad = chars = 0
    for record in iter_prompts(path, cfg.on_bad_record):
        if isinstance(record, BadRecord):
            bad += 1
            continue
        assert isinstance(record, PromptRecord)
        if limit is not None and records == limit:
            break
        records += 1
        key = int(prompt_id(record.text), 16)
        if key in seen:
            continue
        seen.add(key)
        chars += len(record.text)
        if len(sample) < EXACT:  # reservoir sampling: every unique prompt equally likely to be counted
            sample.append(record.text)
        else:
            j = rng.randrange(len(seen))
            if j < EXACT:
                sample[j] = record.text
    return Prompts(records=records, unique=sample, total_chars=chars, count=len(seen), bad=bad)


def prompt_tokens(prompts: Prompts, count: TokenCount) -> int:
    """Tokens of every unique prompt: exact for a full sample, else scaled by characters."""
    counted = sum(count(p) for p in prompts.unique)
    if len(prompts.unique) == prompts.count:
        return counted
    sample_chars = sum(len(p) for p in prompts.unique) or 1
    return round(counted * prompts.total_chars / sample_chars)


def stored_means(output_dir: Path) -> tuple[dict[str, int], dict[str, float]]:
    """Replies already in the folder's database per role, and their mean completion tokens (where reported)."""
    path = output_dir / DB_NAME
    if not path.is_file():
        return {}, {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT role, COUNT(*), AVG(completion_tokens) FROM replies GROUP BY role").fetchall()
    except sqlite3.DatabaseError:
        return {}, {}
    finally:
        db.close()
    return {r: int(n) for r, n, _ in rows}, {r: float(m) for r, _, m in rows if m is not None}


def concurrency(cfg: RunConfig, section: str, default: int) -> int:
    return int(getattr(cfg, section).concurrency or default)


def policy_concurrency(cfg: RunConfig) -> int:
    """The policy's requests in flight: the flag, else each backend's default (NeMo 4, local 1, OpenAI 256)."""
    backend = cfg.policy.backend
    return concurrency(cfg, "policy", 4 if backend == "nemo" else 1 if backend == "local" else 256)


def _plan(
    cfg: RunConfig,
    pipeline: str,
    prompts: Prompts,
    roles: list[Role],
    rule: str,
    latency: float,
    chain: int,
    stored: dict[str, int],
) -> Plan:
    return Plan(
        pipeline=pipeline,
        records=prompts.records,
        unique=prompts.count,
        bad=prompts.bad,
        roles=roles,
        token_rule=rule,
        latency=latency,
        chain=chain,
        stored=stored,
        prices=cfg.budget,
    )


def _out(stored: dict[str, float], role: str, limit: int) -> tuple[float, str]:
    if role in stored:
        return stored[role], "mean of the replies stored in the output folder"
    return float(limit), "token limit: an upper bound"


def plan_run(cfg: RunConfig, latency: float, chars_per_token: float | None = None) -> Plan:
    from .pipeline import load_judging

    count, rule = token_counter(cfg, chars_per_token)
    prompts = read_prompts(cfg)
    u, temps, passes = prompts.count, len(cfg.temperatures), cfg.judge.passes
    p_tokens = prompt_tokens(prompts, count)
    stored, means = stored_means(cfg.output_dir)
    out_policy, policy_rule = _out(means, "policy", cfg.policy.sampling.tokens_to_generate)
    out_judge, judge_rule = _out(means, "judge", cfg.judge.max_tokens)
    constitution, _ = load_judging(cfg)
    nemo = cfg.policy.backend == "nemo"
    batch = cfg.policy.batch_size if nemo else 1
    policy_requests = u * temps
    policy = Role(
        name="policy",
        requests=policy_requests,
        calls=-(-policy_requests // batch),
        tokens_in=temps * p_tokens,
        tokens_out=round(policy_requests * out_policy),
        out_rule=policy_rule,
        concurrency=policy_concurrency(cfg),
        rpm=cfg.policy.rpm,
    )
    judge_requests = u * passes
    judge = Role(
        name="judge",
        requests=judge_requests,
        calls=judge_requests,
        tokens_in=passes * (u * count(constitution) + p_tokens + round(u * temps * out_policy)),
        tokens_out=round(judge_requests * out_judge),
        out_rule=judge_rule,
        concurrency=concurrency(cfg, "judge", 1 if cfg.judge.backend == "local" else 64),
        rpm=cfg.judge.rpm,
    )
    return _plan(cfg, "run", prompts, [policy, judge], rule, latency, 1 + passes, stored)


def plan_revise(cfg: RunConfig, latency: float, chars_per_token: float | None = None) -> Plan:
    from .revise import load_inputs

    inputs = load_inputs(cfg)  # checks every file, as revise does before its first request
    count, rule = token_counter(cfg, chars_per_token)
    limit = cfg.revise.num_examples if cfg.revise.num_examples > 0 else None
    prompts = read_prompts(cfg, limit)
    u, rounds = prompts.count, cfg.revise.revisions
    steps = 1 + 2 * rounds
    stored, means = stored_means(cfg.output_dir)
    out, out_rule = _out(means, "policy", cfg.policy.sampling.tokens_to_generate)
    shots = sum(count(m["content"]) for m in inputs.few_shot)
    items = inputs.instructions.items
    critique = sum(count(i.critique) for i in items) / len(items)
    revision = sum(count(i.revision) for i in items) / len(items)
    # Each step reads the conversation so far: the dialogs, the prompt, every earlier answer and instruction.
    per_prompt_extra, said, asked = 0.0, 0.0, 0.0
    for step in range(steps):
        per_prompt_extra += shots + said + asked
        said += out
        asked += critique if step % 2 == 0 else revision
    nemo = cfg.policy.backend == "nemo"
    batch = cfg.policy.batch_size if nemo else 1
    requests = u * steps
    policy = Role(
        name="policy",
        requests=requests,
        calls=steps * -(-u // batch) if nemo else requests,
        tokens_in=round(steps * prompt_tokens(prompts, count) + u * per_prompt_extra),
        tokens_out=round(requests * out),
        out_rule=out_rule,
        concurrency=policy_concurrency(cfg),
        rpm=cfg.policy.rpm,
    )
    return _plan(cfg, "revise", prompts, [policy], rule, latency, steps, stored)
