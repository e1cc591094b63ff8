"""A whole model's state dict written as one file, tensor by tensor: what engine.save_16bit_model and
infinity-consolidate write.  safetensors is streamed (one tensor in memory at a time); torch's format
(torch.save of a dict, loadable with torch.load(weights_only=True)) needs the whole dict at once."""
from __future__ import annotations

import enum
import errno
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from infinity.checkpoint import files
from infinity.checkpoint.tensor_file import TensorFileWriter, TensorSpec
from infinity.errors import CheckpointError


class StateDictFormat(enum.Enum):
    """How the file is written, and what peak memory that takes."""

    SAFETENSORS = "safetensors"  # header, then each tensor as it comes: peak ~ the largest tensor
    TORCH = "torch"  # torch.save of the whole dict: peak ~ the whole state dict

    @classmethod
    def of_filename(cls, name: str) -> "StateDictFormat":
        """safetensors for a name ending in .safetensors, torch's format for any other (pytorch_model.bin)."""
        return cls.SAFETENSORS if name.endswith(".safetensors") else cls.TORCH


# What safetensors readers (transformers among them) expect to find in the header's __metadata__.
METADATA = {"format": "pt"}


def write_state_dict(path: Path, specs: Sequence[TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]],
                     how: StateDictFormat, metadata: Mapping[str, str] | None = None) -> None:
    """Writes the tensors specs name, which `tensors` yields in the same order, durably to path
    (temporary name, fsync, rename); a CheckpointError when they differ from specs."""
    if how is StateDictFormat.SAFETENSORS:
        with TensorFileWriter(path, specs, {**METADATA, **(metadata or {})}) as out:
            for name, tensor in tensors:
                out.write(name, tensor)
        return
    state: dict[str, torch.Tensor] = {}
    for spec, (name, tensor) in zip(specs, tensors, strict=True):
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise CheckpointError(str(path), f"tensor {name!r} ({tensor.dtype}, {tuple(tensor.shape)}) is not the "
                                  f"expected {spec.name!r} ({spec.dtype}, {spec.shape})")
        state[name] = tensor.detach().to("cpu", copy=True)
    _save_durably(state, path)


def _save_durably(state: dict[str, torch.Tensor], path: Path) -> None:
    tmp = files.temp_path(path)
    try:
        with open(tmp, "xb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as err:  # torch.save's "[enforce fail at inline_container.cc] ..." hides the errno
        full = files.drive_full(tmp)  # (asked before the file goes and frees its blocks)
        tmp.unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    files.fsync_dir(path.parent)
