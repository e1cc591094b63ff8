"""Frozen parameters (requires_grad=False): held on the param tier and gathered like trained ones, but with
no optimizer state, sub-group, gradient or hook, never written by the step; a model frozen whole has no
optimizer at all.  Real models against plain torch, real swap files under tmp_path."""
from __future__ import annotations

import copy

import pytest
import torch

import infinity
from infinity.errors import UsageError
from infinity.models.gpt import Gpt

from test_initialize import close_to, config
from test_training import assert_same_weights
from training_reference import SPEC, fresh_model, make_batches, plain_torch_run, train

STEPS = 4


def freeze_embeddings(model: Gpt) -> Gpt:
    model.tokens.requires_grad_(False)
    model.positions.requires_grad_(False)
    return model


def built(how: str, cfg: dict) -> Gpt:
    """The reference model's initial weights (seed 0), built plainly or under zero.Init, embeddings frozen."""
    torch.manual_seed(0)
    if how == "zero_init":
        with infinity.zero.Init(config=cfg):
            return freeze_embeddings(Gpt(SPEC))
    return freeze_embeddings(Gpt(SPEC))


def swap_config(tmp_path) -> dict:
    """The test config with its swap files in tmp_path/swap (beside a checkpoint or a pretrained folder)."""
    (tmp_path / "swap").mkdir(exist_ok=True)
    return config(tmp_path / "swap")


def regions(engine) -> list[str]:
    """The swap files of an engine's run folders."""
    return sorted(p.name for m in engine.run.managers for p in m.store.folder.iterdir() if p.name != "lock")


@pytest.mark.parametrize("tier", ["nvme", "cpu"])
@pytest.mark.parametrize("how", ["plain", "zero_init"])
def test_a_frozen_embedding_trains_equal_to_plain_adamw_and_stays_bit_for_bit(tmp_path, how, tier):
    batches = make_batches()[:STEPS]
    want_losses, want_weights = plain_torch_run(batches, model=freeze_embeddings(fresh_model()))
    initial = {n: p.detach().clone() for n, p in fresh_model().named_parameters()}
    cfg = config(tmp_path, param_device=tier)
    engine, *_ = infinity.initialize(model=built(how, cfg), config=cfg)
    try:
        run = engine.run
        frozen = {run.names[i] for i in run.frozen}
        assert frozen == {"tokens.weight", "positions.weight"}
        assert run.offloaded >= run.frozen  # homes on the param tier like the trained ones
        assert not any(s.index in run.frozen for g in run.groups for s in g.slices)  # no sub-group slot
        losses = train(engine, batches)
        weights = engine.parameter_values()
        report = engine.step_report()
    finally:
        engine.close()
    assert close_to(losses, want_losses), (losses, want_losses)
    for name in frozen:
        assert torch.equal(weights[name], initial[name]), name
    assert_same_weights(weights, want_weights, STEPS)
    assert report.params == sum(w.numel() for n, w in want_weights.items() if n not in frozen)


@pytest.mark.parametrize("how", ["plain", "zero_init"])
def test_a_frozen_middle_block_is_gathered_for_input_gradients_and_stays_bit_for_bit(tmp_path, how):
    """Block 1 frozen: backward needs its weights for the gradients of block 0 below it (gathered again by
    the backward pre-hooks, released when the backward ends), and never updates them."""
    batches = make_batches()[:STEPS]
    plain = fresh_model()
    plain.blocks[1].requires_grad_(False)
    want_losses, want_weights = plain_torch_run(batches, model=plain)
    initial = {n: p.detach().clone() for n, p in fresh_model().named_parameters()}
    cfg = config(tmp_path)
    torch.manual_seed(0)
    if how == "zero_init":
        with infinity.zero.Init(config=cfg):
            model = Gpt(SPEC)
    else:
        model = Gpt(SPEC)
    model.blocks[1].requires_grad_(False)
    engine, *_ = infinity.initialize(model=model, config=cfg)
    try:
        frozen = {engine.run.names[i] for i in engine.run.frozen}
        assert frozen and all(n.startswith("blocks.1.") for n in frozen)
        losses = train(engine, batches)
        assert not engine.run.coordinator.gathered()  # everything released after each backward
        weights = engine.parameter_values()
    finally:
        engine.close()
    assert close_to(losses, want_losses), (losses, want_losses)
    assert all(torch.equal(weights[n], initial[n]) for n in frozen)
    assert_same_weights(weights, {n: w for n, w in want_weights.items() if n not in frozen}, STEPS)


