"""The run report (``report.md`` plus PNG plots in ``report/``): what the judge did, read from a run's files alone.

It reads only the output folder, so ``caiforge report DIR`` works on old runs too, and it prints no clock time or
absolute path, so the same files always give the same markdown. Plots use ``matplotlib.figure.Figure`` directly:
no pyplot global state and no display needed. Every optional field may be missing; a plot that cannot be drawn is
replaced by a sentence saying why.
"""

from __future__ import annotations

import json
import os
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .candidates import candidate_key, candidate_label, temperature_of
from .errors import InputError
from .inputs import json_array
from .manifest import Manifest
from .outputs import FAILURES_FILE, PREFERENCES_FILE, write_atomic

REPORT_FILE = "report.md"
PLOTS_DIR = "report"
NO_PAIRS = "Skipped because the run has no pairs."
CHOSEN_COLOUR, REJECTED_COLOUR = "#4c72b0", "#dd8452"
ROLES = ("policy", "judge")

if TYPE_CHECKING:
    from matplotlib.figure import Figure
CHOICES = ("chosen", "rejected")


def write_report(output_dir: Path, pairs: PairTally | None = None) -> Path:
    """Write ``report.md`` and its plots for a finished run in ``output_dir``; return the report's path.

    ``pairs``: the preference file's entries already counted as they were written (``run`` does; reading a
    large file back took a third of the report's time at 100k pairs), else it is read."""
    output_dir = Path(output_dir)
    manifest = Manifest.read(output_dir)
    if manifest.pipeline == "sl-cai":
        from .quality import report_lines

        path = output_dir / REPORT_FILE
        write_atomic(path, "\n".join(report_lines(manifest)).rstrip() + "\n")
        return path
    pairs = _load_pairs(output_dir / PREFERENCES_FILE) if pairs is None else pairs
    failures = _failure_counts(output_dir / FAILURES_FILE, manifest)
    plots = output_dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    lines = ["# caiforge run report", ""]
    for warning in manifest.warnings:
        lines += [f"> **Warning.** {warning}", ""]
    lines += _summary(manifest, failures)
    lines += _temperatures(pairs, manifest, plots)
    lines += _positions(pairs, plots)
    lines += _consistency(pairs, manifest)
    lines += _failures(failures, plots)
    lines += _lengths(pairs, plots)
    lines += _usage(manifest, plots)
    lines += _chosen_prob(pairs, plots)
    path = output_dir / REPORT_FILE
    write_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path


@dataclass
class PairTally:
    """What the report needs of the pairs, counted in one streamed pass: a million pairs cost a few counters,
    not a million dicts (the preference file is one JSON array, read a piece at a time)."""

    n: int = 0
    chosen: Counter[Any] = field(default_factory=Counter)  # by candidate key
    rejected: Counter[Any] = field(default_factory=Counter)
    seen: set[str] = field(default_factory=set)  # candidate keys seen in the data
    positions: Counter[tuple[int, int, int]] = field(default_factory=Counter)  # (chosen, rejected, shown)
    flagged: int = 0  # kept pairs marked inconsistent
    chosen_words: Counter[int] = field(default_factory=Counter)
    rejected_words: Counter[int] = field(default_factory=Counter)
    longer: int = 0
    ties: int = 0
    probs: array[float] = field(default_factory=lambda: array("d"))

    def add(self, pair: dict[str, Any]) -> None:
        self.n += 1
        raw = _raw(pair)
        ck, rk = raw.get("chosen_response_key"), raw.get("rejected_response_key")
        self.chosen[ck] += 1
        self.rejected[rk] += 1
        self.seen.update(raw.get("all_responses") or {})
        self.seen.update(k for k in (ck, rk) if k)
        c, r = raw.get("chosen_position"), raw.get("rejected_position")
        if isinstance(c, int) and isinstance(r, int) and _is_int(c) and _is_int(r):
            self.positions[(c, r, len(raw.get("judge_order") or raw.get("all_responses") or ()) or max(c, r))] += 1
        self.flagged += raw.get("consistent") is False
        cw, rw = len(str(pair.get("chosen") or "").split()), len(str(pair.get("rejected") or "").split())
        self.chosen_words[cw] += 1
        self.rejected_words[rw] += 1
        self.longer += cw > rw
        self.ties += cw == rw
        v = pair.get("chosen_prob")
        if isinstance(v, int | float) and not isinstance(v, bool):
            self.probs.append(float(v))


