"""engine.save_pretrained: a folder that Transformers' plain `from_pretrained` loads: the weights as
safetensors shards of at most max_shard_size bytes (model.safetensors when one is enough, else
model-0000i-of-0000n.safetensors and model.safetensors.index.json), the model's config.json and, for a
model that generates, generation_config.json.

Streamed: each shard's header is written first (from the parameters' shapes), then its tensors one at a
time, each parameter fetched whole from wherever it lives and dropped once written (tensor_file.py), so host
memory holds one parameter beyond the run's own buffers.  With several ranks every rank takes part in each
parameter's gather, in the same order, and rank 0 alone writes; the call returns on every rank once the
folder is complete.  A parameter tied to another (GPT-2's lm_head and wte) is written once, under its first
name, as Transformers writes it; from_pretrained ties it again.

The config files are written through the model's own `config.save_pretrained` and
`generation_config.save_pretrained` (duck-typed: this layer does not import Transformers), with
`architectures` and `dtype` set as Transformers' save_pretrained sets them."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infinity.checkpoint import files
from infinity.checkpoint.protocol import Checkpointable
from infinity.checkpoint.state_dict_file import METADATA
from infinity.checkpoint.tensor_file import TensorFileWriter, TensorSpec
from infinity.errors import UsageError

log = logging.getLogger("infinity.checkpoint")
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class Entry:
    """One tensor of the folder: what the file holds, and the engine's parameter index (None: a buffer, or a
    parameter the engine does not hold, whole in the module)."""

    spec: TensorSpec
    index: int | None


def save_pretrained(engine: Checkpointable, folder: Path, max_shard_size: int | str) -> None:
    """See Engine.save_pretrained."""
    limit = shard_bytes(max_shard_size)
    shards = plan_shards(entries_of(engine), limit)
    with engine.settled("save_pretrained()"):
        if engine.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            _write(engine, folder, shards)
            write_configs(engine.module, folder, engine.dtype)
        else:
            for shard in shards:  # the others' part of every gather, in rank 0's order
                for entry in shard:
                    if entry.index is not None:
                        engine.join_gather(entry.index)
    engine.ranks.barrier("save_pretrained")
    if engine.rank == 0:
        log.info("save_pretrained: wrote %d tensors in %d file(s) to %s", sum(map(len, shards)), len(shards), folder)


def shard_bytes(size: int | str) -> int:
    """max_shard_size as bytes: an int, or a text such as "5GB", "200MB", "2GiB" (Transformers' units)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"save_pretrained: max_shard_size {size!r} is not a size; give bytes as an int or a text "
                         "such as \"5GB\", \"500MB\" or \"2GiB\"")
    return int(float(match.group(1)) * UNITS[unit])


def entries_of(engine: Checkpointable) -> list[Entry]:
    """Every state-dict tensor once (a tied parameter under its first name), in the module's order."""
    index_of = {id(p): i for i, p in enumerate(engine.params)}
    seen: set[int] = set()
    out = []
    for key, tensor in engine.module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        index = index_of.get(id(tensor))
        spec = TensorSpec(key, engine.dtype, tuple(engine.shapes[index])) if index is not None else \
            TensorSpec.of(key, tensor)
        out.append(Entry(spec, index))
    return out


def plan_shards(entries: list[Entry], limit: int) -> list[list[Entry]]:
    """Entries in order, split so that each shard holds at most limit bytes (a larger tensor alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.spec.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.spec.nbytes
    return shards


def _write(engine: Checkpointable, folder: Path, shards: list[list[Entry]]) -> None:
    names = [SINGLE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    state = engine.module.state_dict(keep_vars=True)
    for name, shard in zip(names, shards):
        with TensorFileWriter(folder / name, [e.spec for e in shard], METADATA) as out:
            for e in shard:
                values = state[e.spec.name].detach() if e.index is None else \
                    engine.read_parameter(e.index, e.spec.dtype)  # one host copy at a time
                out.write(e.spec.name, values)
    stale = [p for p in folder.iterdir() if (p.name in (SINGLE, INDEX) or SHARD.fullmatch(p.name))
             and p.name not in names]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e.spec.nbytes for s in shards for e in s)},
                 "weight_map": {e.spec.name: name for name, s in zip(names, shards) for e in s}}
        files.write_bytes(folder, INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        stale = [p for p in stale if p.name != INDEX]
    for path in stale:  # an earlier save's shards, which the new index does not name
        path.unlink(missing_ok=True)
    files.fsync_dir(folder)


def write_configs(module: Any, folder: Path, dtype: torch.dtype) -> None:
    """The model's config.json (and generation_config.json for a model that generates), when it has them."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        log.warning("save_pretrained: the model has no Transformers config; only its weights were written to %s",
                    folder)
        return
    config.architectures = [type(module).__name__]
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    generation = getattr(module, "generation_config", None)
    can_generate = getattr(module, "can_generate", lambda: False)
    if generation is not None and can_generate():
        generation.save_pretrained(folder)
