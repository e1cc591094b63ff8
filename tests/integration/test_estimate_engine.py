"""infinity-estimate's NVMe rows against what a real engine allocates for the same model and config."""
from __future__ import annotations

import pytest
import torch

import infinity
from infinity import Config
from infinity.config import OffloadDevice
from infinity.estimate import Cluster, ModelSize, ZeroInit, count_module, estimate
from infinity.cli.train import DEFAULT_SPEC
from infinity.config.training import Precision
from infinity.models.gpt import Gpt, GptSpec
from infinity.train import TrainJob, build_model, load_config

from test_shapes import CONFIGS, shipped

NVME = OffloadDevice.NVME
SPEC = GptSpec(vocab=512, context=16, hidden=256, layers=2, heads=4)  # largest parameter: 4h x h = 262144
LARGEST = 4 * SPEC.hidden * SPEC.hidden


def config(path, precision: str, sub_group_size: int) -> dict:
    offload = {"device": "nvme", "nvme_path": str(path)}
    mixed = {precision: {"enabled": True}} if precision != "fp32" else {}
    return mixed | {
        "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 3, "sub_group_size": sub_group_size, "stage3_param_persistence_threshold": 0,
                              "offload_param": offload | {"buffer_count": 3, "buffer_size": 1_000_000, "max_in_cpu": 0},
                              "offload_optimizer": offload | {"buffer_count": 4}}}


def engine_and_estimate(tmp_path, cfg):
    torch.manual_seed(0)
    model = Gpt(SPEC)
    # built outside zero.Init: the engine writes the parameters itself (fp32 ones into their master ranges)
    row = next(r for r in estimate(count_module(model), Cluster(), Config.load(cfg)).rows
               if (r.option.offload_param, r.option.offload_optimizer, r.option.zero_init) == (NVME, NVME, ZeroInit.OFF))
    engine, *_ = infinity.initialize(model=model, config=cfg)
    try:
        return engine.memory_report(), row.need
    finally:
        engine.close()


@pytest.mark.parametrize("precision, param_bytes", [("bf16", 2), ("fp32", 4)])
def test_pools_and_swap_files_are_what_the_engine_allocates(tmp_path, precision, param_bytes):
    # sub_group_size below the largest parameter: every sub-group buffer holds that parameter
    report, need = engine_and_estimate(tmp_path, config(tmp_path, precision, 100_000))
    assert need.host_parts["param_pool"] == 3 * LARGEST * param_bytes
    assert need.host_parts["optimizer_pool"] == 4 * 3 * LARGEST * 4
    assert report.host_pool_bytes == need.host_parts["param_pool"] + need.host_parts["optimizer_pool"]
    assert abs(report.nvme_bytes - need.nvme_per_node) <= 0.01 * report.nvme_bytes  # extents' 4096-byte padding


def test_sub_groups_of_whole_parameters_stay_within_the_estimate(tmp_path):
    report, need = engine_and_estimate(tmp_path, config(tmp_path, "bf16", 600_000))
    estimated = need.host_parts["param_pool"] + need.host_parts["optimizer_pool"]
    # whole parameters fill a sub-group to at most sub_group_size, so the estimate is an upper bound, and close
    assert report.host_pool_bytes <= estimated <= 1.2 * report.host_pool_bytes


def pools_and_estimate(model, cfg: Config, size: ModelSize | None = None) -> tuple[int, int]:
    """(the engine's pool bytes, the estimate's pools) for model (of size, if it was built under zero.Init)
    under cfg, the estimate's row the config's."""
    row = next(r for r in estimate(size or count_module(model), Cluster(), cfg).rows
               if r.chosen and r.option.zero_init is ZeroInit.ON)
    engine, *_ = infinity.initialize(model=model, config=cfg)
    try:
        pools = engine.memory_report().host_pool_bytes
    finally:
        engine.close()
    return pools, row.need.host_parts.get("param_pool", 0) + row.need.host_parts.get("optimizer_pool", 0)


@pytest.mark.parametrize("name", ["nvme-local", "cpu-offload", "hf-zero3-nvme"])
def test_every_shipped_config_gets_the_pools_the_estimate_says(tmp_path, name):
    """As shipped (bf16; the HF config's "auto" filled): one sub-group, so the optimizer pool is buffer_count
    buffers, not buffer_count x pipeline depth; with no NVMe, no pools on either side."""
    torch.manual_seed(0)
    pools, estimated = pools_and_estimate(Gpt(SPEC), shipped(name, tmp_path, Precision.BF16))
    assert abs(pools - estimated) <= 0.1 * max(pools, 1), (pools, estimated)
    assert (pools == 0) == (name == "cpu-offload")


def test_the_main_jobs_pools_are_what_the_estimate_says(tmp_path):
    """scripts/main: infinity-train's GPT with the shipped nvme-local config, built under zero.Init as it does."""
    job = TrainJob(config=str(CONFIGS / "nvme-local.json"), spec=DEFAULT_SPEC, nvme_path=str(tmp_path))
    config = load_config(job)
    with torch.device("meta"):
        size = count_module(Gpt(DEFAULT_SPEC))  # the model zero.Init builds has placeholders for parameters
    pools, estimated = pools_and_estimate(build_model(job, config), config, size)
    assert abs(pools - estimated) <= 0.1 * pools, (pools, estimated)
    assert pools < 0.4e9  # 1.05 GB when the optimizer pool was 3 x buffer_count buffers of its one sub-group
