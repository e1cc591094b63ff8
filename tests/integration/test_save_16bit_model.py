"""engine.save_16bit_model: one file of the whole model in the compute dtype that the plain torch model
loads strictly, from parameters on NVMe, host or the compute tier; DeepSpeed's answer when
stage3_gather_16bit_weights_on_model_save is off."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import infinity
from infinity.errors import UsageError
from infinity.swap.params import Tier
from infinity.zero import Engine, EngineSettings, Precision
from infinity.zero.settings import ModelSave

from test_initialize import config
from training_reference import ADAM, SPEC, fresh_model, make_batches
from infinity.models.gpt import Gpt


class Tagged(nn.Module):
    """The small GPT with what a state dict also holds: a persistent buffer, a frozen parameter, and a
    buffer that is not persistent (left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = fresh_model()
        self.scale = nn.Parameter(torch.full((3,), 0.5), requires_grad=False)
        self.register_buffer("seen", torch.arange(5))
        self.register_buffer("scratch", torch.ones(2), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.gpt(x, y) * self.scale.sum() / 1.5


def settings(tmp_path, param: Tier, precision: Precision, **extra) -> EngineSettings:
    return EngineSettings(param_tier=param, optimizer_tier=Tier.NVME, param_nvme_path=str(tmp_path),
                          optimizer_nvme_path=str(tmp_path), adam=ADAM, precision=precision, sub_group_size=20_000,
                          persistence_threshold=100, **extra)


def trained(engine: Engine, steps: int = 2) -> Engine:
    for x, y in make_batches()[:steps]:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    return engine


PLACES = [(Tier.NVME, Precision.BF16), (Tier.HOST, Precision.FP16), (Tier.COMPUTE, Precision.FP32)]


@pytest.mark.parametrize("param,precision", PLACES, ids=[f"{p.value}-{q.value}" for p, q in PLACES])
def test_the_file_holds_every_weight_in_the_compute_dtype_and_loads_strictly(tmp_path, param, precision):
    engine = trained(Engine(Tagged(), settings(tmp_path, param, precision)))
    try:
        replaced = [p.replaced for p in engine.run.pools()]
        assert engine.save_16bit_model(tmp_path / "model") is True
        assert [p.replaced for p in engine.run.pools()] == replaced  # no staging buffer lost to a view of it
        want = engine.parameter_values()
    finally:
        engine.close()
    path = tmp_path / "model" / "pytorch_model.safetensors"
    got = load_file(path)
    dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16, Precision.FP32: torch.float32}[precision]
    assert set(got) == {f"gpt.{k}" for k in fresh_model().state_dict()} | {"scale", "seen"}
    for name, values in want.items():
        assert got[name].dtype == dtype and torch.equal(got[name], values.to(dtype)), name
    assert torch.equal(got["seen"], torch.arange(5)) and torch.equal(got["scale"], torch.full((3,), 0.5))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    plain = Tagged()
    plain.load_state_dict(got, strict=True)
    assert torch.equal(plain.gpt.head.weight, want["gpt.head.weight"].to(dtype).float())


def test_a_torch_file_name_writes_torchs_format_and_frozen_parameters_may_be_left_out(tmp_path):
    engine = trained(Engine(Tagged(), settings(tmp_path, Tier.NVME, Precision.FP32)))
    try:
        assert engine.save_16bit_model(tmp_path, "pytorch_model.bin", exclude_frozen_parameters=True)
        want = engine.parameter_values()
    finally:
        engine.close()
    got = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert "scale" not in got and "seen" in got
    assert all(torch.equal(got[k], v) for k, v in want.items() if k != "scale")
    Tagged().load_state_dict(got, strict=False)


def test_refuses_a_path_as_file_name_and_a_call_between_forward_and_backward(tmp_path):
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Precision.FP32))
    try:
        with pytest.raises(UsageError, match="plain file name"):
            engine.save_16bit_model(tmp_path, "sub/model.safetensors")
        x, y = make_batches()[0]
        loss = engine(x, y)
        with pytest.raises(UsageError, match="save_16bit_model.*between a forward and its backward"):
            engine.save_16bit_model(tmp_path)
        engine.backward(loss)
        engine.step()
        assert engine.save_16bit_model(tmp_path)
    finally:
        engine.close()
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["pytorch_model.safetensors"]


def test_the_config_key_decides_as_in_deepspeed(tmp_path, caplog):
    assert EngineSettings().model_save is ModelSave.GATHER  # an engine built without a config writes
    for gather, written in ((False, False), (True, True)):
        block = config(tmp_path / "swap")
        (tmp_path / "swap").mkdir(exist_ok=True)
        block["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = gather
        model = Gpt(SPEC)
        engine, *_ = infinity.initialize(model=model, config=block)
        out = tmp_path / f"out-{gather}"
        try:
            with caplog.at_level(logging.WARNING, logger="infinity.checkpoint"):
                assert engine.save_16bit_model(out) is written
        finally:
            engine.close()
        assert (out / "pytorch_model.safetensors").exists() is written
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "stage3_gather_16bit_weights_on_model_save is false" in warnings[0]
