"""Content keys: a request is identified by everything that determines its answer, and nothing else.

A rerun looks finished work up by these keys, so a changed setting only redoes what it affects and an
unchanged one is never sent again (curator's cache-key rule: the model and every generation parameter).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_key(kind: str, **parts: Any) -> str:
    blob = json.dumps({"kind": kind, **parts}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
