"""The chat prompt template, with exactly the semantics of NeMo-Aligner's ``UserAssistantPromptTemplate``.

Outputs must be byte-identical to the seed's so that a NeMo user can switch tools without retraining on a
different format; hence the odd rules (a system turn is always emitted when a system format exists, the
response is cut at the *last* occurrence of the extract pattern and of the eos token).
"""

from __future__ import annotations

import itertools

from pydantic import BaseModel, ConfigDict, field_validator

from .errors import InputError

MESSAGE = "{MESSAGE}"


def unescape(value: str) -> str:
    """Turn ``\\n`` typed on a command line into a newline, as the seed's ``_process_string`` does."""
    try:  # latin-1 + backslashreplace keeps non-ASCII text intact (the seed's utf-8 round trip garbles it)
        return value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as exc:
        raise InputError(f"cannot unescape template value {value!r}: {exc}") from exc


def _unbrace(text: str) -> str:
    return text.replace("{{", "{").replace("}}", "}")


class PromptTemplate(BaseModel):
    """NeMo's ``<extra_id_*>`` chat format by default; every field maps to the seed flag of the same name."""

    model_config = ConfigDict(frozen=True, defer_build=True)

    user_format: str = "<extra_id_1>User\n{MESSAGE}\n<extra_id_1>Assistant\n"
    assistant_format: str = "{MESSAGE}\n"
    system_format: str | None = "<extra_id_0>System\n{MESSAGE}\n"
    system_default_message: str | None = ""
    bos_token: str | None = None
    eos_token: str | None = "<extra_id_1>"
    response_extract_pattern: str | None = "<extra_id_1>Assistant\n"

    @field_validator("user_format", "assistant_format", "system_format")
    @classmethod
    def _one_placeholder(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return value
        if value.count(MESSAGE) != 1:
            raise ValueError(f"must contain {MESSAGE} exactly once, got {value!r}")
        return value

    def _format(self, role_format: str | None, content: str) -> str:
        """``str.format(MESSAGE=content)`` as the seed, but braces in the *content* cannot break it."""
        before, after = (role_format or MESSAGE).split(MESSAGE)
        return _unbrace(before) + content + _unbrace(after)

    def format_turns(self, user: str, assistant: str | None = None) -> str:
        """The prompt (and optionally its response) as the seed's ``format_messages`` renders them."""
        text = self.bos_token or ""
        if self.system_format and self.system_default_message is not None:
            text += self._format(self.system_format, self.system_default_message)
        text += self._format(self.user_format, user)
        if assistant is not None:
            text += self._format(self.assistant_format, assistant)
        return text

    def format_prompt(self, user: str) -> str:
        return self.format_turns(user)

    def format_messages(self, messages: list[dict[str, str]]) -> str:
        """A whole conversation (few-shot turns, critiques, revisions), as the seed's ``format_messages``: the
        system turn first when the template has one, then each turn in its role's format. Roles must alternate,
        user first (the seed asserts it); a system message leads only when it is the first."""
        roles = [m["role"].lower() for m in messages]
        body = messages
        if roles and roles[0] == "system":
            if not self.system_format:
                raise ValueError("a system turn was given but the template has no system format")
            system: str | None = messages[0]["content"]
            body, roles = messages[1:], roles[1:]
        else:
            system = self.system_default_message
        if not roles or roles[0] != "user" or any(a == b for a, b in itertools.pairwise(roles)):
            raise ValueError(f"turns must alternate user/assistant from a user turn, got {roles}")
        if any(r not in ("user", "assistant") for r in roles):
            raise ValueError(f"only user and assistant turns follow the system turn, got {roles}")
        text = self.bos_token or ""
        if self.system_format and system is not None:
            text += self._format(self.system_format, system)
        for role, m in zip(roles, body, strict=True):
            text += self._format(self.user_format if role == "user" else self.assistant_format, m["content"])
        return text

    def format_with_response(self, user: str, response: str) -> str:
        """Prompt + response + eos, the comparison line NeMo's reward-model trainer reads."""
        text = self.format_turns(user, response).strip()
        if self.eos_token and not text.endswith(self.eos_token):
            text += self.eos_token
        return text

    def extract_response(self, generated: str) -> str | None:
        """Cut the response out of prompt+completion; ``None`` when the pattern is missing."""
        if self.response_extract_pattern is None:
            return generated.strip()
        message = generated.strip()
        at = message.rfind(self.response_extract_pattern)
        if at < 0:
            return None
        response = message[at + len(self.response_extract_pattern) :].strip()
        if self.eos_token:
            eos_at = response.rfind(self.eos_token)
            if eos_at >= 0:
                response = response[:eos_at]
        return response

    def strip_eos(self, completion: str) -> str:
        """A completion alone (OpenAI servers return no prompt echo): trim at the eos token, then space."""
        text = completion
        if self.eos_token:
            at = text.find(self.eos_token)
            if at >= 0:
                text = text[:at]
        return text.strip()
