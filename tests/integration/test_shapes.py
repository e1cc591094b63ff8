"""Every parameter shape trains with each shipped config (infinity/config/shipped/*.json) and gives plain PyTorch's results.

Shapes whose byte size is not a multiple of 4096 (GPT-2's vocabulary, primes, single elements) take
a swap extent of whole blocks; the pools' buffers must hold those whole blocks.  Each shipped config
is run as shipped except where a plain-torch comparison needs it otherwise: fp32 (no bf16/fp16 block;
the half-precision run of the same shapes is test_half_precision_shapes_train_as_shipped), no
scheduler (a constant lr), training_reference's AdamW settings, the swap files under tmp_path, and
stage3_param_persistence_threshold 0, so that every parameter, the 1-element ones too, goes where
the config puts parameters.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import infinity
from infinity import Config
from infinity.config import TrainingArgs
from infinity.config.training import Precision
from infinity.errors import CapacityError, ConfigError
from infinity.memory.host_buffer import PinPolicy
from infinity.swap.params import Tier
from infinity.models.gpt import Gpt, GptSpec, synthetic_batches
from infinity.zero import Engine
from infinity.zero.placement import param_pool

from test_training import assert_same_weights, final_weights, settings
from training_reference import ADAM, plain_torch_run, train

CONFIGS = Path(__file__).resolve().parents[2] / "infinity" / "config" / "shipped"  # package data
GPT2_VOCAB = GptSpec(vocab=50257, context=8, hidden=768, layers=1, heads=12)  # 50257 x 768: not whole blocks
SHIPPED = ["nvme-local", "cpu-offload", "hf-zero3-nvme", "none"]  # none: cpu-offload with both devices none


class Primes(nn.Module):
    """Prime-sized Linear layers (331 x 337 = 111547 elements: above any persistence threshold shipped)
    and parameters of one element."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(337, 331)
        self.down = nn.Linear(331, 7)
        self.scale = nn.Parameter(torch.ones(1))
        self.tiny = nn.Linear(1, 1)  # a 1-element weight and a 1-element bias

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.down(torch.tanh(self.up(x))) * self.scale
        return F.mse_loss(self.tiny(out.unsqueeze(-1)).squeeze(-1), y)


def primes() -> Primes:
    torch.manual_seed(0)
    return Primes()


def gpt2_vocab() -> Gpt:
    torch.manual_seed(0)
    return Gpt(GPT2_VOCAB)


