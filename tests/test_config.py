"""RunConfig: parsing the seed's literal flags, resolving backends, hiding secrets, and the CLI's flag mapping.

Every flag of NeMo-Aligner's ``generate_rl_cai_dataset.py`` is accepted with its exact spelling, so the CLI
tests below parse real seed command lines with ``caiforge.cli.parser()`` and check the config they build.
"""

import json
from pathlib import Path

import pytest

from caiforge.cli import config_from_args, parser
from caiforge.config import (
    DEFAULT_JUDGE_MODEL,
    DEFAULT_TEMPERATURES,
    BlendSpec,
    build_config,
    parse_blend_with,
    parse_splits,
)
from caiforge.errors import InputError

NVIDIA_URL = "https://integrate.api.nvidia.com/v1/chat/completions"
SECRET = "nvapi-Sup3rS3cret-0123456789"


@pytest.fixture(autouse=True)
def no_ngc_key_in_environment(monkeypatch):
    """The developer's own NGC_API_KEY must not leak into tests of the CLI mapping."""
    monkeypatch.delenv("NGC_API_KEY", raising=False)


# --- --splits ------------------------------------------------------------------------------------------------


def test_parse_splits_reads_the_seeds_python_dict():
    assert parse_splits("{'train': 0.8, 'test': 0.2}") == {"train": 0.8, "test": 0.2}


def test_parse_splits_accepts_json_and_turns_integer_ratios_into_floats():
    splits = parse_splits('{"all": 1}')
    assert splits == {"all": 1.0}
    assert isinstance(splits["all"], float)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[0.8, 0.2]", "expected a dict"),
        ("0.8", "expected a dict"),
        ("{'train': 'most'}", "expected a dict"),
        ("{'train': True}", "expected a dict"),
        ("{1: 1.0}", "expected a dict"),
        ("train=0.8,test=0.2", "not a valid literal"),
        ("{'train': 0.8, 'test': 0.2", "not a valid literal"),
        ("__import__('os').getcwd()", "not a valid literal"),
    ],
)
def test_bad_splits_strings_are_input_errors_naming_the_flag(text, fragment):
    with pytest.raises(InputError, match="--splits") as info:
        parse_splits(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("splits", "fragment"),
    [
        ("{'train': 0.7, 'test': 0.2}", "sum to 1, they sum to 0.9"),
        ("{'train': 1.0, 'test': 0.0}", "ratio 0.0"),
        ("{'train': 1.5, 'test': -0.5}", "ratio 1.5"),
        ("{}", "at least one split"),
    ],
)
def test_ratios_that_do_not_make_a_partition_are_rejected_by_build_config(splits, fragment):
    with pytest.raises(InputError, match="invalid configuration") as info:
        build_config({"splits": parse_splits(splits)})
    assert fragment in str(info.value)


# --- --blend-with --------------------------------------------------------------------------------------------


def test_parse_blend_with_turns_single_paths_into_tuples():
    spec = parse_blend_with(
        "{'name': 'hh', 'train': {'prompts': 'hh/train_p.jsonl', 'comparisons': ['a.jsonl', 'b.jsonl']},"
        " 'test': {'prompts': ['hh/test_p.jsonl'], 'comparisons': 'hh/test_c.jsonl'}}"
    )
    assert spec == BlendSpec(
        name="hh",
        splits={
            "train": {"prompts": (Path("hh/train_p.jsonl"),), "comparisons": (Path("a.jsonl"), Path("b.jsonl"))},
            "test": {"prompts": (Path("hh/test_p.jsonl"),), "comparisons": (Path("hh/test_c.jsonl"),)},
        },
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("['hh', 'a.jsonl']", "expected a dict"),
        ("{'train': {'prompts': 'a', 'comparisons': 'b'}}", "non-empty 'name'"),
        ("{'name': '  ', 'train': {'prompts': 'a', 'comparisons': 'b'}}", "non-empty 'name'"),
        ("{'name': 'hh', 'train': {'prompts': 'a'}}", "exactly the keys 'prompts' and 'comparisons'"),
        ("{'name': 'hh', 'train': {'prompts': 'a', 'comparisons': 'b', 'extra': 'c'}}", "exactly the keys"),
        ("{'name': 'hh', 'train': ['a', 'b']}", "exactly the keys"),
        ("{'name': 'hh', 'train': {'prompts': [], 'comparisons': 'b'}}", "non-empty list of paths"),
        ("{'name': 'hh', 'train': {'prompts': [1], 'comparisons': 'b'}}", "non-empty list of paths"),
        ("{'name': 'hh',", "not a valid literal"),
    ],
)
def test_bad_blend_with_strings_are_input_errors(text, fragment):
    with pytest.raises(InputError, match="--blend-with") as info:
        parse_blend_with(text)
    assert fragment in str(info.value)


