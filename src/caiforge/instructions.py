"""The SL-CAI inputs besides the prompts: critique/revision instructions and few-shot dialogs, read and checked.

Three instruction forms are read, told apart by their shape:

- NeMo-Aligner's ``{"harmful0": {"prompt": ["\\n\\nCritiqueRequest: ...\\n\\nCritique:"], "edit_request":
  "\\n\\nRevisionRequest: ...\\n\\nRevision:"}, ...}``, its markers stripped in the seed's order (suffix, then
  prefix), so what is sent and recorded is the seed's text;
- llm-swarm's ``{"constitutions": [{"critic", "revision"}], "system_chat": [[messages]]}``, whose dialogs are the
  few-shot turns when no few-shot file is given;
- a plain YAML (or JSON) list of ``{critique, revision}``.

Few-shot dialogs are NeMo's ``{"samples": [[{"role", "content"}, ...]]}`` (roles User/Assistant in any case) or
an llm-swarm file. Every problem is one line naming the file, the entry and what is wrong (exit code 2).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .inputs import read_text
from .request import Message

NEMO_KEY = re.compile(r"harmful(\d+)")
CRITIQUE_MARKERS = ("\n\nCritique:", "\n\nCritiqueRequest: ")  # (suffix, prefix), stripped as the seed does
REVISION_MARKERS = ("\n\nRevision:", "\n\nRevisionRequest: ")


@dataclass(frozen=True)
class Instruction:
    critique: str
    revision: str


@dataclass(frozen=True)
class Instructions:
    items: tuple[Instruction, ...]
    few_shot: tuple[Message, ...] = ()  # an llm-swarm file's dialogs, flattened
    form: str = "list"  # "nemo", "llm-swarm" or "list": said in the manifest


def _strip(text: str, markers: tuple[str, str]) -> str:
    suffix, prefix = markers
    return text.removesuffix(suffix).removeprefix(prefix)


def _load(path: Path, what: str) -> Any:
    text = read_text(path, what)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml  # only for YAML inputs: 25 ms of every start otherwise

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{mark.line + 1}:" if mark is not None else ""
            raise InputError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc


def _text(path: Path, entry: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{path}: {entry}: expected a non-empty string, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _keys(path: Path, entry: str, value: Any, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"{path}: {entry}: expected an object with keys {sorted(keys)}, got {_shown(value)}")
    if set(value) != keys:
        missing, extra = sorted(keys - set(value)), sorted(set(value) - keys)
        raise InputError(
            f"{path}: {entry}: expected exactly the keys {sorted(keys)} (missing {missing}, unknown {extra})"
        )
    return value


def _turn(path: Path, entry: str, value: Any) -> dict[str, Any]:
    """A dialog turn: ``role`` and ``content`` (other keys, such as NeMo's ``label``, are allowed and unused)."""
    if not isinstance(value, dict) or not {"role", "content"} <= set(value):
        got = sorted(value) if isinstance(value, dict) else _shown(value)
        raise InputError(f"{path}: {entry}: expected an object with 'role' and 'content', got {got}")
    return value


def load_instructions(path: Path) -> Instructions:
    data = _load(path, "critique/revision instructions")
    if isinstance(data, dict) and data and all(NEMO_KEY.fullmatch(str(k)) for k in data):
        return Instructions(_nemo(path, data), form="nemo")
    if isinstance(data, dict) and "constitutions" in data:
        return _llm_swarm(path, data)
    if isinstance(data, list):
        if not data:
            raise InputError(f"{path}: the list of critique/revision instructions is empty")
        return Instructions(_pairs(path, data, "entry {}", "critique"), form="list")
    raise InputError(
        f'{path}: not a critique/revision instruction file: expected NeMo\'s {{"harmful0": {{"prompt": [...], '
        '"edit_request": ...}}}}, llm-swarm\'s {"constitutions": [...]}, or a list of {critique, revision}'
    )


def _pairs(path: Path, entries: list[Any], where: str, critique: str) -> tuple[Instruction, ...]:
    """``[{critique, revision}]`` (llm-swarm names the first ``critic``), each text stripped."""
    items = []
    for i, entry in enumerate(entries):
        at = where.format(i)
        e = _keys(path, at, entry, {critique, "revision"})
        items.append(
            Instruction(
                _text(path, f"{at}.{critique}", e[critique]).strip(),
                _text(path, f"{at}.revision", e["revision"]).strip(),
            )
        )
    return tuple(items)


def _nemo(path: Path, data: dict[str, Any]) -> tuple[Instruction, ...]:
    expected = list(range(len(data)))
    missing = [i for i in expected if f"harmful{i}" not in data]
    if missing:
        odd = sorted(set(data) - {f"harmful{i}" for i in expected})
        raise InputError(
            f"{path}: keys must run harmful0 to harmful{len(data) - 1}, as NeMo's script reads them; "
            f"harmful{missing[0]} is missing (found {', '.join(odd)})"
        )
    items = []
    for i in expected:
        entry = f"harmful{i}"
        e = _keys(path, entry, data[entry], {"prompt", "edit_request"})
        prompt = e["prompt"]
        if not isinstance(prompt, list) or len(prompt) != 1:
            raise InputError(f"{path}: {entry}.prompt: expected a list of one string, got {_shown(prompt)}")
        critique = _strip(_text(path, f"{entry}.prompt[0]", prompt[0]), CRITIQUE_MARKERS)
        revision = _strip(_text(path, f"{entry}.edit_request", e["edit_request"]), REVISION_MARKERS)
        items.append(
            Instruction(_text(path, f"{entry}.prompt[0]", critique), _text(path, f"{entry}.edit_request", revision))
        )
    return tuple(items)


def _llm_swarm(path: Path, data: dict[str, Any]) -> Instructions:
    unknown = sorted(set(data) - {"constitutions", "system_chat"})
    if unknown:
        raise InputError(f"{path}: unknown top-level keys {unknown} (llm-swarm's file has constitutions, system_chat)")
    entries = data["constitutions"]
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{path}: constitutions: expected a non-empty list of {{critic, revision}}")
    items = _pairs(path, entries, "constitutions[{}]", "critic")
    few_shot = _dialogs(path, "system_chat", data["system_chat"]) if "system_chat" in data else ()
    return Instructions(tuple(items), few_shot, form="llm-swarm")


def load_few_shot(path: Path) -> tuple[Message, ...]:
    """Every dialog's turns, flattened into one message list as both seeds send them."""
    data = _load(path, "few-shot dialogs")
    if isinstance(data, dict) and "samples" in data:
        return _dialogs(path, "samples", data["samples"])
    if isinstance(data, dict) and "system_chat" in data:
        return _dialogs(path, "system_chat", data["system_chat"])
    raise InputError(f'{path}: not a few-shot file: expected {{"samples": [[{{"role", "content"}}, ...]]}}')


def _dialogs(path: Path, key: str, dialogs: Any) -> tuple[Message, ...]:
    if not isinstance(dialogs, list):
        raise InputError(f"{path}: {key}: expected a list of dialogs, got {_shown(dialogs)}")
    turns: list[Message] = []
    for d, dialog in enumerate(dialogs):
        where = f"{key}[{d}]"
        if not isinstance(dialog, list) or not dialog:
            raise InputError(f"{path}: {where}: expected a non-empty list of {{role, content}} turns")
        for t, turn in enumerate(dialog):
            e = _turn(path, f"{where}[{t}]", turn)
            role = e["role"].lower() if isinstance(e["role"], str) else e["role"]
            expected = "user" if t % 2 == 0 else "assistant"
            if role != expected:
                raise InputError(
                    f"{path}: {where}[{t}].role: expected {expected!r} (turns alternate, user first), "
                    f"got {_shown(e['role'])}"
                )
            turns.append({"role": role, "content": _text(path, f"{where}[{t}].content", e["content"])})
        if len(dialog) % 2:
            raise InputError(f"{path}: {where}: a dialog must end with the assistant's turn ({len(dialog)} turns)")
    return tuple(turns)
