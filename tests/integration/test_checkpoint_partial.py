"""load_checkpoint's partial loads, DeepSpeed's keywords (infinity/checkpoint/restored.py): an engine that
trained 3 steps saves; a second engine, which trained 2 steps of its own first (so that fresh and kept
differ), loads with one keyword; what was restored and what was not is checked exactly (weights bit for
bit; the next steps against a plain torch AdamW started from the loaded weights, with the moments fresh or
the checkpoint's; the schedule's position and the counters), with parameters and optimizer on NVMe and in
host memory."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import infinity
from infinity.checkpoint.format import OPTIMIZER_FILE
from training_reference import ADAM, fresh_model, make_batches

SAVED_AT, OWN, NEXT = 3, 2, 2  # steps before the save; the loading engine's own steps; steps after the load
KEYWORDS = {"whole": {}, "load_optimizer_states=False": {"load_optimizer_states": False},
            "load_lr_scheduler_states=False": {"load_lr_scheduler_states": False},
            "load_module_only=True": {"load_module_only": True}}


def config(swap, device: str) -> dict:
    where = {"device": device, **({"nvme_path": str(swap)} if device == "nvme" else {})}
    zero = {"stage": 3, "sub_group_size": 20_000, "stage3_param_persistence_threshold": 0,
            "offload_param": where, "offload_optimizer": {**where, "buffer_count": 4}}
    return {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": ADAM.lr, "weight_decay": ADAM.weight_decay}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3,
                                                         "warmup_num_steps": 8, "warmup_type": "linear"}}}


def step(engine, batch) -> float:
    loss = engine(*batch)
    engine.backward(loss)
    engine.step()
    return loss.item()


def saved_run(tmp_path, device: str, batches) -> dict[str, torch.Tensor]:
    """Trains SAVED_AT steps, saves, trains on; the weights at the save."""
    engine, _, _, _ = infinity.initialize(model=fresh_model(), config=config(tmp_path / "a", device))
    try:
        for batch in batches[:SAVED_AT]:
            step(engine, batch)
        engine.save_checkpoint(str(tmp_path / "ckpt"))
        weights = engine.parameter_values()
        for batch in batches[SAVED_AT:SAVED_AT + 2]:
            step(engine, batch)
        return weights
    finally:
        engine.close()


def torch_steps(weights, moments, batches, lrs) -> dict[str, torch.Tensor]:
    """A plain torch AdamW from weights (with moments: {name: (step, exp_avg, exp_avg_sq)}, else fresh), each
    step at the lr given, clipped to 1.0 as the engine."""
    model = fresh_model()
    model.load_state_dict(weights, strict=False)
    opt = torch.optim.AdamW(model.parameters(), lr=ADAM.lr, betas=ADAM.betas, eps=ADAM.eps,
                            weight_decay=ADAM.weight_decay)
    for name, p in model.named_parameters():
        if moments is not None:
            count, m, v = moments[name]
            opt.state[p] = {"step": torch.tensor(count), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    for (x, y), lr in zip(batches, lrs):
        opt.param_groups[0]["lr"] = lr
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def saved_moments(tmp_path, weights) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """The checkpoint's Adam moments of each parameter, read from its optimizer file."""
    files = load_file(str(tmp_path / "ckpt" / f"global_step{SAVED_AT}" / "rank_0" / OPTIMIZER_FILE))
    return {n: (float(SAVED_AT), files[f"exp_avg/{n}"][:w.numel()].view(w.shape),
                files[f"exp_avg_sq/{n}"][:w.numel()].view(w.shape)) for n, w in weights.items()}


@pytest.mark.parametrize("device", ["nvme", "cpu"])
@pytest.mark.parametrize("keyword", list(KEYWORDS))
def test_a_partial_load_restores_exactly_what_its_keyword_names(tmp_path, device, keyword):
    batches = make_batches()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    weights = saved_run(tmp_path, device, batches)
    kw = KEYWORDS[keyword]
    engine, _, _, scheduler = infinity.initialize(model=fresh_model(), config=config(tmp_path / "b", device))
    try:
        for batch in batches[10:10 + OWN]:  # the loading engine's own history
            step(engine, batch)
        own_position, own_lr = scheduler.last_batch_iteration, engine.get_lr()
        folder, _ = engine.load_checkpoint(str(tmp_path / "ckpt"), **kw)
        assert folder == str(tmp_path / "ckpt" / f"global_step{SAVED_AT}")
        loaded = engine.parameter_values()
        assert loaded.keys() == weights.keys()
        assert all(torch.equal(loaded[n], weights[n]) for n in weights)  # bit for bit, with every keyword

        progress = not kw.get("load_module_only")
        schedule = progress and kw.get("load_lr_scheduler_states", True)
        optimizer = progress and kw.get("load_optimizer_states", True)
        assert engine.global_steps == (SAVED_AT if progress else OWN)
        assert engine.global_samples == 4 * (SAVED_AT if progress else OWN)
        if schedule:
            assert scheduler.last_batch_iteration == SAVED_AT - 1  # the saving run's position
        else:
            assert (scheduler.last_batch_iteration, engine.get_lr()) == (own_position, own_lr)

        lrs = []
        for batch in batches[SAVED_AT:SAVED_AT + NEXT]:
            lrs.append(engine.get_lr()[0])
            step(engine, batch)
        got = engine.parameter_values()
    finally:
        engine.close()
    moments = saved_moments(tmp_path, weights) if optimizer else None
    want = torch_steps(weights, moments, batches[SAVED_AT:SAVED_AT + NEXT], lrs)
    for name, w in want.items():
        assert torch.allclose(got[name], w, rtol=0, atol=1e-5), name


