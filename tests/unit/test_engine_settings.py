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