def test_blend_with_must_name_exactly_the_configured_splits():
    spec = parse_blend_with("{'name': 'hh', 'train': {'prompts': 'p', 'comparisons': 'c'}}")
    with pytest.raises(InputError, match=r"missing \['test'\]"):
        build_config({"splits": {"train": 0.8, "test": 0.2}, "blend_with": spec})
    assert build_config({"splits": {"train": 1.0}, "blend_with": spec}).blend_with == spec


# --- backend resolution --------------------------------------------------------------------------------------


def test_nothing_configured_means_the_local_policy_and_the_local_judge():
    cfg = build_config({})
    assert (cfg.policy.backend, cfg.judge.backend) == ("local", "local")
    assert cfg.judge.url is None


def test_a_policy_url_means_an_openai_chat_policy():
    cfg = build_config({"policy": {"url": "http://127.0.0.1:8000/v1", "model": "llama"}})
    assert cfg.policy.backend == "openai-chat"
    assert cfg.policy.url == "http://127.0.0.1:8000/v1"


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        ({"url": "http://127.0.0.1:8000/v1"}, "needs --policy-model"),
        ({"backend": "openai-completions", "model": "m"}, "needs --policy-url"),
    ],
)
def test_an_openai_policy_needs_both_url_and_model(policy, fragment):
    with pytest.raises(InputError, match=fragment):
        build_config({"policy": policy})


@pytest.mark.parametrize(
    ("policy", "host", "port"),
    [
        ({"host": "gpu-node"}, "gpu-node", 5656),
        ({"port": 9000}, "localhost", 9000),
        ({"host": "gpu-node", "port": 9000}, "gpu-node", 9000),
        ({"backend": "nemo"}, "localhost", 5656),
    ],
)
def test_a_host_or_port_means_a_nemo_policy_with_the_seeds_defaults(policy, host, port):
    cfg = build_config({"policy": policy})
    assert (cfg.policy.backend, cfg.policy.host, cfg.policy.port) == ("nemo", host, port)


def test_a_judge_url_means_an_openai_judge_at_that_url():
    cfg = build_config({"judge": {"url": "http://127.0.0.1:8001/v1"}})
    assert (cfg.judge.backend, cfg.judge.url) == ("openai", "http://127.0.0.1:8001/v1")


def test_an_api_key_alone_means_the_nvidia_endpoint_with_the_seeds_model():
    cfg = build_config({"judge": {"api_key": SECRET}})
    assert (cfg.judge.backend, cfg.judge.url, cfg.judge.model) == ("openai", NVIDIA_URL, DEFAULT_JUDGE_MODEL)
    assert cfg.judge.api_key.get_secret_value() == SECRET


def test_an_explicit_openai_judge_without_url_gets_the_nvidia_endpoint():
    assert build_config({"judge": {"backend": "openai"}}).judge.url == NVIDIA_URL


def test_an_explicit_local_judge_stays_local_even_with_a_key():
    cfg = build_config({"judge": {"backend": "local", "api_key": SECRET}})
    assert (cfg.judge.backend, cfg.judge.url) == ("local", None)


def test_unknown_settings_are_reported_in_one_readable_line():
    with pytest.raises(InputError) as info:
        build_config({"polcy": {"host": "x"}, "seed": "not a number"})
    message = str(info.value)
    assert "\n" not in message
    assert "polcy: Extra inputs are not permitted" in message
    assert "seed:" in message


# --- secrets -------------------------------------------------------------------------------------------------


def keyed_config():
    return build_config(
        {
            "judge": {"api_key": SECRET},
            "policy": {"url": "http://127.0.0.1:8000/v1", "model": "m", "api_key": SECRET + "-policy"},
        }
    )


def test_public_dict_never_contains_a_key_but_says_one_was_set():
    public = keyed_config().public_dict()
    dumped = json.dumps(public)
    assert "Sup3rS3cret" not in dumped
    assert "api_key" not in public["judge"]
    assert "api_key" not in public["policy"]
    assert (public["judge"]["api_key_set"], public["policy"]["api_key_set"]) == (True, True)


def test_public_dict_says_no_key_was_set_when_none_was():
    public = build_config({}).public_dict()
    assert (public["judge"]["api_key_set"], public["policy"]["api_key_set"]) == (False, False)


