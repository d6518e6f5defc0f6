"""What an OpenAI-compatible server turned out not to take, learned from its refusals and kept for the run.

Servers differ in what they accept: vLLM takes ``response_format: json_schema``, llama-cpp-python only
``json_object`` with a ``schema`` (and answers anything else with HTTP 500), OpenAI itself rejects ``top_k``.
Sending the same body again after such a refusal cannot succeed, so instead of retrying, the endpoint steps
down once (a simpler structured-output form, or a sampling field left out) and every later request is built
that way. What changed is reported in the summary and the manifest.
"""

from __future__ import annotations

from typing import Any

from ..errors import Refused

# The structured-output ladder, most to least constraining.
STRUCTURED_FORMS = ("json_schema", "json_object", "text")
# Fields a request can do without: a strict server's refusal drops them instead of failing every request.
OPTIONAL_FIELDS = ("top_k", "repetition_penalty", "seed", "min_tokens", "logprobs", "top_logprobs")
_TOGETHER = {"logprobs": ("logprobs", "top_logprobs"), "top_logprobs": ("logprobs", "top_logprobs")}


def response_format(form: str, schema: dict[str, Any]) -> dict[str, Any] | None:
    if form == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "decision", "schema": schema}}
    if form == "json_object":  # llama.cpp's and Anyscale's form: the schema rides along and is enforced
        return {"type": "json_object", "schema": schema}
    return None


class EndpointAdapter:
    def __init__(self, role: str, url: str, structured: bool = True) -> None:
        self.role, self.url = role, url
        self.form = STRUCTURED_FORMS[0] if structured else "text"
        self.dropped: set[str] = set()
        self.notes: list[str] = []

    def build(self, payload: dict[str, Any], schema: dict[str, Any] | None = None) -> dict[str, Any]:
        """The request as this server takes it."""
        out = {k: v for k, v in payload.items() if k not in self.dropped}
        if schema is not None and (fmt := response_format(self.form, schema)) is not None:
            out["response_format"] = fmt
        return out

    def adapt(self, refused: Refused, sent: dict[str, Any]) -> bool:
        """Step down after a refusal of ``sent``; False when there is nothing left to leave out."""
        changed = False
        if "response_format" in refused.fields and "response_format" in sent:
            was = sent["response_format"].get("type")
            if was == self.form:  # not already stepped down by a concurrent request
                self.form = STRUCTURED_FORMS[STRUCTURED_FORMS.index(self.form) + 1]
                then = "plain text" if self.form == "text" else f"{self.form} with a schema"
                self.notes.append(
                    f"{self.role} {self.url}: the server refused response_format {was} (HTTP {refused.status}); "
                    f"asking for {then} from now on"
                )
            changed = True
        for name in sorted(refused.fields - {"response_format"}):
            if name not in OPTIONAL_FIELDS or name not in sent:
                continue
            new = [f for f in _TOGETHER.get(name, (name,)) if f not in self.dropped]
            if new:
                self.dropped.update(new)
                self.notes.append(
                    f"{self.role} {self.url}: the server refused {name} (HTTP {refused.status}); "
                    f"sending requests without {' and '.join(new)}"
                )
            changed = True
        return changed

    def report(self, structured: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "dropped_fields": sorted(self.dropped)}
        if structured:
            out["structured_output"] = self.form
        return out
