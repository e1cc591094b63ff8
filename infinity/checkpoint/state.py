"""The small state of a run: step counters, the optimizer's per-group step, the loss scaler, random
generators, the client's own state.  JSON and safetensors, or a torch file that loads with
weights_only=True: nothing in a checkpoint unpickles arbitrary objects."""
from __future__ import annotations

import dataclasses
import enum
import io
import json
import random
from typing import Any

import numpy as np
import torch

from infinity.checkpoint.format import refusal
from infinity.checkpoint.protocol import Checkpointable
from infinity.errors import CheckpointError


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
        "loss_scaler": None if scaler is None else scaler.state_dict(),  # scale, good_steps, hysteresis, skipped_steps
        "python_random": [version, list(internal), gauss],
        "numpy_random": {"pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def rng_tensors() -> dict[str, torch.Tensor]:
    """rng.safetensors' content."""
    _, keys, *_ = np.random.get_state(legacy=True)  # type: ignore[misc]
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32))}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda/{i}"] = state
    return tensors


def restore(engine: Checkpointable, state: dict[str, Any], rng: dict[str, torch.Tensor], where: str) -> None:
    """Puts state.json's and rng.safetensors' values back into the engine and the random generators."""
    engine.counters.load_state_dict(state)
    engine.load_optimizer_steps(state["optimizer_step"], where)
    scaler = engine.loss_scaler
    if scaler is not None and state["loss_scaler"] is not None:
        scaler.load_state_dict(state["loss_scaler"])
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
