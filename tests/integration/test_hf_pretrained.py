"""Transformers models in and out of NVMe partitions: infinity.integrations.transformers.from_pretrained
streams a pretrained folder into partitions, engine.save_pretrained writes one plain from_pretrained loads."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import infinity
from test_distributed import free_port
from test_initialize import config

transformers = pytest.importorskip("transformers", reason="the transformers package is not installed")

from infinity.integrations.transformers import from_pretrained  # noqa: E402
from hf_models import assert_close_weights, auto_class, config_of, batches, loss_of, plain_run, save_plain, train  # noqa: E402

STEPS = 10
FORMATS = {"safetensors": {}, "sharded": {"max_shard_size": "20KB"}, "bin": {"bin_files": 1},
           "sharded-bin": {"bin_files": 3}}


def nvme_config(tmp_path, **top):
    path = tmp_path / "nvme"
    path.mkdir(exist_ok=True)
    return config(path, gradient_clipping=0.0, **top)


def saved(arch, tmp_path, fmt):
    folder = save_plain(arch, tmp_path / "pretrained", **FORMATS[fmt])
    if fmt == "sharded":
        assert (folder / "model.safetensors.index.json").exists()
    return folder


@pytest.mark.parametrize("arch,fmt", [(a, f) for a in ("gpt2", "llama", "t5") for f in ("safetensors", "sharded", "bin")]
                         + [("gpt2", "sharded-bin")])
def test_loaded_into_nvme_trains_equal_to_plain_transformers(tmp_path, arch, fmt):
    folder = saved(arch, tmp_path, fmt)
    data = batches(STEPS)
    want_losses, want_weights = plain_run(arch, folder, data)
    cfg = nvme_config(tmp_path)
    model = from_pretrained(auto_class(arch), folder, cfg)
    engine, *_ = infinity.initialize(model=model, config=cfg)
    try:
        assert engine.run.offloaded and engine.run.managers  # parameters (and optimizer) really on NVMe
        losses = train(engine, data)
        weights = engine.parameter_values()
    finally:
        engine.close()
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, want_losses, strict=True)), (losses, want_losses)
    assert_close_weights(weights, want_weights, STEPS)


def auto_load(folder, arch="gpt2"):
    return auto_class(arch).from_pretrained(folder)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_round_trip_through_engine_save_pretrained(tmp_path, arch):
    folder = save_plain(arch, tmp_path / "pretrained")
    original = auto_class(arch).from_pretrained(folder).state_dict()
    cfg = nvme_config(tmp_path)
    engine, *_ = infinity.initialize(model=from_pretrained(auto_class(arch), folder, cfg), config=cfg)
    try:
        engine.save_pretrained(tmp_path / "before", max_shard_size="10KB")
        train(engine, batches(3))
        trained = engine.parameter_values()
        engine.save_pretrained(tmp_path / "after")
    finally:
        engine.close()
    index = json.loads((tmp_path / "before" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "after").iterdir()}
    before = auto_class(arch).from_pretrained(tmp_path / "before").state_dict()
    assert before.keys() == original.keys()
    assert all(torch.equal(before[k], original[k]) for k in original)
    after = auto_class(arch).from_pretrained(tmp_path / "after")
    assert all(torch.equal(p, trained[n]) for n, p in after.named_parameters())
    assert len(dict(after.named_parameters())) == len(trained)


def test_missing_and_unexpected_keys_reported_as_transformers_does(tmp_path, caplog):
    folder = save_plain("llama", tmp_path / "pretrained")
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")
    del state["model.norm.weight"]
    state["model.extra.weight"] = torch.ones(3)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    _, want = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    cfg = nvme_config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="infinity.integrations"):
        model, info = from_pretrained(transformers.AutoModelForCausalLM, folder, cfg, output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(want["missing_keys"]) == ["model.norm.weight"]
    assert sorted(info["unexpected_keys"]) == sorted(want["unexpected_keys"]) == ["model.extra.weight"]
    assert "model.norm.weight" in caplog.text and "model.extra.weight" in caplog.text
    engine, *_ = infinity.initialize(model=model, config=cfg)
    try:
        assert torch.equal(engine.parameter_values()["model.norm.weight"], torch.ones(32))  # the model's own init
    finally:
        engine.close()


def test_a_base_model_checkpoint_loads_into_a_model_with_a_head(tmp_path):
    torch.manual_seed(0)
    base = transformers.GPT2Model(config_of("gpt2"))
    base.save_pretrained(tmp_path / "base")
    cfg = nvme_config(tmp_path)
    model, info = from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "base", cfg, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    engine, *_ = infinity.initialize(model=model, config=cfg)
    try:
        values = engine.parameter_values()
    finally:
        engine.close()
    assert all(torch.equal(values[f"transformer.{n}"], p) for n, p in base.named_parameters())


def test_dtype_converts_as_transformers_does(tmp_path):
    folder = save_plain("llama", tmp_path / "pretrained")
    want = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    cfg = nvme_config(tmp_path, bf16={"enabled": True})
    engine, *_ = infinity.initialize(model=from_pretrained(transformers.AutoModelForCausalLM, folder, cfg,
                                                           dtype=torch.bfloat16), config=cfg)
    try:
        got = engine.parameter_values()
    finally:
        engine.close()
    assert all(torch.equal(got[n], p.float()) for n, p in want.named_parameters())
    assert any(not torch.equal(p.float(), q) for p, q in zip(want.parameters(),
                                                            auto_load(folder, "llama").parameters()))


def test_tied_weights_stay_tied_and_the_engine_forwards_to_its_module(tmp_path):
    folder = save_plain("gpt2", tmp_path / "pretrained")
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder)
    cfg = nvme_config(tmp_path)
    model = from_pretrained(transformers.AutoModelForCausalLM, folder, cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    engine, *_ = infinity.initialize(model=model, config=cfg)
    try:
        assert engine.num_parameters() == plain.num_parameters() == sum(p.ds_numel for p in model.parameters())
        assert engine.can_generate() and engine.generation_config.eos_token_id == 0
        prompt = torch.tensor([[5, 6, 7]])
        with torch.no_grad():
            assert torch.equal(engine.generate(prompt, max_new_tokens=4, do_sample=False),
                               plain.generate(prompt, max_new_tokens=4, do_sample=False))
        with pytest.raises(AttributeError):
            engine.no_such_attribute
    finally:
        engine.close()


def test_state_dict_of_partitioned_parameters_is_refused_naming_engine_save_pretrained(tmp_path):
    folder = save_plain("gpt2", tmp_path / "pretrained")
    cfg = nvme_config(tmp_path)
    model = from_pretrained(transformers.AutoModelForCausalLM, folder, cfg)
    with pytest.raises(infinity.UsageError, match="engine.save_pretrained"):
        model.state_dict()  # before initialize too: the parameters are already partitioned
    engine, *_ = infinity.initialize(model=model, config=cfg)
    try:
        with pytest.raises(infinity.UsageError, match="engine.save_pretrained"):
            engine.module.state_dict()
        with pytest.raises(infinity.UsageError, match="engine.save_pretrained"):
            engine.module.transformer.h[0].attn.state_dict()
        with pytest.raises(infinity.UsageError, match="engine.save_pretrained"):
            engine.module.save_pretrained(tmp_path / "wrong")
        assert not list((tmp_path / "wrong").glob("*.safetensors"))
        assert len(engine.module.state_dict(keep_vars=True)) == 29  # the Parameter objects themselves
    finally:
        engine.close()


def test_a_model_built_without_zero_init_is_guarded_after_initialize(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_of("gpt2"))
    count = model.num_parameters()
    engine, *_ = infinity.initialize(model=model, config=nvme_config(tmp_path))
    try:
        assert engine.num_parameters() == count
        with pytest.raises(infinity.UsageError, match="engine.save_pretrained"):
            model.state_dict()
    finally:
        engine.close()


def test_a_folder_without_weights_is_refused_naming_the_files(tmp_path):
    folder = save_plain("gpt2", tmp_path / "pretrained")
    (folder / "model.safetensors").unlink()
    with pytest.raises(infinity.CheckpointError, match="model.safetensors"):
        from_pretrained(transformers.AutoModelForCausalLM, folder, nvme_config(tmp_path))
    with pytest.raises(infinity.UsageError, match="not a folder"):
        from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "nowhere", nvme_config(tmp_path))


def test_peak_resident_growth_while_loading_stays_under_two_largest_tensors_and_the_pools(tmp_path):
    """[Note: what is counted]  The worker loads a tiny model first (imports, first-call allocations), then
    measures VmHWM's growth over one load of a Llama whose weights are 22 x its largest tensor.  The pool is
    zero.Init's one staging buffer (the largest parameter, in whole 4096-byte blocks)."""
    torch.manual_seed(0)
    big = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=8, vocab_size=1024, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(big)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    model.save_pretrained(tmp_path / "big")
    del model
    largest, total = max(sizes), sum(sizes)
    assert total >= 10 * largest
    save_plain("llama", tmp_path / "small")
    (tmp_path / "nvme").mkdir()
    worker = Path(__file__).with_name("hf_rss_worker.py")
    done = subprocess.run([sys.executable, str(worker), str(tmp_path / "big"), str(tmp_path / "nvme"),
                           str(tmp_path / "small")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    pools = -(-largest // 4096) * 4096
    assert measured["parameters"] == sum(sizes) // 4
    assert measured["growth"] < 2 * largest + pools, (measured, largest, total)


def test_two_ranks_round_trip_through_save_pretrained(tmp_path):
    folder = save_plain("gpt2", tmp_path / "pretrained")
    original = auto_class("gpt2").from_pretrained(folder).state_dict()
    port = free_port()
    worker = Path(__file__).with_name("hf_dist_worker.py")
    procs = [subprocess.Popen([sys.executable, str(worker), str(folder), str(tmp_path / "out"), str(tmp_path / "nvme")],
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            p.kill()
    before = auto_class("gpt2").from_pretrained(tmp_path / "out" / "before").state_dict()
    assert before.keys() == original.keys() and all(torch.equal(before[k], original[k]) for k in original)
    trained = torch.load(tmp_path / "out" / "weights.pt", weights_only=True)
    after = auto_class("gpt2").from_pretrained(tmp_path / "out" / "after")
    assert all(torch.equal(p, trained[n]) for n, p in after.named_parameters())
    assert any(not torch.equal(trained[k], original[k]) for k in trained)