def prime_batches(count: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs in the compute dtype (the engine computes in it; it does not cast the model's inputs)."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 337, generator=g).to(dtype), torch.randn(3, 7, generator=g).to(dtype))
            for _ in range(count)]


def gpt_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return synthetic_batches(GPT2_VOCAB, batch=1, steps=count)


MODELS = {"gpt2-vocab": (gpt2_vocab, gpt_batches, 2), "primes": (primes, prime_batches, 3)}  # optimizer steps


def shipped(name: str, path: Path, precision: Precision = Precision.FP32, offload: bool = True) -> Config:
    """infinity/config/shipped/<name>.json with its "auto" values filled, changed only as the module docstring says (and
    without offload, both devices none); "none" is cpu-offload.json without offload."""
    offload = offload and name != "none"
    data = json.loads((CONFIGS / f"{('cpu-offload' if name == 'none' else name)}.json").read_text())
    data.pop("scheduler", None)
    if precision is Precision.FP32:
        data.pop("bf16", None)
    data["optimizer"]["params"] = {"lr": ADAM.lr, "betas": list(ADAM.betas), "eps": ADAM.eps,
                                   "weight_decay": ADAM.weight_decay}
    zero = data["zero_optimization"]
    zero["stage3_param_persistence_threshold"] = 0
    for block in ("offload_param", "offload_optimizer"):
        if not offload:
            zero[block] = {"device": "none"}
        elif zero[block]["device"] == "nvme":
            zero[block]["nvme_path"] = str(path)
    args = TrainingArgs(learning_rate=ADAM.lr, adam_beta1=ADAM.betas[0], adam_beta2=ADAM.betas[1],
                        adam_epsilon=ADAM.eps, weight_decay=ADAM.weight_decay, max_grad_norm=1.0,
                        per_device_train_batch_size=1, gradient_accumulation_steps=1, world_size=1,
                        hidden_size=GPT2_VOCAB.hidden, precision=precision)
    return Config.load(data, args=args if name == "hf-zero3-nvme" else None)


@pytest.fixture(scope="module")
def references() -> dict:
    """Plain torch's losses and weights for each model and accumulation, computed once."""
    return {}


def reference(references: dict, model: str, accumulation: int):
    if (model, accumulation) not in references:
        build, batches, steps = MODELS[model]
        references.clear()  # one model's reference at a time: the GPT's is 0.3 GB of weights
        references[(model, accumulation)] = plain_torch_run(batches(steps * accumulation), accumulation=accumulation,
                                                            model=build())
    return references[(model, accumulation)]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shape_trains_like_plain_pytorch_with_each_shipped_config(tmp_path, references, model, name):
    config = shipped(name, tmp_path)
    accumulation = int(config.gradient_accumulation_steps)
    want_losses, want_weights = reference(references, model, accumulation)
    build, batches, steps = MODELS[model]
    engine, *_ = infinity.initialize(model=build(), config=config)
    try:
        losses = train(engine, batches(steps * accumulation))
        assert engine.global_steps == steps
        weights = final_weights(engine)
    finally:
        engine.close()
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, want_losses)), (losses, want_losses)
    # [Note: 3e-5] The first LayerNorm bias starts at zero and, like the key bias, gets part of its gradient
    # from attention scores softmax ignores: with the GPT-2 vocabulary and 4 micro-steps per step it ends
    # 1.2e-5 from torch's.  A wrong tail of whole blocks would be off by the weights themselves.
    assert_same_weights(weights, want_weights, steps, rel=3e-5)


@pytest.mark.parametrize("name", ["nvme-local", "hf-zero3-nvme"])
def test_half_precision_shapes_train_as_shipped(tmp_path, name):
    """In the shipped precision (bf16; the HF config's fp16 "auto" filled as bf16) odd shapes take half as
    many bytes, 2 x 111547 and 2 x 1: they train, and their values match the same run with everything on
    the compute tier (offload none) bit for bit."""
    runs = []
    for offload in (True, False):
        engine, *_ = infinity.initialize(model=primes(), config=shipped(name, tmp_path, Precision.BF16, offload))
        try:
            batches = prime_batches(3 * engine.gradient_accumulation_steps(), torch.bfloat16)
            runs.append((train(engine, batches), final_weights(engine)))
        finally:
            engine.close()
    (losses, weights), (want_losses, want_weights) = runs
    assert losses == want_losses
    for key, value in want_weights.items():
        assert weights[key].dtype == torch.float32 and torch.equal(weights[key], value), key


def test_a_buffer_too_small_names_buffer_size_and_the_value_to_set(tmp_path):
    """The pool's own check (the engine sizes buffers from the largest parameter, so only a caller that
    asks for more meets it) and the config's (buffer_size below the largest parameter): both name
    offload_param.buffer_size, not buffer_count, and the least value, in elements."""
    pool = param_pool(settings(tmp_path, Tier.NVME, Tier.NVME), 128_000, torch.bfloat16,
                      PinPolicy.PAGEABLE)
    assert pool.buffer_bytes == 258_048  # 1000 x 128 bf16 elements in whole 4096-byte blocks, as their extent
    with pytest.raises(CapacityError) as err:
        pool.acquire(258_049)
    message = str(err.value)
    assert "set zero_optimization.offload_param.buffer_size to at least 131072 elements" in message, message
    with pytest.raises(ConfigError) as err:
        Engine(primes(), settings(tmp_path, Tier.NVME, Tier.NVME,
                                  param_buffer_size=100_000))
    assert "zero_optimization.offload_param.buffer_size" in str(err.value)
    assert "set buffer_size to at least 111547" in str(err.value) and "up.weight" in str(err.value)