def test_a_frozen_loss_network_passes_gradients_through_and_lets_its_parameters_go(tmp_path):
    """A model frozen whole whose input needs gradients (a loss network, a critic): the student's backward
    runs through it, gathering its parameters, and they are released when that backward ends."""
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    critic = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    critic.requires_grad_(False)
    plain_student, plain_critic = copy.deepcopy(student), copy.deepcopy(critic)
    opt = torch.optim.AdamW(plain_student.parameters(), lr=1e-3, weight_decay=0.01)
    data = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(STEPS)]
    want = []
    for x in data:
        loss = plain_critic(plain_student(x)).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_student.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        want.append(loss.item())
    cfg = config(tmp_path)
    engine, *_ = infinity.initialize(model=student, config=cfg)
    critic_engine, *_ = infinity.initialize(model=critic, config=cfg)
    try:
        got = []
        for x in data:
            loss = critic_engine(engine(x)).square().mean()
            engine.backward(loss)
            engine.step()
            got.append(loss.item())
            assert not critic_engine.run.coordinator.gathered()  # released at the end of the backward
        values = critic_engine.parameter_values()
    finally:
        critic_engine.close()
        engine.close()
    assert close_to(got, want), (got, want)
    assert all(torch.equal(values[n], p) for n, p in plain_critic.named_parameters())


def test_a_reference_model_frozen_whole_runs_forward_with_no_optimizer(tmp_path):
    x, y = make_batches()[0]
    cfg = config(tmp_path)
    plain = fresh_model()
    with infinity.zero.Init(config=cfg):
        torch.manual_seed(0)
        model = Gpt(SPEC)
    model.requires_grad_(False)
    engine, *_ = infinity.initialize(model=model, config=cfg)
    try:
        assert regions(engine) == ["param.swp"]  # no optimizer swap files
        assert engine.run.offloaded == set(range(len(engine.run.params)))
        with torch.no_grad():
            assert torch.equal(engine(x, y), plain(x, y))
            assert torch.equal(engine(x), plain(x))  # released and fetched again: the same values
        with pytest.raises(UsageError, match="no trainable parameters"):
            engine.step()
        with pytest.raises(UsageError, match="no trainable parameters"):
            engine.backward(engine(x, y))
    finally:
        engine.close()


def test_a_change_of_requires_grad_after_initialize_is_refused_naming_the_parameter(tmp_path):
    model = freeze_embeddings(fresh_model())
    engine, *_ = infinity.initialize(model=model, config=config(tmp_path))
    try:
        x, y = make_batches()[0]
        engine.backward(engine(x, y))
        engine.step()
        model.tokens.weight.requires_grad_(True)
        with pytest.raises(UsageError, match=r"tokens\.weight \(now requires_grad=True\)"):
            engine(x, y)
        model.tokens.weight.requires_grad_(False)
        model.head.weight.requires_grad_(False)
        with pytest.raises(UsageError, match=r"head\.weight \(now requires_grad=False\)"):
            engine.step()
    finally:
        engine.close()


def test_checkpoint_round_trip_with_frozen_parameters_built_under_zero_init(tmp_path):
    batches = make_batches()[:6]
    want_losses, _ = plain_torch_run(batches, model=freeze_embeddings(fresh_model()))
    cfg = swap_config(tmp_path)
    engine, *_ = infinity.initialize(model=built("zero_init", cfg), config=cfg)
    try:
        first = train(engine, batches[:3])
        engine.save_checkpoint(str(tmp_path / "ckpt"))
        saved = engine.parameter_values()
    finally:
        engine.close()
    torch.manual_seed(5)  # other initial weights: the checkpoint must bring every parameter back
    with infinity.zero.Init(config=cfg):
        fresh = freeze_embeddings(Gpt(SPEC))
    engine, *_ = infinity.initialize(model=fresh, config=cfg)
    try:
        engine.load_checkpoint(str(tmp_path / "ckpt"))
        loaded = engine.parameter_values()
        rest = train(engine, batches[3:])
    finally:
        engine.close()
    assert all(torch.equal(loaded[n], saved[n]) for n in saved)
    assert close_to(first + rest, want_losses), (first + rest, want_losses)


