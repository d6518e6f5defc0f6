"""NeMo's text-generation server (``megatron_gpt_eval.py``): ``PUT /generate`` with a batch of sentences.

The server echoes prompt + completion; the response is cut out with the template's extract pattern and eos
token, as the seed does. Temperature gets the seed's +1e-8 so that 0 is accepted.
"""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from ..errors import BadModelOutput, TransientError
from .base import Completion
from .checks import check_nemo
from .http import HttpClient


class NemoPolicy:
    default_concurrency = 4  # the server works through batches one at a time; a few keep it busy

    def __init__(self, cfg: RunConfig) -> None:
        self._cfg = cfg
        self._template = cfg.template
        self._sampling = cfg.policy.sampling
        self.max_batch_size = cfg.policy.batch_size
        self.url = f"http://{cfg.policy.host}:{cfg.policy.port}/generate"
        self._http = HttpClient(cfg.request_timeout)

    async def check(self) -> str | None:
        await check_nemo(self._http, self.url)
        return None

    def adaptations(self) -> tuple[dict[str, Any], list[str]]:
        return {"url": self.url}, []

    def identity(self) -> dict[str, Any]:
        # Named by --policy-model, not by address: a server restarted elsewhere must not void hours of work.
        model = self._cfg.policy.model or "nemo"
        return {
            "backend": "nemo",
            "model": model,
            "template": self._template.model_dump(),
            "sampling": self._sampling.model_dump(mode="json"),
        }

    async def generate(self, prompts: list[str], temperature: float) -> list[Completion | BadModelOutput]:
        s = self._sampling
        payload = {
            "sentences": [self._template.format_prompt(p) for p in prompts],
            "tokens_to_generate": s.tokens_to_generate,
            "temperature": temperature + 1e-8,
            "add_BOS": s.add_bos,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "greedy": s.greedy,
            "all_probs": s.all_probs,
            "repetition_penalty": s.repetition_penalty,
            "min_tokens_to_generate": s.min_tokens_to_generate,
            "end_strings": list(s.end_strings),
        }
        data = await self._http.request_json("PUT", self.url, payload)
        sentences = data.get("sentences")
        if not isinstance(sentences, list) or len(sentences) != len(prompts):
            got = len(sentences) if isinstance(sentences, list) else type(sentences).__name__
            raise TransientError(f"PUT {self.url}: expected {len(prompts)} sentences, got {got}")
        out: list[Completion | BadModelOutput] = []
        for sentence in sentences:
            response = self._template.extract_response(sentence) if isinstance(sentence, str) else None
            if response is None:
                out.append(
                    BadModelOutput(
                        f"response pattern {self._template.response_extract_pattern!r} not in the generated text"
                    )
                )
            else:
                out.append(Completion(response))
        return out

    async def aclose(self) -> None:
        await self._http.aclose()
