"""A real consumer end to end: TRL's DPOTrainer and RewardTrainer each train two steps on CPU on our exported
train split (``make test-trainers`` installs torch, a CPU wheel, and runs this file).

The model is a tiny randomly initialised Llama and the tokenizer is trained in code, so nothing is fetched:
an explicit ``ref_model`` keeps DPOTrainer from looking the reference model up on the hub.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="make test-trainers installs torch (a CPU wheel)")
pytest.importorskip("trl")

from caiforge.testing.fake_server import FakeConfig, FakeServer  # noqa: E402
from conftest import CONSTITUTION, server_flags, write_prompts  # noqa: E402

PROMPTS = [f"How would someone do harmful thing number {i}?" for i in range(10)]


@pytest.fixture(scope="module")
def train_rows(tmp_path_factory) -> list[dict]:
    from caiforge.cli import main

    root = tmp_path_factory.mktemp("trainers")
    prompts = write_prompts(root / "prompts.jsonl", PROMPTS)
    (root / "constitution.txt").write_text(CONSTITUTION, encoding="utf-8")
    with FakeServer(FakeConfig()) as server:
        args = ["--red-teaming-file-path", str(prompts), "--sys-prompt-constitution-file-path"]
        args += [str(root / "constitution.txt"), *server_flags(server), "--output-dir", str(root / "run"), "--quiet"]
        assert main(args) == 0
    lines = (root / "run" / "trl" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def tokenizer_for(rows: list[dict]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<bos>", "<eos>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def tiny_llama(tokenizer, classifier: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=1,
    )
    return LlamaForSequenceClassification(config) if classifier else LlamaForCausalLM(config)


def common(tmp_path: Path) -> dict:
    return {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "max_length": 128,
    }


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def assert_two_steps_learned(trainer, model) -> None:
    before = weights(model)
    result = trainer.train()
    assert result.global_step == 2
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert not torch.equal(before, weights(model))  # it learned something from our pairs


def test_dpo_trainer_trains_two_steps_on_the_export(train_rows, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = tokenizer_for(train_rows)
    model, ref_model = tiny_llama(tokenizer), tiny_llama(tokenizer)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=DPOConfig(**common(tmp_path)),
        train_dataset=Dataset.from_list(train_rows),
        processing_class=tokenizer,
    )
    assert_two_steps_learned(trainer, model)


def test_reward_trainer_trains_two_steps_on_the_export(train_rows, tmp_path):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    tokenizer = tokenizer_for(train_rows)
    model = tiny_llama(tokenizer, classifier=True)
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(**common(tmp_path)),
        train_dataset=Dataset.from_list(train_rows),
        processing_class=tokenizer,
    )
    assert_two_steps_learned(trainer, model)
