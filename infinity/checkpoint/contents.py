"""What a checkpoint holds of an engine: the tensors of model.safetensors and optimizer.safetensors,
each with the place its values live (engine.param_part and engine.optimizer_part: checkpoint/protocol.py), and the
manifest's entries for them.  Save and load build the same lists, so they agree by construction."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from infinity.checkpoint.format import (SAFETENSORS_DTYPES, BufferEntry, ParamEntry, dtype_name, element_size,
                                        optimizer_tensor, stored_numel)
from infinity.errors import CheckpointError
from infinity.memory.stream import HostPart
from infinity.checkpoint.protocol import Checkpointable
from infinity.checkpoint.tensors import StoredTensor


@dataclass(frozen=True)
class Contents:
    params: tuple[ParamEntry, ...]
    buffers: tuple[BufferEntry, ...]
    model: tuple[StoredTensor, ...]  # parameters' parts in engine order, then buffers
    optimizer: tuple[StoredTensor, ...]  # every master, then each optimizer state's (Adam: exp_avg, exp_avg_sq)

    @property
    def largest(self) -> int:
        """Data bytes of the larger of the two files (staging never needs more)."""
        return max(sum(s.nbytes for s in self.model), sum(s.nbytes for s in self.optimizer))


def contents_of(engine: Checkpointable) -> Contents:
    dtype = engine.dtype
    aliases = aliases_of(engine)
    params = tuple(ParamEntry.of(shard, dtype, aliases.get(shard.name, ()), frozen=i in engine.frozen)
                   for i, shard in enumerate(engine.shards))
    model = [StoredTensor(p.name, dtype, p.stored, engine.param_part(i)) for i, p in enumerate(params)]
    buffers = []
    for name, tensor in extra_tensors(engine):
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(name, f"buffer {name!r} is {tensor.dtype}, which a checkpoint cannot hold",
                                  f"use one of {', '.join(dtype_name(d) for d in SAFETENSORS_DTYPES)}")
        entry = BufferEntry(name, tuple(tensor.shape), dtype_name(tensor.dtype),
                            stored_numel(tensor.numel(), element_size(tensor.dtype)))
        buffers.append(entry)
        model.append(StoredTensor(name, tensor.dtype, entry.stored, HostPart(tensor)))
    optimizer = [StoredTensor(optimizer_tensor(state, p.name), torch.float32, stored_numel(p.real, 4),
                            engine.optimizer_part(i, state))
                 for state in engine.optimizer_states for i, p in enumerate(params) if not p.frozen]
    return Contents(params, tuple(buffers), tuple(model), tuple(optimizer))


def aliases_of(engine: Checkpointable) -> dict[str, tuple[str, ...]]:
    """The other state_dict keys of each tied parameter (named_parameters lists it once, under its
    first name; state_dict lists it under every one), so that a consolidated file has them all."""
    first = {id(p): name for name, p in zip(engine.names, engine.params)}
    found: dict[str, list[str]] = {}
    for key, t in engine.module.state_dict(keep_vars=True).items():
        name = first.get(id(t))
        if name is not None and key != name:
            found.setdefault(name, []).append(key)
    return {name: tuple(keys) for name, keys in found.items()}


def extra_tensors(engine: Checkpointable) -> list[tuple[str, torch.Tensor]]:
    """Persistent buffers, and parameters the engine does not hold (frozen integer ones): the state_dict
    entries that are not the engine's parameters."""
    held = {id(p) for p in engine.params}
    return [(name, t) for name, t in engine.module.state_dict(keep_vars=True).items() if id(t) not in held]