def test_printing_or_dumping_a_config_never_shows_a_key():
    cfg = keyed_config()
    for text in (repr(cfg), str(cfg), repr(cfg.judge), cfg.model_dump_json(), f"{cfg}"):
        assert "Sup3rS3cret" not in text
    assert cfg.judge.api_key.get_secret_value() == SECRET  # still there for the requests that need it


# --- the CLI's mapping of the seed's flags -------------------------------------------------------------------

SEED_COMMAND_LINE = [
    "--batch-size", "16",
    "--red-teaming-file-path", "f",
    "--sys-prompt-constitution-file-path", "c",
    "--ngc-api-key", "K",
    "--ngc-url", "U",
    "--ngc-model", "M",
    "--splits", "{'train': 0.5, 'test': 0.5}",
    "--shuffle", "False",
    "--add_bos", "True",
    "--top_k", "1",
    "--end_strings", "<extra_id_1>", "</s>",
    "--user_format", "[INST] {MESSAGE} [/INST]",
    "--eos_token", "</s>",
    "--response_extract_pattern", "[/INST]",
    "--temperature", "0.7",
    "--tokens_to_generate", "64",
    "--host", "h",
    "--port", "1234",
]  # fmt: skip


def cli_config(*argv):
    return config_from_args(parser().parse_args(["run", *argv]))


def test_the_seeds_command_line_maps_onto_the_config():
    cfg, fresh = cli_config(*SEED_COMMAND_LINE)
    assert fresh is False
    assert (cfg.prompts_path, cfg.constitution_path) == (Path("f"), Path("c"))
    assert (cfg.judge.backend, cfg.judge.url, cfg.judge.model) == ("openai", "U", "M")
    assert cfg.judge.api_key.get_secret_value() == "K"
    assert (cfg.policy.backend, cfg.policy.host, cfg.policy.port, cfg.policy.batch_size) == ("nemo", "h", 1234, 16)
    assert cfg.splits == {"train": 0.5, "test": 0.5}
    assert cfg.shuffle is False
    sampling = cfg.policy.sampling
    assert (sampling.add_bos, sampling.top_k, sampling.tokens_to_generate) == (True, 1, 64)
    assert sampling.end_strings == ("<extra_id_1>", "</s>")
    assert cfg.template.user_format == "[INST] {MESSAGE} [/INST]"
    assert (cfg.template.eos_token, cfg.template.response_extract_pattern) == ("</s>", "[/INST]")
    assert cfg.template.assistant_format == "{MESSAGE}\n"  # untouched flags keep the seed's defaults


def test_the_seeds_temperature_flag_is_accepted_but_the_sweep_is_used_as_in_the_seed():
    cfg, _ = cli_config(*SEED_COMMAND_LINE)
    assert cfg.temperatures == DEFAULT_TEMPERATURES == (0.01, 0.51, 1.01, 1.51)


def test_seed_flags_that_are_left_out_keep_the_seeds_defaults():
    cfg, _ = cli_config("--red-teaming-file-path", "f", "--host", "localhost")  # the seed always uses NeMo
    assert (cfg.policy.backend, cfg.policy.port, cfg.policy.batch_size) == ("nemo", 5656, 128)
    assert cfg.splits == {"train": 0.8, "test": 0.2}
    assert (cfg.shuffle, cfg.seed, cfg.output_filename_prefix) == (True, 1234, "cai_rlaif")
    sampling = cfg.policy.sampling
    assert (sampling.top_k, sampling.top_p, sampling.tokens_to_generate) == (50, 0.95, 1024)
    assert sampling.end_strings == ("<extra_id_1>",)


def test_template_flags_are_unescaped_so_backslash_n_is_a_newline():
    cfg, _ = cli_config("--user_format", "a\\nb{MESSAGE}", "--end_strings", "\\n\\nUser:", "--eos_token", "\\t")
    assert cfg.template.user_format == "a\nb{MESSAGE}"
    assert cfg.policy.sampling.end_strings == ("\n\nUser:",)
    assert cfg.template.eos_token == "\t"


def test_a_template_flag_without_the_placeholder_is_an_input_error():
    with pytest.raises(InputError, match="user_format"):
        cli_config("--user_format", "[INST] [/INST]")


@pytest.mark.parametrize(("text", "value"), [("True", True), ("true", True), ("False", False), ("false", False)])
def test_boolean_flags_take_the_seeds_spellings(text, value):
    cfg, _ = cli_config("--shuffle", text, "--greedy", text)
    assert (cfg.shuffle, cfg.policy.sampling.greedy) == (value, value)


def test_a_misspelt_boolean_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["run", "--shuffle", "Flase"])
    assert info.value.code == 2
    assert "expected True or False" in capsys.readouterr().err


