"""``--max-seq-length``: the SL seed's ``removed_long_dialogs/`` files, with tokenizers that install from PyPI.

The seed tokenizes with NeMo (``get_nmt_tokenizer`` + ``GPTSFTChatDataset``), which needs NeMo installed. Here a
dialog's tokens are counted with a Hugging Face ``tokenizers`` file (``tokenizer.json``) or a GGUF model's own
vocabulary (llama.cpp, vocabulary only): the system text plus every turn's text. A dialog is left out when that
count exceeds the limit. (The seed leaves one out only when the prompt alone fills the window; NeMo's chat
template adds a few tokens a turn, so leave a margin.) As in the seed, ``--output-filepath`` keeps every line
and ``removed_long_dialogs/`` holds the kept ones and the statistics; each left-out CAI prompt is also a failure
with its reason.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import InputError
from .outputs import write_json, write_stream

DIR = "removed_long_dialogs"
STATISTICS_FILE = "remove_long_dialogs_statistics.json"
HF = ("huggingface", "tokenizers", "hf")
GGUF = ("gguf", "llama.cpp", "llama_cpp")
TokenCount = Callable[[str], int]


def load_counter(path: Path | None, library: str | None) -> TokenCount:
    """A token counter, checked now: a wrong file or library stops the run before any request."""
    if path is None:
        raise InputError("--max-seq-length needs --tokenizer-model: a tokenizer.json or a .gguf model")
    if not path.exists():
        raise InputError(f"{path}: --tokenizer-model not found")
    lib = (library or ("gguf" if path.suffix.lower() == ".gguf" else "huggingface")).lower()
    if lib in GGUF:
        return _gguf(path)
    if lib in HF:
        return _hf(path / "tokenizer.json" if path.is_dir() else path)
    raise InputError(
        f"--tokenizer-library {library}: not available here (NeMo's tokenizers need NeMo); give a Hugging Face "
        "tokenizer.json with --tokenizer-library huggingface, or a .gguf model with --tokenizer-library gguf"
    )


def _hf(path: Path) -> TokenCount:
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise InputError(
            "--tokenizer-library huggingface needs the tokenizers package: pip install tokenizers"
        ) from exc
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception for a malformed file
        raise InputError(f"{path}: not a Hugging Face tokenizer file: {str(exc)[:120]}") from exc
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def _gguf(path: Path) -> TokenCount:
    try:
        from llama_cpp import Llama
        from llama_cpp._utils import suppress_stdout_stderr
    except ImportError as exc:
        raise InputError("--tokenizer-library gguf needs caiforge[local] (llama-cpp-python)") from exc
    try:
        # A vocabulary alone has no training context, which llama.cpp's C side warns about on stderr.
        with suppress_stdout_stderr(disable=False):
            llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    except Exception as exc:  # llama-cpp-python raises ValueError or RuntimeError for an unreadable file
        raise InputError(f"{path}: not a GGUF model llama.cpp can read: {str(exc)[:120]}") from exc
    return lambda text: len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def dialog_tokens(record: dict[str, Any], count: TokenCount) -> int:
    return count(str(record.get("system") or "")) + sum(count(str(t["value"])) for t in record["conversations"])


def remove_long(source: Path, max_length: int, count: TokenCount) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """The seed's ``removed_long_dialogs/`` beside ``source``: the kept lines and the statistics. Returns the
    statistics and each left-out CAI record's (prompt, tokens)."""
    out_dir = source.parent / DIR
    output = out_dir / f"{source.stem}_remove_long_dialogs_max_seq_{max_length}{source.suffix}"
    removed: list[int] = []
    lengths: Counter[int] = Counter()
    cai: list[tuple[str, int]] = []

    def kept() -> Iterator[str]:
        with source.open(encoding="utf-8") as lines:
            for i, line in enumerate(lines):
                record = json.loads(line)
                n = dialog_tokens(record, count)
                lengths[n] += 1
                if n <= max_length:
                    yield line
                    continue
                removed.append(i)
                if record.get("dataset") == "sl_cai_samples":
                    cai.append((str(record["conversations"][0]["value"]), n))

    write_stream(output, kept())
    stats = {
        "output_file": str(output),
        "num_removed_ids": len(removed),
        "removed_ids": removed,
        "length_statistics": {str(k): v for k, v in sorted(lengths.items())},
    }
    write_json(out_dir / STATISTICS_FILE, stats)
    return stats, cai
