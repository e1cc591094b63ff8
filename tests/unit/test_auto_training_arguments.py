"""TrainingArgs.from_training_arguments reads a Transformers TrainingArguments as its DeepSpeed integration
does; hidden_size_of reads the model's (or its config's) hidden size."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from infinity.config import Config, Precision, TrainingArgs
from infinity.config.auto import hidden_size_of

transformers = pytest.importorskip("transformers", reason="the transformers package is not installed")


def arguments(tmp_path, **more):
    values = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=3e-4, adam_beta2=0.95,
                  weight_decay=0.1, max_grad_norm=0.5, per_device_train_batch_size=3, gradient_accumulation_steps=4)
    return transformers.TrainingArguments(**{**values, **more})


def test_every_value_auto_takes(tmp_path):
    args = TrainingArgs.from_training_arguments(arguments(tmp_path, warmup_steps=0.1), hidden_size=64, max_steps=50)
    assert args == TrainingArgs(learning_rate=3e-4, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
                                weight_decay=0.1, max_grad_norm=0.5, per_device_train_batch_size=3,
                                gradient_accumulation_steps=4, world_size=1, hidden_size=64,
                                precision=Precision.FP32, warmup_steps=5, max_steps=50)


def test_steps_come_from_max_steps_when_the_run_is_not_given(tmp_path):
    assert TrainingArgs.from_training_arguments(arguments(tmp_path, max_steps=7)).max_steps == 7
    assert TrainingArgs.from_training_arguments(arguments(tmp_path)).max_steps is None


def test_bf16_enables_bf16_and_a_config_resolves(tmp_path):
    args = TrainingArgs.from_training_arguments(arguments(tmp_path, bf16=True), hidden_size=32, max_steps=10)
    assert args.precision is Precision.BF16
    config = Config.load("hf-zero3-nvme", args=args)
    assert config.pending_auto == [] and config.bf16.enabled is True and config.fp16.enabled is False
    assert config.train_batch_size == 12 and config.zero_optimization.reduce_bucket_size == 32 * 32


def test_hidden_size_of_models_and_configs():
    assert hidden_size_of(transformers.GPT2Config(n_embd=48)) == 48
    assert hidden_size_of(SimpleNamespace(config=transformers.T5Config(d_model=40))) == 40
    assert hidden_size_of(SimpleNamespace(config=SimpleNamespace(hidden_sizes=[8, 16, 12]))) == 16
    assert hidden_size_of(SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(hidden_size=24)))) == 24
    assert hidden_size_of(object()) is None