def test_flags_override_the_config_file_and_the_rest_of_the_file_is_kept(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "splits: {train: 0.9, test: 0.1}\n"
        "seed: 7\n"
        "policy:\n  host: yaml-host\n  port: 1111\n  batch_size: 8\n"
        "judge:\n  model: yaml/model\n"
        "template:\n  eos_token: '</s>'\n",
        encoding="utf-8",
    )
    cfg, _ = cli_config("--config", str(yaml_file), "--port", "2222", "--splits", "{'all': 1.0}", "--ngc-model", "M")
    assert (cfg.policy.host, cfg.policy.port, cfg.policy.batch_size) == ("yaml-host", 2222, 8)
    assert cfg.splits == {"all": 1.0}
    assert cfg.judge.model == "M"
    assert (cfg.seed, cfg.template.eos_token) == (7, "</s>")


def test_a_broken_config_file_is_an_input_error_naming_it(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("policy: [unclosed\n", encoding="utf-8")
    with pytest.raises(InputError, match="invalid YAML"):
        cli_config("--config", str(yaml_file))


def test_an_empty_section_in_the_config_file_does_not_crash_a_flag_that_fills_it(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("policy:\n  # host: set me\n", encoding="utf-8")
    try:
        cfg, _ = cli_config("--config", str(yaml_file), "--host", "h")
    except InputError:
        return  # a clean one-line usage error is acceptable too
    assert cfg.policy.host == "h"


def test_the_ngc_api_key_comes_from_the_environment_when_the_flag_is_absent(monkeypatch):
    monkeypatch.setenv("NGC_API_KEY", SECRET)
    cfg, _ = cli_config("--red-teaming-file-path", "f")
    assert cfg.judge.api_key.get_secret_value() == SECRET
    assert (cfg.judge.backend, cfg.judge.url) == ("openai", NVIDIA_URL)


def test_the_ngc_api_key_flag_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("NGC_API_KEY", "from-environment")
    cfg, _ = cli_config("--ngc-api-key", "from-flag")
    assert cfg.judge.api_key.get_secret_value() == "from-flag"


def test_without_key_or_url_the_judge_is_local():
    cfg, _ = cli_config("--red-teaming-file-path", "f")
    assert cfg.judge.backend == "local"
    assert cfg.judge.api_key is None


def test_fresh_is_reported_separately_from_the_config():
    _, fresh = cli_config("--fresh")
    assert fresh is True


def test_blend_with_flag_is_parsed_and_checked_against_the_splits():
    blend = "{'name': 'hh', 'train': {'prompts': 'p.jsonl', 'comparisons': 'c.jsonl'}}"
    cfg, _ = cli_config("--splits", "{'train': 1.0}", "--blend-with", blend)
    assert cfg.blend_with.splits["train"]["comparisons"] == (Path("c.jsonl"),)
    with pytest.raises(InputError, match="--blend-with must name exactly the splits"):
        cli_config("--blend-with", blend)  # default splits are train and test


def test_every_run_flag_reaches_the_config():
    """A flag that parses but maps to nothing would be silently ignored: every dest must be handled."""
    from caiforge.cli import FLAT, SPECIAL, TEMPLATE, parser
    from caiforge.config import Sampling

    SAMPLING = set(Sampling.model_fields)

    run = next(a for a in parser()._subparsers._group_actions[0].choices.items() if a[0] == "run")[1]
    dests = {action.dest for action in run._actions if action.dest != "help"}
    handled = set(FLAT) | set(SAMPLING) | set(TEMPLATE) | set(SPECIAL)
    assert dests - handled == set()


@pytest.mark.parametrize(
    ("flags", "path", "expected"),
    [
        (["--judge-rpm", "40"], ("judge", "rpm"), 40.0),
        (["--policy-rpm", "600"], ("policy", "rpm"), 600.0),
        (["--max-failure-rate", "0.9"], ("max_failure_rate",), 0.9),
        (["--retry-backoff", "0.01"], ("retry_backoff",), 0.01),
        (["--fixed-concurrency"], ("adaptive_concurrency",), False),
        (["--local-threads", "3"], ("local", "threads"), 3),
        (["--judge-parse-retries", "0"], ("judge", "parse_retries"), 0),
    ],
)
def test_resilience_flags_map_onto_the_config(flags, path, expected):
    from caiforge.cli import config_from_args, parser

    cfg, _ = config_from_args(parser().parse_args(["run", *flags]))
    value = cfg
    for part in path:
        value = getattr(value, part)
    assert value == expected
