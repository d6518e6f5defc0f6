"""The one validated configuration object of a run, built from CLI flags, a YAML file or Python.

Secrets are ``SecretStr`` so that printing, logging or dumping a config can never reveal a key; the manifest
is written from :meth:`RunConfig.public_dict`, which drops them entirely.
"""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import InputError
from .template import PromptTemplate

DEFAULT_TEMPERATURES = (0.01, 0.51, 1.01, 1.51)
DEFAULT_JUDGE_URL = "https://integrate.api.nvidia.com/v1/chat/completions"
DEFAULT_JUDGE_MODEL = "mistralai/mixtral-8x7b-instruct-v0.1"
DEFAULT_OUTPUT_DIR = "caiforge-out"

# Where each role's API key comes from when the config names none: the one place the environment is read.
KEY_ENV = {"policy": "CAIFORGE_POLICY_API_KEY", "judge": "NGC_API_KEY"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class Sampling(_Frozen):
    """The seed's inference flags; sent to NeMo as is, mapped to OpenAI fields where they exist."""

    tokens_to_generate: int = Field(1024, ge=1)
    min_tokens_to_generate: int = Field(1, ge=0)
    add_bos: bool = False
    top_k: int = Field(50, ge=0)
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    all_probs: bool = False
    repetition_penalty: float = Field(1.0, gt=0.0)
    greedy: bool = False
    end_strings: tuple[str, ...] | None = ("<extra_id_1>",)  # None: not sent (NeMo then stops at <|endoftext|>)


class PolicyConfig(_Frozen):
    """Who writes the candidates. ``backend=None`` is resolved by :meth:`RunConfig._resolve_backends`."""

    backend: str | None = None  # a kind of caiforge.backends (validated there)
    url: str | None = None  # the first of ``urls``
    urls: tuple[str, ...] = ()  # every endpoint (--policy-url repeated): interchangeable replicas
    model: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    servers: tuple[str, ...] = ()  # NeMo: every host:port (--nemo-servers h1:p1,h2:p2); host/port: the first
    batch_size: int = Field(128, ge=1)
    concurrency: int | None = Field(None, ge=1)
    rpm: float | None = Field(None, gt=0)
    api_key: SecretStr | None = None
    sampling: Sampling = Sampling()
    output_retries: int = Field(3, ge=0)  # resends of a request whose reply was unusable (no text, no pattern)
    # NeMo, for chats of several turns: True renders them with the template (--user_format, ...); False sends
    # them as message lists and the server applies its tokenizer's chat template (the SL seed's default).
    apply_chat_template: bool = True


class JudgeConfig(_Frozen):
    """Who labels the pairs: an OpenAI-compatible chat endpoint (NGC/NIM, vLLM, ...) or the local model."""

    backend: str | None = None
    url: str | None = None  # the first of ``urls``
    urls: tuple[str, ...] = ()  # every endpoint (--judge-url repeated)
    model: str = DEFAULT_JUDGE_MODEL
    api_key: SecretStr | None = None
    concurrency: int | None = Field(None, ge=1)  # None: the backend's default (64 remote, 1 local)
    rpm: float | None = Field(None, gt=0)
    max_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(0.0, ge=0.0, le=1.0)
    parse_retries: int = Field(3, ge=0)  # asks again, with another seed, when a reply holds no valid decision
    output_retries: int = Field(0, ge=0)  # the judge's re-asks are parse_retries (a new seed each time)
    mode: Literal["whole", "principle", "principle-cot"] = "whole"
    passes: int = Field(1, ge=1, le=2)
    layout: Literal["caiforge", "seed"] = "caiforge"
    structured: Literal["auto", "off"] = "auto"


def _endpoint_list(section: Any, role: str) -> Any:
    """``url`` may be given as a list (YAML, Python, --policy-url repeated): ``urls`` holds them all, ``url`` the
    first, so code that needs one endpoint keeps working. NeMo's ``servers`` likewise sets ``host``/``port``."""
    if not isinstance(section, dict):
        return section
    out = dict(section)
    url = out.get("url")
    if isinstance(url, (list, tuple)):
        if not url:
            raise ValueError(f"{role}.url: an empty list of endpoints")
        out["urls"], out["url"] = tuple(url), url[0]
    elif out.get("urls") and not url:
        out["url"] = out["urls"][0]
    servers = out.get("servers")
    if isinstance(servers, str):
        servers = [s for s in (p.strip() for p in servers.split(",")) if s]
    if servers:
        parsed = [_host_port(s, role) for s in servers]
        out["servers"] = tuple(f"{h}:{p}" for h, p in parsed)
        out.setdefault("host", parsed[0][0])
        out.setdefault("port", parsed[0][1])
    return out


def _host_port(text: str, role: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{role}: NeMo server {text!r} is not host:port (e.g. 127.0.0.1:5656)")
    return host, int(port)


class LocalConfig(_Frozen):
    """The embedded llama.cpp model: the bundled SmolLM2-135M-Instruct unless ``model_path`` is given."""

    model_path: Path | None = None
    threads: int | None = Field(None, ge=1)
    n_ctx: int = Field(4096, ge=512)


def file_name_part(value: str, what: str) -> str:
    """Names that become part of an output file name must not climb out of the output folder."""
    if any(bad in value for bad in ("/", "\\", "\0")) or value in (".", ".."):
        raise ValueError(f"{what} {value!r} cannot contain '/', '\\' or NUL, nor be '.' or '..'")
    return value


class BlendSpec(_Frozen):
    """The seed's ``--blend-with``: a name, then per split the external prompts and comparisons files."""

    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return file_name_part(value, "blend name")

    splits: dict[str, dict[Literal["prompts", "comparisons"], tuple[Path, ...]]]


class BudgetConfig(_Frozen):
    """Prices (dollars per million tokens, for ``plan`` and ``--max-cost``) and the budgets that stop a run
    cleanly, resumably, once this invocation has used them up (tokens as the servers report them)."""

    price_in: float | None = Field(None, ge=0)
    price_out: float | None = Field(None, ge=0)
    max_cost: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _priced(self) -> BudgetConfig:
        if self.max_cost is not None and (self.price_in is None or self.price_out is None):
            raise ValueError("--max-cost needs --price-in and --price-out (dollars per million tokens)")
        return self

    def cost(self, tokens_in: float, tokens_out: float) -> float | None:
        """Dollars for these tokens at the prices, or None without both prices: ``plan``'s and ``--max-cost``'s."""
        if self.price_in is None or self.price_out is None:
            return None
        return (tokens_in * self.price_in + tokens_out * self.price_out) / 1e6


class ReviseConfig(_Frozen):
    """``caiforge revise`` (SL-CAI): NeMo-Aligner's ``generate_sl_cai_dataset.py`` settings, same names."""

    few_shot_path: Path | None = None  # None: the bundled dialogs (or the instruction file's llm-swarm dialogs)
    instructions_path: Path | None = None  # None: the bundled critique/revision instructions
    output_filepath: Path | None = None  # None: <output_dir>/cai_revisions_aligner_chat_template.jsonl
    revisions: int = Field(1, ge=1, le=16)  # critique/revision rounds; the paper went up to 4
    num_examples: int = -1  # the first N input records (-1: all), counted as the seed counts them
    temperature: float = Field(1.0, ge=0.0)  # the seed's one temperature (its default is greedy anyway)
    save_to_file_interval: int = Field(1, ge=1)  # accepted: the store keeps every step as it is answered
    helpfulness_path: Path | None = None  # NeMo SFT JSONL blended in (the seed requires it; optional here)
    pairs: bool = False  # also preference pairs (revision chosen, initial rejected) from half of each split
    max_seq_length: int | None = Field(None, ge=1)  # removed_long_dialogs/: dialogs over this many tokens left out
    tokenizer_model: Path | None = None  # a tokenizer.json or a .gguf (counts the tokens)
    tokenizer_library: str | None = None  # huggingface (tokenizer.json) or gguf; inferred from the file

    @field_validator("num_examples")
    @classmethod
    def _num_examples(cls, value: int) -> int:
        if value < -1 or value == 0:
            raise ValueError("must be -1 (all) or a positive number of input records")
        return value


# The SL seed's inference and template defaults, which differ from the RL seed's (docs/research/sl-cai-compat.md):
# laid under the YAML file and the flags of `caiforge revise`, and under :func:`revise_config`'s argument.
SL_DEFAULTS: dict[str, Any] = {
    "policy": {
        "batch_size": 32,
        "apply_chat_template": False,
        "sampling": {
            "top_k": 1,
            "top_p": 0.9,
            "repetition_penalty": 1.2,
            "greedy": True,  # tokens_to_generate: 1024 for both seeds (Sampling's default), so not set here: the
            "end_strings": None,  # bundled local model keeps its short cap (backends/local.py) unless a flag sets it
        },
    },
    "template": {
        "user_format": "",
        "assistant_format": "",
        "system_format": None,
        "system_default_message": None,
        "bos_token": None,
        "eos_token": None,
        "response_extract_pattern": "[/INST]",
    },
}
DEFAULT_REVISE_DIR = "caiforge-revise"


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``, mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def revise_config(data: dict[str, Any]) -> RunConfig:
    """A ``revise`` config: the SL seed's defaults under ``data``; the run's folder is the SFT file's unless
    named or the current one (the seed's ``cai_output/`` always lands beside the SFT file)."""
    data = merged(SL_DEFAULTS, data)
    revise = data.get("revise") or {}
    if "output_dir" not in data:
        out = revise.get("output_filepath") if isinstance(revise, dict) else None
        parent = Path(out).parent if out else Path(".")
        # A bare file name (the seed's usual call) keeps the run's files out of the current folder.
        data["output_dir"] = parent if parent != Path(".") else Path(DEFAULT_REVISE_DIR)
    return build_config(data)


class RunConfig(_Frozen):
    prompts_path: Path | None = None
    constitution_path: Path | None = None
    output_dir: Path = Path(DEFAULT_OUTPUT_DIR)
    output_filename_prefix: str = "cai_rlaif"
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "test": 0.2})
    shuffle: bool = True
    seed: int = 1234
    blend_with: BlendSpec | None = None
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    template: PromptTemplate = PromptTemplate()
    policy: PolicyConfig = PolicyConfig()
    judge: JudgeConfig = JudgeConfig()
    local: LocalConfig = LocalConfig()
    request_timeout: float = Field(300.0, gt=0)
    max_retries: int = Field(8, ge=0)
    retry_backoff: float = Field(0.5, ge=0.0)  # seconds; the n-th retry waits up to retry_backoff * 2**(n-1)
    max_failure_rate: float = Field(0.5, gt=0.0, le=1.0)
    adaptive_concurrency: bool = True
    on_bad_record: Literal["error", "skip"] = "error"
    quiet: bool = False
    formats: tuple[str, ...] = ("nemo-rm", "trl")  # the seed's files are always written besides
    engine: Literal["local", "ray"] = "local"  # ray: the same pipeline sharded over a Ray cluster's actors
    ray_address: str | None = None  # None: a local Ray instance; "auto": the cluster `ray start` made
    ray_actors: int | None = Field(None, ge=1)  # None: one per two CPUs of the cluster, at least one
    revise: ReviseConfig = ReviseConfig()
    budget: BudgetConfig = BudgetConfig()

    @field_validator("formats", mode="before")
    @classmethod
    def _formats(cls, value: Any) -> tuple[str, ...]:
        values = [value] if isinstance(value, str) else list(value)
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"formats must be names, got {value!r}")
        return parse_formats(values)

    @field_validator("temperatures")
    @classmethod
    def _temperatures(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) < 2:
            raise ValueError("need at least two temperatures: the judge compares candidates")
        if len(set(value)) != len(value):
            raise ValueError(f"temperatures must be distinct, got {list(value)}")
        if any(t < 0 or not math.isfinite(t) for t in value):
            raise ValueError(f"temperatures must be finite and >= 0, got {list(value)}")
        return value

    @field_validator("output_filename_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return file_name_part(value, "output filename prefix") if value else value

    @field_validator("splits")
    @classmethod
    def _splits(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("at least one split is needed")
        for name, ratio in value.items():
            if not name or not isinstance(name, str):
                raise ValueError(f"split names must be non-empty strings, got {name!r}")
            file_name_part(name, "split name")
            if not 0 < ratio <= 1:
                raise ValueError(f"split {name!r} has ratio {ratio}; each ratio must be in (0, 1]")
        total = sum(value.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, they sum to {total:g}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _keys_and_endpoint_lists(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for role, env in KEY_ENV.items():
            section = data.get(role)
            if isinstance(section, BaseModel):
                continue
            section = dict(section or {})
            if section.get("api_key") is None and os.environ.get(env):
                section = {**section, "api_key": os.environ[env]}
            data = {**data, role: _endpoint_list(section, role)}
        return data

    @model_validator(mode="after")
    def _resolve_backends(self) -> RunConfig:
        from . import backends  # the registry: kinds, their inference and defaults (one file per kind)

        policy, judge = backends.resolve("policy", self.policy), backends.resolve("judge", self.judge)
        if self.blend_with is not None:
            missing = sorted(set(self.splits) - set(self.blend_with.splits))
            extra = sorted(set(self.blend_with.splits) - set(self.splits))
            if missing or extra:
                raise ValueError(
                    f"--blend-with must name exactly the splits of --splits {sorted(self.splits)}; "
                    f"missing {missing}, unknown {extra}"
                )
        object.__setattr__(self, "policy", _all_endpoints(policy))
        object.__setattr__(self, "judge", _all_endpoints(judge))
        return self

    def public_dict(self, pipeline: str = "rl-cai") -> dict[str, Any]:
        """Everything that shaped the run, for the manifest, with every secret removed; a pipeline's sections
        only (``revise`` has no judge, ``run`` no revise settings)."""
        unused = {"revise"} if pipeline != "sl-cai" else {"judge", "temperatures"}
        exclude: dict[str, Any] = {"policy": {"api_key"}, "judge": {"api_key"}} | dict.fromkeys(unused, True)
        data = self.model_dump(mode="json", exclude=exclude)
        data["policy"]["api_key_set"] = self.policy.api_key is not None
        if "judge" in data:
            data["judge"]["api_key_set"] = self.judge.api_key is not None
        return data


def _all_endpoints(section: Any) -> Any:
    """Every endpoint listed, the defaults included: one endpoint is a list of one."""
    if section.backend == "nemo":
        return section.model_copy(update={"servers": section.servers or (f"{section.host}:{section.port}",)})
    if section.url and not section.urls:
        return section.model_copy(update={"urls": (section.url,)})
    return section


# The trainer formats (caiforge.formats writes them; it checks that its registry holds exactly these).
FORMAT_NAMES = ("nemo-rm", "nemo-dpo", "nemo-rl", "trl", "trl-kto")


def parse_formats(values: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``--format a,b --format c`` -> ("a", "b", "c"), validated, in the order given, without repeats."""
    names: list[str] = []
    for value in values:
        for name in (v.strip() for v in value.split(",")):
            if not name:
                continue
            if name not in FORMAT_NAMES:
                raise ValueError(f"unknown format {name!r}; choose from {', '.join(FORMAT_NAMES)}")
            if name not in names:
                names.append(name)
    return tuple(names)


def literal(text: str, flag: str) -> Any:
    """Parse a Python/JSON literal typed by the user (never model output), as the seed's flags expect."""
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        raise InputError(f"{flag}: not a valid literal: {text!r} ({exc.__class__.__name__})") from exc


def parse_splits(text: str) -> dict[str, float]:
    value = literal(text, "--splits")
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise InputError(
            f"--splits: expected a dict of split name to ratio, e.g. \"{{'train': 0.8, 'test': 0.2}}\", got {text!r}"
        )
    try:
        return {k: float(v) for k, v in value.items()}
    except OverflowError as exc:
        raise InputError(f"--splits: a ratio is too large: {text[:80]!r}") from exc


def parse_blend_with(text: str) -> BlendSpec:
    """The seed's blend dict; single paths are allowed where lists are expected, as in the seed."""
    value = literal(text, "--blend-with")
    example = "{'name': 'hh', 'train': {'prompts': [...], 'comparisons': [...]}, 'test': {...}}"
    if not isinstance(value, dict):
        raise InputError(f"--blend-with: expected a dict like {example}, got {type(value).__name__}")
    name = value.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InputError("--blend-with: needs a non-empty 'name'")
    splits: dict[str, dict[str, tuple[Path, ...]]] = {}
    for split, blend in value.items():
        if split == "name":
            continue
        if not isinstance(split, str):
            raise InputError(f"--blend-with: split names must be strings, got {split!r}")
        if not isinstance(blend, dict) or set(blend) != {"prompts", "comparisons"}:
            raise InputError(f"--blend-with: split {split!r} must have exactly the keys 'prompts' and 'comparisons'")
        entry: dict[str, tuple[Path, ...]] = {}
        for kind, files in blend.items():
            files = [files] if isinstance(files, str) else files
            if not isinstance(files, (list, tuple)) or not all(isinstance(f, str) for f in files) or not files:
                raise InputError(f"--blend-with: {split}.{kind} must be a path or a non-empty list of paths")
            entry[kind] = tuple(Path(f) for f in files)
        splits[split] = entry
    try:
        return BlendSpec.model_validate({"name": name, "splits": splits})
    except ValidationError as exc:
        raise InputError(f"--blend-with: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from exc


def build_config(data: dict[str, Any]) -> RunConfig:
    """Validate, turning pydantic's report into one readable line per problem."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg}" if where else msg)
        raise InputError("invalid configuration: " + "; ".join(problems)) from exc


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml  # only with --config: 25 ms of every start otherwise

    from .inputs import read_text  # late: inputs imports nothing from here, but keep the graph one-way

    text = read_text(path, "config")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{path}:{where} invalid YAML: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config file must hold a mapping at the top level")
    return data