def _load_pairs(path: Path) -> PairTally:
    """A missing dataset reads as no pairs (the run may have judged nothing); a corrupt one is an input error."""
    tally = PairTally()
    if not path.exists():
        return tally
    try:
        for _, pair in json_array(path, "preference dataset"):
            if isinstance(pair, dict):
                tally.add(pair)
    except InputError as exc:
        raise InputError(f"{path}: cannot read the preference dataset: {exc}") from exc
    return tally


def _failure_counts(path: Path, manifest: Manifest) -> Counter[str]:
    """Failures by ``stage: reason`` (the manifest's key format); the manifest's tally when the file is absent."""
    if not path.exists():
        return Counter({k: v for k, v in manifest.failures_by_reason.items() if v})
    counts: Counter[str] = Counter()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{number}: not JSON: {exc}") from exc
        record = record if isinstance(record, dict) else {}
        stage, reason = record.get("stage"), record.get("reason") or "unknown"
        counts[f"{stage}: {reason}" if stage else str(reason)] += 1
    return counts


def _raw(pair: dict[str, Any]) -> dict[str, Any]:
    raw = pair.get("raw")
    return raw if isinstance(raw, dict) else {}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pct(n: float, total: float) -> str:
    return f"{100 * n / total:.0f}%" if total else "n/a"


def _label(key: str) -> str:
    return candidate_label(key)


def _section(title: str, *body: str) -> list[str]:
    return [f"## {title}", "", *(part for text in body for part in (text, ""))]


def _skip(plots: Path, name: str, reason: str) -> str:
    """Drop a stale plot from an earlier report so the folder matches the markdown, and say why there is none."""
    (plots / name).unlink(missing_ok=True)
    return reason


MARGINS = (0.75, 0.25, 0.65, 0.45)  # left, right, bottom, top in inches: room for ticks, axis labels, a title


