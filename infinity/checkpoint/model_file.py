"""engine.save_16bit_model: the whole model's weights in the compute dtype (bf16, fp16, or fp32 when
neither is on), and its persistent buffers, as one file that the plain torch model loads with
load_state_dict(strict=True).

Parameters are fetched whole one at a time from wherever they live (NVMe, host, compute tier), written
and released, so host memory holds one parameter beyond the run's own buffers.  With several ranks the
fetch is an all-gather: every rank walks the same state-dict keys in the same order, and rank 0 alone
writes.  Like DeepSpeed, a stage-3 config with zero_optimization.stage3_gather_16bit_weights_on_model_save
off writes nothing and returns False (with a warning naming the key)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch

from infinity.checkpoint.state_dict_file import StateDictFormat, write_state_dict
from infinity.checkpoint.tensor_file import TensorSpec
from infinity.checkpoint.protocol import Checkpointable
from infinity.errors import UsageError

log = logging.getLogger("infinity.checkpoint")


def save_16bit_model(engine: Checkpointable, save_dir: Path, save_filename: str, exclude_frozen: bool) -> bool:
    """See Engine.save_16bit_model (which returns False itself when the config says not to gather); True
    when the file was written (on rank 0) or gathered (other ranks)."""
    path = save_dir / save_filename
    if not save_filename or Path(save_filename).name != save_filename:
        raise UsageError(f"save_16bit_model: save_filename {save_filename!r} must be a plain file name (the folder "
                         "goes in save_dir)")
    entries = _entries(engine, exclude_frozen)
    with engine.settled("save_16bit_model()"):
        if engine.rank != 0:
            for _, index in entries:  # the others' part of every gather, in rank 0's order
                if index is not None:
                    engine.join_gather(index)
            return True
        save_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(_tensors(engine, entries)) as tensors:  # a failed write stops the fetching
            write_state_dict(path, [spec for spec, _ in entries], tensors, StateDictFormat.of_filename(save_filename))
    log.info("save_16bit_model: wrote %d tensors to %s", len(entries), path)
    return True


def _entries(engine: Checkpointable, exclude_frozen: bool) -> list[tuple[TensorSpec, int | None]]:
    """(what the file holds, the engine's parameter index or None) for each state-dict key, in order; frozen
    parameters (requires_grad=False) left out with exclude_frozen."""
    index_of = {id(p): i for i, p in enumerate(engine.params)}
    dtype = engine.dtype
    out: list[tuple[TensorSpec, int | None]] = []
    for key, tensor in engine.module.state_dict(keep_vars=True).items():
        index = index_of.get(id(tensor))
        if index is not None and not (exclude_frozen and index in engine.frozen):
            out.append((TensorSpec(key, dtype, tuple(engine.shapes[index])), index))
        elif index is None and not (exclude_frozen and isinstance(tensor, torch.nn.Parameter)):
            out.append((TensorSpec.of(key, tensor), None))
    return out


def _tensors(engine: Checkpointable, entries: list[tuple[TensorSpec, int | None]]) -> Iterator[tuple[str, torch.Tensor]]:
    module_state = engine.module.state_dict(keep_vars=True)
    for spec, index in entries:
        if index is None:
            yield spec.name, module_state[spec.name].detach()
            continue
        yield spec.name, engine.read_parameter(index, spec.dtype)  # one host copy at a time
