"""The weight files of a pretrained folder, read one tensor at a time: safetensors (one file, or shards listed
by model.safetensors.index.json) and weights-only torch files (pytorch_model.bin, or shards listed by
pytorch_model.bin.index.json), as `save_pretrained` writes them.

    weights = open_weights(Path("my-model"))
    weights.names()            # every tensor's name, without reading data
    weights.spec("lm_head.weight")   # (dtype, shape) from the header
    weights.read("lm_head.weight")   # a fresh host tensor: the only copy this module keeps
    weights.read("lm_head.weight", out=buffer)   # or into a buffer the caller reuses

[Note: read, not mapped]  safetensors files are read with os.preadv straight into a fresh tensor, one tensor
at a time, instead of through safe_open's memory map: the pages of a mapped file that a copy touches count in
the process's resident set until the map closes, so loading through a map shows the whole file there.  With
preadv the resident growth is the tensor being read.  torch files (.bin) can only be opened through torch.load;
they are opened with mmap=True and weights_only=True, and each tensor is cloned out, so their clean file pages
may show in the resident set until the loading ends (the kernel can drop them; they are never anonymous memory).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infinity.errors import CheckpointError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
HEADER_LIMIT = 100 << 20  # safetensors' own limit on the header
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


@dataclass(frozen=True)
class Spec:
    """A stored tensor's dtype and shape, and where its bytes are (for safetensors)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0


class SafetensorsFile:
    """One safetensors file: its header parsed at open, each tensor read on demand with preadv."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self.specs = self._header()
        except BaseException:
            os.close(self._fd)
            raise

    def _header(self) -> dict[str, Spec]:
        head = os.pread(self._fd, 8, 0)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
        if not 0 < length <= HEADER_LIMIT:
            raise CheckpointError(str(self.path), "is not a safetensors file (no valid header length)",
                                  "save the model again with save_pretrained")
        try:
            header: dict[str, Any] = json.loads(os.pread(self._fd, length, 8))
        except ValueError as err:
            raise CheckpointError(str(self.path), f"has an unreadable safetensors header ({err})") from err
        header.pop("__metadata__", None)
        start, specs = 8 + length, {}
        for name, entry in header.items():
            if entry["dtype"] not in DTYPES:
                raise CheckpointError(str(self.path), f"tensor {name!r} has dtype {entry['dtype']}, which infinity "
                                      f"does not read; store it as one of {', '.join(DTYPES)}")
            begin, end = entry["data_offsets"]
            specs[name] = Spec(DTYPES[entry["dtype"]], tuple(entry["shape"]), start + begin, start + end)
        return specs

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.specs[name]
        out = torch.empty(spec.shape, dtype=spec.dtype) if out is None else out
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        if len(view) != spec.end - spec.begin:
            raise CheckpointError(str(self.path), f"tensor {name!r} holds {spec.end - spec.begin} bytes, but its "
                                  f"shape {list(spec.shape)} of {spec.dtype} needs {len(view)}")
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], spec.begin + done)
            if n <= 0:
                raise CheckpointError(str(self.path), f"ends inside tensor {name!r} (read {done} of {len(view)} "
                                      "bytes)", "the file is truncated: copy or save it again")
            done += n
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class TorchFile:
    """One weights-only torch file, memory-mapped; each tensor cloned out when read."""

    def __init__(self, path: Path):
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises several kinds for a file it cannot load
            raise CheckpointError(str(path), f"cannot be loaded with torch.load(weights_only=True, mmap=True): "
                                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                                  "save the model with save_pretrained (safetensors) instead") from err
        if not isinstance(state, dict):
            raise CheckpointError(str(path), f"holds a {type(state).__name__}, not a state dict of tensors")
        self._state: dict[str, torch.Tensor] | None = state
        self.specs = {k: Spec(v.dtype, tuple(v.shape)) for k, v in state.items() if isinstance(v, torch.Tensor)}

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._state is None:
            raise CheckpointError(str(self.path), f"tensor {name!r} was read after the file was closed")
        return self._state[name].clone() if out is None else out.copy_(self._state[name])

    def close(self) -> None:
        self._state = None


class Weights:
    """Every tensor of a pretrained folder, by name, over its one or several files (opened when first read)."""

    def __init__(self, folder: Path, files: dict[str, str], kind: type[SafetensorsFile] | type[TorchFile]):
        self.folder, self._kind = folder, kind
        self._file_of = files  # tensor name -> file name
        self._open: dict[str, SafetensorsFile | TorchFile] = {}
        self._specs: dict[str, Spec] = {}
        for file in dict.fromkeys(files.values()):
            opened = self._file(file)
            self._specs.update((k, s) for k, s in opened.specs.items() if self._file_of.get(k) == file)
            if kind is TorchFile:  # [Note: read, not mapped]: one mapped torch file open at a time
                opened.close()
                del self._open[file]
        missing = sorted(set(files) - set(self._specs))
        if missing:
            raise CheckpointError(str(folder), f"its index lists tensors its files do not hold: {missing[:5]}",
                                  "save the model again with save_pretrained")

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(self._file_of.values()))

    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> Spec:
        return self._specs[name]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, in a fresh host tensor or in out (contiguous, of its dtype and shape)."""
        return self._file(self._file_of[name]).read(name, out)

    def _file(self, file: str) -> SafetensorsFile | TorchFile:
        if file not in self._open:
            if self._kind is TorchFile:
                self.close()  # [Note: read, not mapped]
            path = self.folder / file
            if not path.is_file():
                raise CheckpointError(str(path), "is named by the folder's index but does not exist",
                                      "copy the whole folder save_pretrained wrote")
            self._open[file] = self._kind(path)
        return self._open[file]

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> "Weights":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_weights(folder: Path, use_safetensors: bool | None = None) -> Weights:
    """The weights save_pretrained wrote in folder: safetensors first (unless use_safetensors is False), then
    torch files; a CheckpointError naming what was looked for when none is there."""
    choices = [(SAFETENSORS, SAFETENSORS_INDEX, SafetensorsFile), (TORCH_BIN, TORCH_BIN_INDEX, TorchFile)]
    if use_safetensors is False:
        choices.reverse()
    elif use_safetensors:
        choices = choices[:1]
    for single, index, kind in choices:
        if (folder / single).is_file():
            return Weights(folder, _names_of(folder / single, kind), kind)
        if (folder / index).is_file():
            return Weights(folder, _weight_map(folder / index), kind)
    looked = ", ".join(name for single, index, _ in choices for name in (single, index))
    raise CheckpointError(str(folder), f"holds no weights: none of {looked} is there",
                          "pass the folder that save_pretrained wrote")


def _names_of(path: Path, kind: type[SafetensorsFile] | type[TorchFile]) -> dict[str, str]:
    opened = kind(path)
    try:
        return dict.fromkeys(opened.specs, path.name)
    finally:
        opened.close()


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(str(index), f"is not an index of weight shards ({type(err).__name__}: {err})",
                              "it needs a weight_map from tensor name to file name") from err
    return {str(k): str(v) for k, v in weight_map.items()}

