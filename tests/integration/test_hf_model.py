"""A Transformers causal LM built from a config trains through infinity.initialize like plain PyTorch."""
from __future__ import annotations

import pytest
import torch

import infinity
from infinity.models.gpt import GptSpec, synthetic_batches

from test_initialize import close_to, config
from training_reference import ADAM

transformers = pytest.importorskip("transformers", reason="the transformers package is not installed")


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def loss_of(model, x, y) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def test_gpt2_on_nvme_matches_plain_pytorch(tmp_path):
    batches = synthetic_batches(GptSpec(vocab=256, context=32), batch=2, steps=8, seed=3)
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=ADAM.lr, betas=ADAM.betas, eps=ADAM.eps,
                            weight_decay=ADAM.weight_decay)
    want = []
    for x, y in batches:
        loss = loss_of(model, x, y)
        loss.backward()
        want.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    engine, *_ = infinity.initialize(model=tiny_gpt2(), config=config(tmp_path))
    try:
        assert engine.run.offloaded  # its weights really live on NVMe
        got = []
        for x, y in batches:
            loss = loss_of(engine, x, y)
            engine.backward(loss)
            engine.step()
            got.append(loss.item())
    finally:
        engine.close()
    assert close_to(got, want)
