"""infinity-estimate: DeepSpeed's ZeRO-3 figures for the rows without NVMe, infinity's own for NVMe rows."""
from __future__ import annotations

import json
import textwrap

import pytest

from infinity import Config, ConfigError
from infinity.cli import estimate as cli
from infinity.config import OffloadDevice
from infinity.estimate import Cluster, ModelSize, ZeroInit, estimate
from infinity.estimate.sizes import build_on_meta, count_module
from infinity.estimate.tiers import Basis


def blocks(nbytes: int) -> int:
    """nbytes in whole 4096-byte blocks: what a pool buffer holds, as the swap extent."""
    return -(-nbytes // 4096) * 4096

NONE, CPU, NVME = OffloadDevice.NONE, OffloadDevice.CPU, OffloadDevice.NVME
SIZE = ModelSize(2_783_000_000, 65_000_000)

# Written down from DeepSpeed 0.19.8:
#   deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs(2783e6, 65e6, gpus, nodes,
#       cpu_offload, cpu_offload_params, zero_init)  ->  (cpu_mem, gpu_mem, ...)
# and the table estimate_zero3_model_states_mem_needs_all_cold prints ("GB" there is 2**30 bytes).
# Key: (offload_param, offload_optimizer, zero_init) -> (host bytes per node, bytes per GPU).
DEEPSPEED_1x1 = {
    (CPU, CPU, ZeroInit.ON): (75_141_000_000, 260_000_000),
    (CPU, CPU, ZeroInit.OFF): (75_141_000_000, 260_000_000),
    (NONE, CPU, ZeroInit.ON): (66_792_000_000, 5_826_000_000),
    (NONE, CPU, ZeroInit.OFF): (66_792_000_000, 5_826_000_000),
    (NONE, NONE, ZeroInit.ON): (390_000_000, 50_354_000_000),
    (NONE, NONE, ZeroInit.OFF): (16_698_000_000, 50_354_000_000),
}
DEEPSPEED_1x1_PRINTED = {  # per CPU | per GPU as DeepSpeed prints them
    (CPU, CPU, ZeroInit.ON): ("69.98", "0.24"), (NONE, CPU, ZeroInit.ON): ("62.20", "5.43"),
    (NONE, NONE, ZeroInit.ON): ("0.36", "46.90"), (NONE, NONE, ZeroInit.OFF): ("15.55", "46.90"),
}
DEEPSPEED_2x8 = {  # 2 nodes, 8 GPUs per node
    (CPU, CPU, ZeroInit.ON): (37_570_500_000, 260_000_000),
    (CPU, CPU, ZeroInit.OFF): (133_584_000_000, 260_000_000),
    (NONE, CPU, ZeroInit.ON): (33_396_000_000, 607_875_000),
    (NONE, CPU, ZeroInit.OFF): (133_584_000_000, 607_875_000),
    (NONE, NONE, ZeroInit.ON): (3_120_000_000, 3_390_875_000),
    (NONE, NONE, ZeroInit.OFF): (133_584_000_000, 3_390_875_000),
}


def rows_by_option(result):
    return {(r.option.offload_param, r.option.offload_optimizer, r.option.zero_init): r for r in result.rows}


@pytest.mark.parametrize("cluster, expected", [(Cluster(1, 1), DEEPSPEED_1x1), (Cluster(8, 2), DEEPSPEED_2x8)])
def test_rows_without_nvme_are_deepspeeds_figures(cluster, expected):
    rows = rows_by_option(estimate(SIZE, cluster))
    for key, (host, gpu) in expected.items():
        assert rows[key].need.basis is Basis.DEEPSPEED
        assert abs(rows[key].need.host_per_node - host) <= 1, key  # DeepSpeed rounds a float; this is exact
        assert rows[key].need.per_gpu == gpu, key
        assert rows[key].need.nvme_per_node == 0


def test_cli_prints_deepspeeds_figures_to_the_hundredth(capsys):
    assert cli.main(["--params", "2783e6", "--largest-layer", "65e6"]) == 0
    out = capsys.readouterr().out
    for (param, optimizer, zero_init), (host, gpu) in DEEPSPEED_1x1_PRINTED.items():
        line = next(line for line in out.splitlines() if line.split()[:2] == [param.value, optimizer.value]
                    and line.split()[2] in (zero_init.value, "on/off"))
        assert line.split()[3:5] == [gpu, host], line


def test_nvme_rows_count_infinitys_buffers_and_swap_files():
    config = Config.load({"bf16": {"enabled": True},
                          "zero_optimization": {"stage": 3, "sub_group_size": 1e8,
                                                "offload_param": {"device": "nvme", "nvme_path": "/n"},
                                                "offload_optimizer": {"device": "nvme", "nvme_path": "/n"}}})
    rows = rows_by_option(estimate(SIZE, Cluster(1, 1), config, step_seconds=10))
    both = rows[(NVME, NVME, ZeroInit.ON)]
    assert both.chosen and both.need.basis is Basis.INFINITY
    parts = both.need.host_parts
    assert parts["param_pool"] == 5 * blocks(65_000_000 * 2)  # a buffer holds the largest parameter (here: layer)
    assert parts["params_in_cpu"] == 1_000_000_000 * 2
    assert parts["optimizer_pool"] == 4 * 3 * 100_000_000 * 4
    assert set(parts) == {"param_pool", "params_in_cpu", "optimizer_pool"}  # gradients stage through the pools
    assert both.need.host_per_node == sum(parts.values())
    # fp16 parameters + four fp32 tensors per parameter, each extent aligned to 4096 bytes
    assert 18 * 2_783_000_000 <= both.need.nvme_per_node < 18 * 2_783_000_000 + 200 * 4096
    # host memory falls well below CPU offload, and the GPU holds only the largest layer
    assert both.need.host_per_node < rows[(CPU, CPU, ZeroInit.ON)].need.host_per_node / 4
    assert both.need.per_gpu == 4 * 65_000_000
    assert both.traffic.read_per_node == 2 * 2 * (2_783_000_000 - 1_000_000_000) + 16 * 2_783_000_000
    assert both.traffic.write_per_node == 2 * (2_783_000_000 - 1_000_000_000) + 16 * 2_783_000_000
    assert both.traffic.bandwidth == (both.traffic.read_per_node + both.traffic.write_per_node) / 10
    off = rows[(NVME, NVME, ZeroInit.OFF)]
    assert off.need.host_per_node == max(both.need.host_per_node, 4 * 2_783_000_000)
    assert rows[(NONE, NONE, ZeroInit.ON)].traffic is None


def nvme_config(**zero):
    base = {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/n", "max_in_cpu": 0},
            "offload_optimizer": {"device": "nvme", "nvme_path": "/n"}}
    return {"zero_optimization": base | zero}


def test_pools_are_sized_as_the_engine_sizes_them():
    size = ModelSize(3_000_000_000, 60_000_000, largest_param=50_000_000)
    bf16 = Config.load({"bf16": {"enabled": True}, **nvme_config(sub_group_size=10_000_000)})
    parts = rows_by_option(estimate(size, Cluster(), bf16))[(NVME, NVME, ZeroInit.ON)].need.host_parts
    assert parts["param_pool"] == 5 * blocks(50_000_000 * 2)  # the largest parameter, not buffer_size (1e8)
    # a sub-group holds whole parameters: the 50M one makes its buffers 50M elements, not 10M
    assert parts["optimizer_pool"] == 4 * 3 * 50_000_000 * 4


def test_fp32_training_keeps_4_byte_parameters_in_the_pool_and_on_nvme():
    size = ModelSize(1_000_000_000, 20_000_000, largest_param=20_000_000)
    rows = {p: rows_by_option(estimate(size, Cluster(), Config.load({**precision, **nvme_config()}), step_seconds=1))
            for p, precision in (("fp32", {}), ("bf16", {"bf16": {"enabled": True}}))}
    fp32, bf16 = (rows[p][(NVME, NVME, ZeroInit.ON)] for p in ("fp32", "bf16"))
    assert fp32.need.host_parts["param_pool"] == 2 * bf16.need.host_parts["param_pool"] == 5 * blocks(20_000_000 * 4)
    assert abs(fp32.need.nvme_per_node - bf16.need.nvme_per_node - 2 * 1_000_000_000) < 4096  # alignment
    assert fp32.traffic.read_per_node - bf16.traffic.read_per_node == 2 * 2 * 1_000_000_000


def test_without_a_config_parameters_are_counted_in_mixed_precision():
    row = rows_by_option(estimate(SIZE, Cluster()))[(NVME, NVME, ZeroInit.ON)]
    assert row.need.host_parts["param_pool"] == 5 * blocks(65_000_000 * 2)


def test_json_output(capsys):
    assert cli.main(["--params", "2783e6", "--largest-layer", "65e6", "--num-gpus", "8", "--num-nodes", "2",
                     "--step-seconds", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cluster"]["world_size"] == 16 and len(report["rows"]) == 14
    first = report["rows"][0]
    assert (first["offload_param"], first["offload_optimizer"], first["zero_init"]) == ("none", "none", True)
    assert first["host_per_node_bytes"] == 3_120_000_000 and first["per_gpu_bytes"] == 3_390_875_000
    assert all("per_step" in row for row in report["rows"] if row["basis"] == "infinity")


def test_frozen_parameters_have_no_optimizer_states_in_the_nvme_rows():
    config = Config.load({"bf16": {"enabled": True}, **nvme_config(sub_group_size=100_000_000)})
    whole = rows_by_option(estimate(SIZE, Cluster(), config, step_seconds=1))[(NVME, NVME, ZeroInit.ON)]
    half = ModelSize(SIZE.total_params, SIZE.largest_layer_params, trained_params=SIZE.total_params // 2)
    part = rows_by_option(estimate(half, Cluster(), config, step_seconds=1))[(NVME, NVME, ZeroInit.ON)]
    frozen = ModelSize(SIZE.total_params, SIZE.largest_layer_params, trained_params=0)
    ref = rows_by_option(estimate(frozen, Cluster(), config, step_seconds=1))[(NVME, NVME, ZeroInit.ON)]
    # parameters on NVMe alike; optimizer swap files and per-step optimizer bytes of the trained half only
    frozen_bytes = 16 * (SIZE.total_params - half.trained)
    assert abs((whole.need.nvme_per_node - part.need.nvme_per_node) - frozen_bytes) < 4096 * 200
    assert whole.traffic.read_per_node - part.traffic.read_per_node == 16 * (SIZE.total_params - half.trained)
    assert abs(ref.need.nvme_per_node - 2 * SIZE.total_params) < 4096  # the parameters' file alone
    assert "optimizer_pool" not in ref.need.host_parts and ref.traffic.write_per_node == 0
    assert ref.traffic.read_per_node == 2 * 2 * SIZE.total_params  # forward and backward reads counted
    with pytest.raises(ConfigError, match="--trained-params"):
        ModelSize(10, 5, trained_params=11)


def test_model_built_on_meta_device(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny_models.py").write_text(textwrap.dedent("""
        import torch

        def build():
            model = torch.nn.Sequential(torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 64),
                                        torch.nn.Linear(64, 1000, bias=False))
            model[2].weight = model[0].weight  # tied: counted once
            return model
    """))
    monkeypatch.chdir(tmp_path)
    model = build_on_meta("tiny_models:build")
    assert next(model.parameters()).device.type == "meta"
    size = count_module(model)
    assert size == ModelSize(64_000 + 64 * 64 + 64, 64_000, 64_000)
    assert cli.main(["--model", "tiny_models:build", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["total_params"] == 64_000 + 64 * 64 + 64
    model[1].requires_grad_(False)
    assert count_module(model).trained == 64_000


def test_bad_input_is_reported(capsys):
    assert cli.main(["--params", "2783.5", "--largest-layer", "65e6"]) == 2
    assert "--params: must be a whole number" in capsys.readouterr().err
    assert cli.main(["--params", "2783e6"]) == 2
    assert "--largest-layer: is needed with --params" in capsys.readouterr().err
    assert cli.main(["--model", "no_such_module_here:build"]) == 2
    with pytest.raises(ConfigError):
        Cluster(0, 1)


def test_buffer_size_smaller_than_the_largest_partition_is_noted():
    config = Config.load({"zero_optimization": {"offload_param": {"buffer_size": 1e6}}})
    result = estimate(SIZE, Cluster(1, 1), config)
    assert any("buffer_size" in note for note in result.notes)
