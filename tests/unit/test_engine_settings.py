"""EngineSettings built by hand obey the same nvme_path rule as a Config (config/rules.py, one rule)."""
import pytest

from infinity.errors import ConfigError
from infinity.swap.params import Tier
from infinity.zero.settings import EngineSettings


def test_an_nvme_tier_without_its_folder_is_refused_naming_the_key_and_the_fix():
    with pytest.raises(ConfigError) as caught:
        EngineSettings(param_tier=Tier.NVME, optimizer_tier=Tier.NVME, param_nvme_path="swap")
    message = str(caught.value)
    assert "zero_optimization.offload_optimizer.nvme_path" in message and "offload_param.nvme_path" not in message
    assert "set zero_optimization.offload_optimizer.nvme_path to a folder" in message


def test_settings_that_name_their_folders_are_accepted(tmp_path):
    s = EngineSettings(param_tier=Tier.NVME, optimizer_tier=Tier.HOST, param_nvme_path=str(tmp_path))
    assert s.param_nvme_path == str(tmp_path) and s.optimizer_nvme_path is None


OPTIMIZER = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}


@pytest.mark.parametrize("extra", [{}, {"gradient_accumulation_steps": 4}], ids=["none", "accumulation-only"])
def test_a_config_without_either_batch_key_is_refused_naming_both_as_deepspeed(extra):
    """DeepSpeed 0.19 (runtime/config.py, _set_batch_related_parameters): "Either train_batch_size or
    train_micro_batch_size_per_gpu needs to be provided", gradient_accumulation_steps alone included."""
    from infinity.config import Config
    from infinity.zero.from_config import settings_from_config

    with pytest.raises(ConfigError) as caught:
        settings_from_config(Config.load({**OPTIMIZER, **extra}), world=1)
    message = str(caught.value)
    assert "train_micro_batch_size_per_gpu" in message and "train_batch_size" in message
    assert 'add "train_micro_batch_size_per_gpu": N' in message


@pytest.mark.parametrize("given, want", [({"train_micro_batch_size_per_gpu": 3}, (3, 1, 6)),
                                         ({"train_batch_size": 8}, (4, 1, 8)),
                                         ({"train_batch_size": 16, "gradient_accumulation_steps": 2}, (4, 2, 16))])
def test_either_batch_key_alone_is_enough_and_the_rest_derived_as_deepspeed(given, want):
    from infinity.config import Config
    from infinity.zero.from_config import settings_from_config

    s = settings_from_config(Config.load({**OPTIMIZER, **given}), world=2)
    assert (s.micro_batch_size, s.gradient_accumulation_steps, s.train_batch_size) == want


def test_transformers_arguments_fill_the_batch_keys_a_config_leaves_out():
    """The Trainer's path: "auto" (or a key left out) takes per_device_train_batch_size and the accumulation."""
    from infinity.config import Config, TrainingArgs
    from infinity.zero.from_config import settings_from_config

    args = TrainingArgs(per_device_train_batch_size=2, gradient_accumulation_steps=3, world_size=1, learning_rate=1e-4)
    for cfg in ({**OPTIMIZER}, {**OPTIMIZER, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}):
        s = settings_from_config(Config.load(cfg, args=args), world=1)
        assert (s.micro_batch_size, s.gradient_accumulation_steps, s.train_batch_size) == (2, 3, 6)