def _axes(width: float = 7, height: float = 4, counts: str = "y", fit: bool = False) -> tuple[Figure, Any]:
    """A figure of its own (no pyplot state); the ``counts`` axis gets whole-number ticks. matplotlib is imported
    here, at the first plot: it costs 0.5 s, which no command but the report should pay. Fixed margins, unless
    ``fit`` (labels of any length): the constrained layout solver doubles a plot's drawing time (measured:
    four plots 0.73 s against 0.36 s)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, MaxNLocator

    fig = Figure(figsize=(width, height), layout="constrained" if fit else None)
    if not fit:
        left, right, bottom, top = MARGINS
        fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)
    ax = fig.add_subplot()
    axis = getattr(ax, f"{counts}axis")
    axis.set_major_locator(MaxNLocator(integer=True))
    axis.set_major_formatter(EngFormatter(sep=""))  # 22.5k, 1.2M: ticks short enough for the fixed margin
    return fig, ax


def _save(fig: Figure, plots: Path, name: str, alt: str) -> str:
    """Atomic like every other output, with no date metadata; returns the markdown line that shows the plot."""
    path = plots / name
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return f"![{alt}]({PLOTS_DIR}/{name})"


def _bars(ax: Any, labels: list[str], first: list[int], second: list[int], names: tuple[str, str]) -> None:
    """Two series side by side per label (chosen/rejected, or tokens in/out)."""
    import numpy as np

    x = np.arange(len(labels))
    ax.bar(x - 0.2, first, 0.4, label=names[0], color=CHOSEN_COLOUR)
    ax.bar(x + 0.2, second, 0.4, label=names[1], color=REJECTED_COLOUR)
    ax.set_xticks(x, labels)
    ax.legend()


def _summary(manifest: Manifest, failures: Counter[str]) -> list[str]:
    counts, judge, given = manifest.counts, manifest.judge_config(), manifest.counts.model_fields_set
    splits = ", ".join(f"{name}: {n}" for name, n in counts.splits.items())
    dupes, passes = counts.duplicate_prompts, judge.get("passes")
    rate, elapsed = counts.consistency_rate, manifest.timings.elapsed_s
    dupes_text = f" ({dupes} duplicates merged)" if dupes else ""
    passes_text = f", {passes} pass{'es' if passes != 1 else ''}" if passes else ""

    def count(name: str) -> str:
        return str(getattr(counts, name)) if name in given else "n/a"

    rows = [
        ("pairs", count("pairs") + (f" ({splits})" if splits else "")),
        ("unique prompts", f"{count('unique_prompts')}{dupes_text}"),
        ("failures", str(counts.failures if "failures" in given else sum(failures.values()))),
        ("judge mode", f"{judge.get('mode', 'n/a')}{passes_text}"),
        ("consistency rate", "n/a" if rate is None else _pct(rate, 1)),
        ("elapsed", "n/a" if elapsed is None else f"{elapsed:.1f} s"),
    ]
    for role, info in (("policy", manifest.policy), ("judge", manifest.judge)):
        if info.get("model") or info.get("backend"):
            rows.append((role, f"{info.get('backend', '')} `{info.get('model', '')}`".strip()))
    return _section("Summary", "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]))


def _temperature_keys(pairs: PairTally, manifest: Manifest) -> list[str]:
    """Config order first (it is the run's), then any other key seen in the data, by temperature."""
    keys = [candidate_key(t) for t in manifest.config.get("temperatures") or []]
    seen = pairs.seen

    def order(key: str) -> tuple[float, str]:
        t = temperature_of(key)
        return (float("inf") if t is None else t), key

    return keys + sorted(seen - set(keys), key=order)


def _temperatures(pairs: PairTally, manifest: Manifest, plots: Path) -> list[str]:
    """Which temperature wins and loses: a judge that always picks the coldest answer is worth knowing about."""
    name, title = "temperatures.png", "Chosen and rejected by temperature"
    keys = _temperature_keys(pairs, manifest)
    if not pairs.n or not keys:
        return _section(title, _skip(plots, name, NO_PAIRS))
    chosen, rejected = pairs.chosen, pairs.rejected
    fig, ax = _axes()
    _bars(ax, [_label(k) for k in keys], [chosen[k] for k in keys], [rejected[k] for k in keys], CHOICES)
    ax.set(xlabel="candidate", ylabel="pairs", title=title)
    figure = _save(fig, plots, name, title)
    best, worst, n = max(keys, key=lambda k: chosen[k]), max(keys, key=lambda k: rejected[k]), pairs.n
    return _section(
        title,
        figure,
        f"The judge chose the {_label(best)} response in {_pct(chosen[best], n)} of pairs ({chosen[best]} of {n}) "
        f"and rejected the {_label(worst)} response in {_pct(rejected[worst], n)} ({rejected[worst]} of {n}).",
    )


def _positions(pairs: PairTally, plots: Path) -> list[str]:
    """Position bias: small judges often name the first response whatever it says."""
    name, title = "positions.png", "Position in the judge prompt"
    if not pairs.n:
        return _section(title, _skip(plots, name, NO_PAIRS))
    rows = pairs.positions  # (chosen, rejected, shown) -> pairs
    if not rows:
        reason = "Skipped because the pairs do not record where the judge saw each response (`chosen_position`)."
        return _section(title, _skip(plots, name, reason))
    positions = list(range(1, max(max(row) for row in rows) + 1))
    chosen: Counter[int] = Counter()
    rejected: Counter[int] = Counter()
    for (c, r, _), k in rows.items():
        chosen[c] += k
        rejected[r] += k
    fig, ax = _axes()
    _bars(ax, [str(p) for p in positions], [chosen[p] for p in positions], [rejected[p] for p in positions], CHOICES)
    sizes = {n for _, _, n in rows}
    m = sum(rows.values())
    if len(sizes) == 1:
        ax.axhline(m / min(sizes), color="grey", linestyle="--", label="unbiased")
        ax.legend()
    ax.set(xlabel="position shown to the judge", ylabel="pairs", title=title)
    figure = _save(fig, plots, name, title)
    first = chosen[1]
    last = sum(k for (_, r, n), k in rows.items() if r == n)
    if len(sizes) == 1:
        unbiased = f"{_pct(1, min(sizes))} (1/{min(sizes)})"
    else:
        unbiased = f"{_pct(sum(k / n for (_, _, n), k in rows.items()), m)} on average (1/n per pair)"
    text = (
        f"The chosen response stood first in the judge prompt in {_pct(first, m)} of pairs ({first} of {m}); "
        f"an unbiased judge would give {unbiased}. The rejected response stood last in {_pct(last, m)}."
    )
    if m < pairs.n:
        text += f" Only {m} of {pairs.n} pairs record positions."
    return _section(title, figure, text)


def _consistency(pairs: PairTally, manifest: Manifest) -> list[str]:
    """Agreement between two passes in opposite orders is the cheapest check that the judge reads the answers."""
    counts, title = manifest.counts, "Consistency"
    rate = counts.consistency_rate
    if rate is None:
        passes = manifest.judge_config().get("passes")
        why = "the judge ran one pass per prompt" if passes in (None, 1) else "the manifest does not record it"
        return _section(title, f"Not measured: {why}.")
    text = f"Two passes in opposite orders agreed in {_pct(rate, 1)} of judged prompts"
    inconsistent = counts.inconsistent
    if inconsistent is not None:
        text += f"; {inconsistent} prompt{'s were' if inconsistent != 1 else ' was'} inconsistent."
    else:
        text += "."
    if pairs.flagged:
        text += f" {pairs.flagged} of the {pairs.n} pairs kept are marked inconsistent."
    return _section(title, text)


def _failures(failures: Counter[str], plots: Path) -> list[str]:
    """What went wrong, by reason, so a rerun can target the biggest cause."""
    name, title = "failures.png", "Failures"
    if not failures:
        return _section(title, _skip(plots, name, "No failures."))
    ranked = sorted(failures.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ranked[:15]
    if len(ranked) > len(shown):
        shown.append((f"({len(ranked) - len(shown)} other reasons)", sum(n for _, n in ranked[len(shown) :])))
    fig, ax = _axes(8, 1.5 + 0.4 * len(shown), counts="x", fit=True)  # reasons of any length
    labels = [k if len(k) <= 60 else k[:57] + "..." for k, _ in shown]
    ax.barh(labels[::-1], [n for _, n in shown][::-1], color=REJECTED_COLOUR)
    ax.set(xlabel="failures", title=title)
    figure = _save(fig, plots, name, title)
    total, (top, n) = sum(failures.values()), ranked[0]
    return _section(
        title,
        figure,
        f"{total} failures over {len(ranked)} reason{'s' if len(ranked) != 1 else ''}; "
        f'the most common is "{top}" ({n}, {_pct(n, total)}).',
    )


def _lengths(pairs: PairTally, plots: Path) -> list[str]:
    """Verbosity bias: judges tend to prefer the longer answer whatever it says."""
    name, title = "lengths.png", "Response lengths"
    if not pairs.n:
        return _section(title, _skip(plots, name, NO_PAIRS))
    chosen, rejected = pairs.chosen_words, pairs.rejected_words  # words -> responses
    both = sorted(set(chosen) | set(rejected))
    import numpy as np

    bins = np.histogram_bin_edges(both, bins=max(1, min(20, len(both))))  # edges depend on min, max and count
    fig, ax = _axes()
    for counts, label, colour in ((chosen, "chosen", CHOSEN_COLOUR), (rejected, "rejected", REJECTED_COLOUR)):
        ax.hist(list(counts), bins=bins, weights=list(counts.values()), alpha=0.6, label=label, color=colour)
    ax.set(xlabel="words", ylabel="responses", title=title)
    ax.legend()
    figure = _save(fig, plots, name, title)
    n, longer, ties = pairs.n, pairs.longer, pairs.ties
    mean_chosen = sum(w * k for w, k in chosen.items()) / n
    mean_rejected = sum(w * k for w, k in rejected.items()) / n
    text = (
        f"The chosen response is longer in {_pct(longer, n)} of pairs ({longer} of {n}; 50% is neutral, more "
        f"suggests a verbosity bias). Mean length: {mean_chosen:.1f} words chosen, {mean_rejected:.1f} rejected."
    )
    if ties:
        text += f" {ties} pair{'s' if ties != 1 else ''} tie."
    return _section(title, figure, text)


def _usage(manifest: Manifest, plots: Path) -> list[str]:
    """Cost and load: tokens, requests and where adaptive concurrency settled, per role."""
    name, title = "tokens.png", "Requests and tokens"
    stats = manifest.stats
    tokens, concurrency = stats.tokens, stats.concurrency
    counted = {"requests": stats.requests, "retries": stats.retries, "cached": stats.cached}
    found = {k.rsplit("_", 1)[0] for k in tokens} | set(concurrency)
    found |= {role for part in counted.values() for role in part}
    roles = [r for r in ROLES if r in found] + sorted(found - set(ROLES))
    if not roles:
        return _section(title, _skip(plots, name, "Skipped because the manifest records no request statistics."))
    header = "| role | requests | retries | cached | prompt tokens | completion tokens |\n|---|---|---|---|---|---|"
    table = [header] + [
        f"| {r} | "
        + " | ".join(f"{part.get(r, 0):,}" for part in counted.values())
        + f" | {tokens.get(f'{r}_prompt', 0):,} | {tokens.get(f'{r}_completion', 0):,} |"
        for r in roles
    ]
    body = []
    if any(tokens.values()):
        fig, ax = _axes(6)
        ins, outs = [tokens.get(f"{r}_prompt", 0) for r in roles], [tokens.get(f"{r}_completion", 0) for r in roles]
        _bars(ax, roles, ins, outs, ("prompt (in)", "completion (out)"))
        ax.set(ylabel="tokens", title="Tokens per role")
        body.append(_save(fig, plots, name, "Tokens per role"))
        reads = "; ".join(
            f"the {r} read {i:,} and wrote {o:,} tokens" for r, i, o in zip(roles, ins, outs, strict=True)
        )
        body.append(reads[0].upper() + reads[1:] + ".")
    else:
        body.append(_skip(plots, name, "Token plot skipped because the run recorded no token counts."))
    body.append("\n".join(table))
    settled = [
        f"{c.get('limit')} for the {r} (ceiling {c.get('ceiling')}, lowest {c.get('lowest')}, "
        f"{c.get('decreases', 0)} decreases, peak {c.get('peak_in_flight')} in flight)"
        for r in roles
        if isinstance(c := concurrency.get(r), dict) and c.get("limit") is not None
    ]
    if settled:
        body.append("Concurrency settled at " + " and ".join(settled) + ".")
    return _section(title, *body)


def _chosen_prob(pairs: PairTally, plots: Path) -> list[str]:
    """How sure the judge was, when it reported a probability; absent in runs that did not ask for one."""
    name, title = "chosen_prob.png", "Judge confidence"
    probs = pairs.probs
    if not probs:
        (plots / name).unlink(missing_ok=True)
        return []
    import numpy as np

    fig, ax = _axes(6)
    ax.hist(probs, bins=np.linspace(0, 1, 11), color=CHOSEN_COLOUR)
    ax.set(xlabel="chosen_prob", ylabel="pairs", title=title)
    return _section(
        title,
        _save(fig, plots, name, title),
        f"The mean chosen_prob is {sum(probs) / len(probs):.2f} over {len(probs)} of {pairs.n} pairs "
        f"(min {min(probs):.2f}, max {max(probs):.2f}).",
    )
