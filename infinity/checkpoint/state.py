"""The small state of a run: step counters, the optimizer's per-group step, the loss scaler, random
generators, the client's own state.  JSON and safetensors, or a torch file that loads with
weights_only=True: nothing in a checkpoint unpickles arbitrary objects."""
from __future__ import annotations

import dataclasses
import enum
import io
import json
import logging
import random
from typing import Any

import numpy as np
import torch

from infinity.checkpoint.format import refusal
from infinity.checkpoint.protocol import Checkpointable
from infinity.checkpoint.restored import WHOLE, Restored
from infinity.errors import CheckpointError

log = logging.getLogger("infinity.checkpoint")


def engine_state(engine: Checkpointable) -> dict[str, Any]:
    """state.json's content (its keys, and the loss scaler's, are the format's: format.py)."""
    scaler = engine.loss_scaler
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    version, internal, gauss = random.getstate()
    return {
        **engine.counters.state_dict(),  # global_steps, micro_steps
        "lr": engine.lr,
        # The optimizer's step counter of each parameter's sub-group (all equal unless a run changed them).
        "optimizer_step": engine.optimizer_steps(),
        "param_groups": groups_state(engine),
        "lr_scheduler": scheduler_state(engine.client_scheduler),
        "loss_scaler": None if scaler is None else scaler.state_dict(),  # scale, good_steps, hysteresis, skipped_steps
        "python_random": [version, list(internal), gauss],
        "numpy_random": {"pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def groups_state(engine: Checkpointable) -> list[dict[str, Any]]:
    """Each parameter group: its trained parameters' names and its hyperparameters that JSON holds (numbers,
    strings, booleans, None, and lists of those, as betas), as torch's optimizer state_dict keeps them."""
    names = trained_names(engine)
    return [{"params": [names[id(p)] for p in group["params"] if id(p) in names],
             **{k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k != "params" and _plain(v)}}
            for group in engine.param_groups]


def scheduler_state(scheduler: Any) -> dict[str, Any] | None:
    """The client scheduler's state_dict when JSON holds it (torch's schedulers' do: numbers, lists and
    None where a lambda was); otherwise None, with a warning that it is not saved."""
    if scheduler is None:
        return None
    values = scheduler.state_dict()
    try:
        json.dumps(values)
    except (TypeError, ValueError):
        log.warning("save_checkpoint: the lr_scheduler's state_dict holds values JSON cannot (%s); it is not "
                    "saved: restore the scheduler yourself (client_state)", type(scheduler).__name__)
        return None
    return values


def check_groups(engine: Checkpointable, state: dict[str, Any], where: str) -> None:
    """The saved parameter groups hold the same parameters as the engine's (restore then puts their
    hyperparameters back, as torch's load_state_dict does).  Checkpoints before parameter groups have none."""
    if "param_groups" not in state:
        return
    saved = state["param_groups"]
    names = trained_names(engine)
    mine = [[names[id(p)] for p in group["params"] if id(p) in names] for group in engine.param_groups]
    theirs = [group["params"] for group in saved]
    if mine != theirs:
        raise CheckpointError(where, f"was saved with {len(theirs)} parameter groups of {[len(g) for g in theirs]} "
                              f"parameters; this run has {len(mine)} of {[len(g) for g in mine]} (or the same "
                              "sizes holding other parameters)", "build the engine with the parameter groups the "
                              "run was saved with (initialize's model_parameters or optimizer)")


def trained_names(engine: Checkpointable) -> dict[int, str]:
    """id -> name of each trained parameter (a frozen one is in no group's state, even where a group lists it)."""
    return {id(p): n for i, (n, p) in enumerate(zip(engine.names, engine.params)) if i not in engine.frozen}


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def rng_tensors() -> dict[str, torch.Tensor]:
    """rng.safetensors' content."""
    _, keys, *_ = np.random.get_state(legacy=True)  # type: ignore[misc]
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32))}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda/{i}"] = state
    return tensors


def restore(engine: Checkpointable, state: dict[str, Any], rng: dict[str, torch.Tensor], where: str,
            restored: Restored = WHOLE) -> None:
    """Puts the parts restored names (checkpoint/restored.py) of state.json's and rng.safetensors' values back
    into the engine and the random generators."""
    if Restored.PROGRESS in restored:
        restore_progress(engine, state, rng, Restored.SCHEDULE in restored)
    if Restored.OPTIMIZER in restored:
        engine.load_optimizer_steps(state["optimizer_step"], where)
        kept = () if Restored.SCHEDULE in restored else SCHEDULED  # the untouched schedule's lr stays
        for group, values in zip(engine.param_groups, state.get("param_groups", [])):  # check_groups passed
            for k, v in values.items():
                if k != "params" and k not in kept:
                    group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
        scaler = engine.loss_scaler
        if scaler is not None and state["loss_scaler"] is not None:
            scaler.load_state_dict(state["loss_scaler"])
    scheduler = engine.client_scheduler
    if Restored.SCHEDULE in restored and scheduler is not None and state.get("lr_scheduler") is not None:
        scheduler.load_state_dict(state["lr_scheduler"])
        last = getattr(scheduler, "get_last_lr", None)
        if Restored.OPTIMIZER not in restored and last is not None:  # the groups' lr is the scheduler's
            for group, lr in zip(engine.param_groups, last()):
                group["lr"] = lr


SCHEDULED = ("lr", "initial_lr")  # what a schedule sets on the groups (torch's schedulers add initial_lr)
SCHEDULE_STEPS = "schedule_steps"  # the counters' entry that is the lr schedule's position


def restore_progress(engine: Checkpointable, state: dict[str, Any], rng: dict[str, torch.Tensor],
                     schedule: bool) -> None:
    """The counters (the schedule's position too when schedule is True, else the engine's stays) and the
    random generators."""
    values = dict(state)
    if not schedule:
        values[SCHEDULE_STEPS] = engine.counters.state_dict()[SCHEDULE_STEPS]
    engine.counters.load_state_dict(values)
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy_random"]
    np.random.set_state(("MT19937", rng["numpy_keys"].numpy(), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(rng["torch_cpu"])
    cuda = sorted(k for k in rng if k.startswith("torch_cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in cuda][: torch.cuda.device_count()])


def client_state_bytes(client_state: Any, where: str) -> bytes:
    """client_state as torch.save writes it, refused unless torch.load(weights_only=True) takes it back."""
    out = io.BytesIO()
    torch.save(client_state, out)
    data = out.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:  # torch raises UnpicklingError naming the global it refuses
        raise CheckpointError(where, f"client_state holds an object that torch.load(weights_only=True) refuses "
                              f"({refusal(err)})", "keep client_state to tensors, numbers, strings, None and "
                              "lists, tuples and dicts of those (or register the class with "
                              "torch.serialization.add_safe_globals)") from None
    return data


def settings_json(settings: Any) -> dict[str, Any]:
    """The engine's settings as JSON values (enums by value, other objects as text)."""
    def text(obj: Any) -> Any:
        return obj.value if isinstance(obj, enum.Enum) else str(obj)
    return json.loads(json.dumps(dataclasses.asdict(settings), default=text))
