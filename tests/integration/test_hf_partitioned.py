"""Transformers models whose parameters live in partitions (issue 15): zero.Init keeps Transformers'
initialisation, GatheredParameters, parameters read outside their module, resize_token_embeddings."""
from __future__ import annotations

import pytest
import torch

import infinity

transformers = pytest.importorskip("transformers", reason="the transformers package is not installed")


def nvme_config(path, **zero):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                       "weight_decay": 0.01}},
            "zero_optimization": {"stage": 3, "sub_group_size": 20_000, "stage3_param_persistence_threshold": 0,
                                  "offload_param": {"device": "nvme", "nvme_path": str(path), "max_in_cpu": 0},
                                  "offload_optimizer": {"device": "nvme", "nvme_path": str(path), "buffer_count": 4},
                                  **zero}}


TINY = {
    "gpt2": lambda: (transformers.AutoModelForCausalLM, transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=32, bos_token_id=0, eos_token_id=0)),
    "llama": lambda: (transformers.AutoModelForCausalLM, transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=64)),
    "t5": lambda: (transformers.AutoModelForSeq2SeqLM, transformers.T5Config(
        d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16, vocab_size=256)),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_from_config_under_init_starts_from_the_plain_builds_weights(tmp_path, name):
    auto, cfg = TINY[name]()
    torch.manual_seed(0)
    plain = dict(auto.from_config(cfg).named_parameters())
    torch.manual_seed(0)
    with infinity.zero.Init(config=nvme_config(tmp_path)) as init:
        model = auto.from_config(cfg)
    try:
        named = dict(model.named_parameters())
        assert named.keys() == plain.keys()
        assert all(p.numel() == 0 for p in named.values())  # every one really left
        for n, p in named.items():
            assert torch.equal(init.run.read_whole(p), plain[n].detach()), n
        largest = max(p.numel() * p.element_size() for p in plain.values())
        assert 0 < init.reopened_peak_bytes <= 2 * largest  # the parameters one function touches, not the model
    finally:
        init.run.close()


# ---- GatheredParameters ------------------------------------------------------------------------------
def gpt_and_batches():
    from training_reference import fresh_model, make_batches
    return fresh_model, make_batches()[:6]


def test_gathered_parameters_before_initialize_writes_zero_inits_partition(tmp_path):
    from training_reference import fresh_model
    with infinity.zero.Init(config=nvme_config(tmp_path)) as init:
        model = fresh_model()
    try:
        w = model.head.weight
        with infinity.zero.GatheredParameters(w):
            before = w.detach().clone()
            w.data.zero_()  # read-only block: dropped
        assert w.numel() == 0 and torch.equal(init.run.read_whole(w), before)
        with infinity.zero.GatheredParameters([w], modifier_rank=0):
            assert w.shape == before.shape
            w.data.fill_(0.5)
        assert w.numel() == 0 and torch.equal(init.run.read_whole(w), torch.full_like(before, 0.5))
    finally:
        init.run.close()


def test_gathered_parameters_after_initialize_changes_what_trains_on(tmp_path):
    """Halving one weight between steps through GatheredParameters(modifier_rank=0) trains exactly as
    halving it in plain torch: the new values reach the NVMe partition and the fp32 master weights."""
    from training_reference import ADAM, fresh_model, make_batches
    batches = make_batches()[:6]
    name = "blocks.0.up.weight"
    model = fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=ADAM.lr, betas=ADAM.betas, eps=ADAM.eps,
                            weight_decay=ADAM.weight_decay)
    want = []
    for k, (x, y) in enumerate(batches):
        if k == 3:
            with torch.no_grad():
                dict(model.named_parameters())[name].mul_(0.5)
        loss = model(x, y)
        loss.backward()
        want.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    want_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = nvme_config(tmp_path)
    cfg["train_micro_batch_size_per_gpu"] = 4
    engine, *_ = infinity.initialize(model=fresh_model(), config=cfg)
    try:
        p = dict(engine.module.named_parameters())[name]
        got = []
        for k, (x, y) in enumerate(batches):
            if k == 3:
                with infinity.zero.GatheredParameters(p, modifier_rank=0):
                    halved = p.detach() * 0.5
                    p.data.mul_(0.5)
                assert p.numel() == 0  # partitioned again
                assert torch.equal(engine.parameter_values()[name], halved)  # read back from NVMe
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            got.append(loss.item())
        with infinity.zero.GatheredParameters(p):  # read-only: the change is dropped
            p.data.zero_()
        weights = engine.parameter_values()
    finally:
        engine.close()
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want, strict=True)), (got, want)
    assert float((weights[name] - want_weights[name]).norm() / want_weights[name].norm()) <= 1e-5
