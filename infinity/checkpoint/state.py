"""The small state of a run: step counters, the optimizer's per-group step, the loss scaler, random
generators, the client's own state.  JSON and safetensors, or a torch file that loads with
weights_only=True: nothing in a checkpoint unpickles arbitrary objects."""
from __future__ import annotations

import dataclasses
import enum
import io
import json
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from infinity.errors import CheckpointError

if TYPE_CHECKING:
    from infinity.zero.engine import Engine


def engine_state(engine: "Engine") -> dict[str, Any]:
    """state.json's content."""
    steps = engine.optimizer.steps
    scaler = engine.scaler
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    version, internal, gauss = random.getstate()
    return {
        "global_steps": engine.global_steps,
        "micro_steps": engine.micro_steps,
        "lr": engine.lr,
        # The optimizer's step counter of each parameter's sub-group (all equal unless a run changed them).
        "optimizer_step": {s.name: float(steps[s.group]) for g in engine.groups for s in g.slices},
        "loss_scaler": None if scaler is None else {"scale": scaler.scale, "good_steps": scaler._good_steps,
                                                    "hysteresis": scaler._hysteresis,
                                                    "skipped_steps": scaler.skipped_steps},
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


def restore(engine: "Engine", state: dict[str, Any], rng: dict[str, torch.Tensor], where: str) -> None:
    """Puts state.json's and rng.safetensors' values back into the engine and the random generators."""
    engine.global_steps, engine.micro_steps = int(state["global_steps"]), int(state["micro_steps"])
    saved = state["optimizer_step"]
    for g in engine.groups:
        values = {saved[s.name] for s in g.slices}
        if len(values) != 1:
            raise CheckpointError(where, f"sub-group {g.index}'s parameters were saved at different optimizer "
                                  f"steps {sorted(values)}", "load with the sub_group_size the run was saved with")
        engine.optimizer.steps[g.index].fill_(values.pop())
    if engine.scaler is not None and state["loss_scaler"] is not None:
        s = state["loss_scaler"]
        engine.scaler.scale, engine.scaler._good_steps = float(s["scale"]), int(s["good_steps"])
        engine.scaler._hysteresis, engine.scaler.skipped_steps = int(s["hysteresis"]), int(s["skipped_steps"])
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
        first = str(err).strip().splitlines()
        reason = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise CheckpointError(where, f"client_state holds an object that torch.load(weights_only=True) refuses "
                              f"({reason.strip()})", "keep client_state to tensors, numbers, strings, None and "
                              "lists, tuples and dicts of those (or register the class with "
                              "torch.serialization.add_safe_globals)") from None
    return data


def settings_json(settings: Any) -> dict[str, Any]:
    """The engine's settings as JSON values (enums by value, other objects as text)."""
    def text(obj: Any) -> Any:
        return obj.value if isinstance(obj, enum.Enum) else str(obj)
    return json.loads(json.dumps(dataclasses.asdict(settings), default=text))