def test_consolidated_and_16bit_files_hold_the_frozen_parameters(tmp_path):
    from infinity.checkpoint.consolidate import consolidate
    from safetensors.torch import load_file

    batches = make_batches()[:2]
    plain = freeze_embeddings(fresh_model())
    initial = copy.deepcopy(plain.state_dict())
    cfg = swap_config(tmp_path)
    cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    engine, *_ = infinity.initialize(model=built("zero_init", cfg), config=cfg)
    try:
        train(engine, batches)
        engine.save_checkpoint(str(tmp_path / "ckpt"))
        assert engine.save_16bit_model(str(tmp_path / "out"), "model.safetensors")
        assert engine.save_16bit_model(str(tmp_path / "out"), "trained.safetensors", exclude_frozen_parameters=True)
        values = engine.parameter_values()
    finally:
        engine.close()
    consolidate(tmp_path / "ckpt", tmp_path / "whole.safetensors")
    whole, half = load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "out/model.safetensors"))
    for name in ("tokens.weight", "positions.weight"):
        assert torch.equal(whole[name], initial[name]) and torch.equal(half[name], initial[name])
    assert all(torch.equal(whole[n], values[n]) for n in values)
    plain.load_state_dict(whole, strict=True)
    assert set(load_file(str(tmp_path / "out/trained.safetensors"))) == set(whole) - {"tokens.weight",
                                                                                      "positions.weight"}


def test_a_transformers_reference_model_frozen_whole_gives_plain_transformers_logits(tmp_path):
    pytest.importorskip("transformers", reason="the transformers package is not installed")
    from infinity.integrations.transformers import from_pretrained
    from hf_models import auto_class, batches, save_plain

    folder = save_plain("gpt2", tmp_path / "pretrained")
    plain = auto_class("gpt2").from_pretrained(folder)
    cfg = swap_config(tmp_path)
    reference = from_pretrained(auto_class("gpt2"), folder, cfg)
    reference.requires_grad_(False)
    engine, *_ = infinity.initialize(model=reference, config=cfg)
    try:
        assert regions(engine) == ["param.swp"] and engine.run.offloaded
        with torch.no_grad():
            for x in batches(2):
                assert torch.equal(engine(input_ids=x).logits, plain(input_ids=x).logits)
    finally:
        engine.close()


def test_gathered_parameters_reads_and_changes_a_frozen_parameter(tmp_path):
    x, y = make_batches()[0]
    model = freeze_embeddings(fresh_model())
    want = freeze_embeddings(fresh_model())
    engine, *_ = infinity.initialize(model=model, config=config(tmp_path))
    try:
        with infinity.zero.GatheredParameters(model.positions.weight, modifier_rank=0):
            assert torch.equal(model.positions.weight, want.positions.weight)  # whole in the block
            model.positions.weight.data[:5] = 0.5
        want.positions.weight.data[:5] = 0.5
        assert model.positions.weight.numel() == want.positions.weight.numel()  # released again: its whole size
        assert torch.equal(engine.parameter_values()["positions.weight"], want.positions.weight)
        with torch.no_grad():
            assert torch.equal(engine(x, y), want(x, y))  # the forward reads the new values from its home
    finally:
        engine.close()


def test_a_checkpoint_that_saved_frozen_parameters_as_buffers_is_refused_with_the_fix(tmp_path):
    """Checkpoints of an infinity before frozen parameters were held listed them as buffers, whole."""
    import json

    from infinity.errors import CheckpointError

    cfg = config(tmp_path)
    engine, *_ = infinity.initialize(model=freeze_embeddings(fresh_model()), config=cfg)
    try:
        train(engine, make_batches()[:1])
        engine.save_checkpoint(str(tmp_path / "ckpt"), tag="old")
    finally:
        engine.close()
    path = tmp_path / "ckpt" / "old" / "rank_0" / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = next(p for p in manifest["params"] if p["name"] == "positions.weight")
    manifest["params"].remove(entry)
    manifest["buffers"].append({k: entry[k] for k in ("name", "shape", "dtype", "stored")})
    path.write_text(json.dumps(manifest))
    engine, *_ = infinity.initialize(model=freeze_embeddings(fresh_model()), config=cfg)
    try:
        refused = r"frozen parameter\(s\) positions\.weight as buffers.*infinity-consolidate"
        with pytest.raises(CheckpointError, match=refused):
            engine.load_checkpoint(str(tmp_path / "ckpt"), tag="old")
    finally:
        engine.close()