def test_load_lr_scheduler_states_false_leaves_a_client_scheduler_untouched(tmp_path):
    """A torch scheduler given to initialize: restored with the whole checkpoint, left as it is (its state and
    the groups' lr) with load_lr_scheduler_states=False; with load_optimizer_states=False the groups take
    the restored scheduler's lr."""
    batches = make_batches()
    cfg = {**config(tmp_path, "cpu")}
    del cfg["scheduler"]

    def build():
        return infinity.initialize(model=fresh_model(), config=cfg,
                                   lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))

    engine, _, _, scheduler = build()
    try:
        for batch in batches[:SAVED_AT]:
            step(engine, batch)
        engine.save_checkpoint(str(tmp_path / "ckpt"))
        saved = scheduler.state_dict()
    finally:
        engine.close()
    for kw, restored in (({}, True), ({"load_lr_scheduler_states": False}, False),
                         ({"load_optimizer_states": False}, True)):
        engine, _, _, scheduler = build()
        try:
            step(engine, batches[10])
            own = scheduler.state_dict()
            engine.load_checkpoint(str(tmp_path / "ckpt"), **kw)
            assert scheduler.state_dict() == (saved if restored else own), kw
            assert engine.get_lr() == (saved if restored else own)["_last_lr"], kw
        finally:
            engine.close()


def test_custom_load_fn_is_refused_naming_it(tmp_path):
    from infinity.errors import UsageError

    engine, _, _, _ = infinity.initialize(model=fresh_model(), config=config(tmp_path, "cpu"))
    try:
        with pytest.raises(UsageError, match="custom_load_fn"):
            engine.load_checkpoint(str(tmp_path), custom_load_fn=lambda module, state: None)
    finally:
        engine.close()


@pytest.mark.parametrize("keyword", ["load_optimizer_states=False", "load_module_only=True"])
def test_bf16_masters_are_the_saved_fp32_ones_and_the_moments_zero(tmp_path, keyword):
    """Where DeepSpeed sets the masters from the bf16 weights: the saved fp32 masters, bit for bit (read back
    by saving again), and the moments zero, the step counts 0."""
    from checkpoint_run import settings
    from infinity.zero import Engine, Precision

    batches = make_batches()
    (tmp_path / "swap").mkdir()
    engine = Engine(fresh_model(), settings(str(tmp_path / "swap"), precision=Precision.BF16))
    try:
        for batch in batches[:SAVED_AT]:
            step(engine, batch)
        engine.save_checkpoint(str(tmp_path / "first"))
    finally:
        engine.close()
    engine = Engine(fresh_model(), settings(str(tmp_path / "swap"), precision=Precision.BF16))
    try:
        step(engine, batches[10])
        engine.load_checkpoint(str(tmp_path / "first"), **KEYWORDS[keyword])
        engine.save_checkpoint(str(tmp_path / "again"), tag="again")
    finally:
        engine.close()
    first = load_file(str(tmp_path / "first" / f"global_step{SAVED_AT}" / "rank_0" / OPTIMIZER_FILE))
    again = load_file(str(tmp_path / "again" / "again" / "rank_0" / OPTIMIZER_FILE))
    masters = [k for k in first if k.startswith("master/")]
    assert masters and all(torch.equal(first[k], again[k]) for k in masters)
    assert not any(torch.equal(first[k].bfloat16().float(), first[k]) for k in masters)  # low bits to lose
    assert all(not again[k].any() for k in again if not k.startswith("master/"))
    saved = json.loads((tmp_path / "again" / "again" / "rank_0" / "state.json").read_text())
    assert set(saved["optimizer_step"].values()) == {0.0}
