"""The checkpoint format (version 1): what engine.save_checkpoint writes and load_checkpoint and
infinity-consolidate read.  This docstring is the specification.

Layout::

    CKPT_DIR/latest                 the tag of the last complete checkpoint (UTF-8 text, one line)
    CKPT_DIR/TAG/rank_<r>/          one folder per rank r, written only by rank r
        model.safetensors           the rank's part of every parameter the engine holds (trained, and
                                    frozen: requires_grad=False), compute dtype (tensor name: the
                                    parameter's name), then every persistent buffer and parameter the
                                    engine does not hold (an integer one) whole (tensor name: its
                                    state_dict key).  Checkpoints before frozen parameters were held
                                    listed them here, whole, as buffers
        optimizer.safetensors       fp32 "master/<name>" for each trained parameter in engine order, then
                                    each of the optimizer's states the same way: Adam "exp_avg/<name>",
                                    then "exp_avg_sq/<name>"; Lion "exp_avg"; SGD "momentum_buffer";
                                    Adagrad "sum" (a torch optimizer's own state names)
        rng.safetensors             "torch_cpu" (uint8), "torch_cuda/<i>" per CUDA device (uint8),
                                    "numpy_keys" (uint32, 624): the random generators' states
        state.json                  scalars: global_steps, micro_steps, skipped_steps, global_samples
                                    (the last two absent before issue 21: read as 0), schedule_steps (the lr
                                    schedule's position; absent before: global_steps - skipped_steps), lr, per-parameter
                                    optimizer step counters, loss scaler, python and numpy random scalars,
                                    param_groups (each group's parameter names and hyperparameters),
                                    lr_scheduler (a client scheduler's state_dict, or null)
        client_state.pt             torch.save of the client_state dict; loads with
                                    torch.load(weights_only=True)
        manifest.json               written last: a Manifest (below) listing every other file's size
                                    and checksum

Tensors of model.safetensors and optimizer.safetensors are 1-D.  A tensor holding `real` elements
of element size e stores `stored_numel(real, e)` elements: real rounded up so that its bytes are a
multiple of ALIGNMENT (4096); readers ignore the padding.  The safetensors header is padded with
spaces so that the data starts ALIGNMENT bytes into the file, hence every tensor starts on an
ALIGNMENT boundary of the file (O_DIRECT transfers, straight from and to swap files).  The manifest
gives each tensor's real shape: a trainable parameter's part is `Shard` (infinity/shard.py):
flat elements [start, start + length) of the parameter, of which `real` are the parameter's; the
rank's first `real` stored elements are those.  A replicated parameter is held whole by every rank.
A buffer's first numel elements, reshaped to its shape, are the buffer.

Durability: a rank's files are written into TAG/.rank_<r>.saving, each to a temporary name
(".<name>.tmp-<pid>"), fsynced and renamed, the manifest last; once every rank has, each puts its folder
in place as TAG/rank_<r> (an earlier save's is exchanged atomically and removed: save.py), and then
`latest` is replaced the same way.  The manifest's `save_id` is the same in every rank folder of one
save; load refuses folders of different saves.

Checksums: `checksum` (of the file's bytes, lowercase hex) and `bytes` of every file but the manifest
are in the manifest's `files`; the manifest's own `checksum` names the algorithm.  New checkpoints use
crc32c (CRC-32C, the Castagnoli polynomial, as iSCSI and ext4 metadata use it; 8 hex digits); manifests
that name sha256 (infinity before crc32c) are read too.

[Note: why crc32c]  The checksum guards against accidental damage (a truncated copy, a flipped bit, a
file from another save), which CRC-32C detects (every burst of up to 32 bits; any other damage missed
with odds of 2^-32), not against someone forging a file; loading never unpickles, so a forged file can
hold wrong numbers but cannot run code.  It runs at about 14 GB/s on one core with the CPU's crc32
instruction, where sha256 runs at 1.7 GB/s: with sha256 the checksum alone held a save to 0.75 x a
drive's one-way bandwidth (docs/benchmarks.md).
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import crc32c

import torch

from infinity.errors import CheckpointError
from infinity.io.align import DEFAULT_ALIGNMENT, round_up
from infinity.shard import Shard

FORMAT = "infinity-checkpoint"
VERSION = 1
ALIGNMENT = DEFAULT_ALIGNMENT
LATEST = "latest"
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
CLIENT_STATE_FILE = "client_state.pt"
CHECKSUM = "crc32c"  # the algorithm of new checkpoints (see the note on checksums above)
CHECKSUMS: dict[str, Callable[[], Any]] = {"crc32c": crc32c.CRC32CHash, "sha256": hashlib.sha256}  # the ones read
CONSOLIDATE_HINT = ("merge its rank shards into one state dict with `infinity-consolidate CKPT_DIR OUT` and "
                    "load that into the model with load_state_dict")


class OptimizerState(enum.Enum):
    """Adam's fp32 vectors per parameter part, in the order the file holds them (other optimizers hold
    master and their own states: the engine's optimizer_states)."""

    MASTER = "master"
    EXP_AVG = "exp_avg"
    EXP_AVG_SQ = "exp_avg_sq"


# torch dtype <-> safetensors dtype code, for the dtypes a checkpoint holds
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """"float32", "bfloat16", ...: how the manifest names a dtype."""
    return str(dtype).removeprefix("torch.")


def dtype_of_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(name, f"unknown dtype {name!r} in a manifest")
    return dtype


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def stored_numel(real: int, elem_size: int) -> int:
    """Elements a tensor of `real` elements stores: whole multiples of ALIGNMENT bytes."""
    return round_up(real * elem_size, ALIGNMENT) // elem_size


def optimizer_tensor(state: OptimizerState | str, name: str) -> str:
    """The name of parameter name's state in optimizer.safetensors ("exp_avg/blocks.0.qkv.weight")."""
    return f"{state.value if isinstance(state, OptimizerState) else state}/{name}"


def tag_dir(ckpt_dir: str | os.PathLike[str], tag: str) -> Path:
    return Path(ckpt_dir) / tag


def rank_dir(ckpt_dir: str | os.PathLike[str], tag: str, rank: int) -> Path:
    return tag_dir(ckpt_dir, tag) / f"rank_{rank}"


def read_latest(ckpt_dir: str | os.PathLike[str]) -> str:
    """The tag `latest` names; a CheckpointError when there is none."""
    path = Path(ckpt_dir) / LATEST
    try:
        tag = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise CheckpointError(str(path), "no `latest` file, so no tag to load",
                              "pass tag= to load_checkpoint, or check the folder") from None
    if not tag:
        raise CheckpointError(str(path), "`latest` is empty", "pass tag= explicitly")
    return tag


def resolve_tag(ckpt_dir: str | os.PathLike[str], tag: str | None) -> str:
    return read_latest(ckpt_dir) if tag is None else check_tag(tag)


def check_tag(tag: str) -> str:
    if not tag or "/" in tag or tag in (".", "..") or tag.startswith(".") or tag == LATEST:
        raise CheckpointError(tag, f"{tag!r} is not a usable tag", "use a plain folder name such as global_step10")
    return tag


@dataclass(frozen=True)
class ParamEntry:
    """One parameter's part held by this rank (the Shard's fields), its dtype in model.safetensors, and the
    elements stored per tensor (padding included); frozen: requires_grad=False, no optimizer states."""

    name: str
    shape: tuple[int, ...]
    numel: int
    world: int
    rank: int
    start: int
    length: int
    replicated: bool
    dtype: str  # the compute dtype, as model.safetensors holds it
    stored: int  # elements of its tensor in model.safetensors (optimizer.safetensors: stored_numel(real, 4))
    aliases: tuple[str, ...] = ()  # other state_dict keys of the same (tied) parameter
    frozen: bool = False  # held by the engine but not trained: no tensors in optimizer.safetensors

    @property
    def real(self) -> int:
        return self.shard().real

    def shard(self) -> Shard:
        return Shard(self.name, torch.Size(self.shape), self.numel, self.world, self.rank, self.start, self.length,
                     self.replicated)

    @classmethod
    def of(cls, shard: Shard, dtype: torch.dtype, aliases: tuple[str, ...] = (), frozen: bool = False) -> "ParamEntry":
        return cls(shard.name, tuple(shard.shape), shard.numel, shard.world, shard.rank, shard.start, shard.length,
                   shard.replicated, dtype_name(dtype), stored_numel(shard.real, element_size(dtype)), aliases,
                   frozen)


@dataclass(frozen=True)
class BufferEntry:
    """A persistent buffer or frozen parameter, whole, in model.safetensors after the parameters."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    stored: int

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass(frozen=True)
class FileEntry:
    name: str  # relative to the rank folder
    bytes: int
    checksum: str  # the manifest's checksum algorithm over the whole file, lowercase hex


@dataclass(frozen=True)
class Manifest:
    tag: str
    world: int
    rank: int
    precision: str  # the compute dtype's name
    global_steps: int
    params: tuple[ParamEntry, ...]
    buffers: tuple[BufferEntry, ...]
    files: tuple[FileEntry, ...] = ()
    config: dict[str, Any] | None = None  # the resolved DeepSpeed-style config, when initialize had one
    settings: dict[str, Any] = field(default_factory=dict)  # the engine's settings, as text values
    format: str = FORMAT
    version: int = VERSION
    checksum: str = CHECKSUM
    save_id: int = 0  # the same on every rank folder of one save (0: saved before ids existed)

    def file(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise CheckpointError(name, "is not listed in the manifest")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> "Manifest":
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise CheckpointError(where, f"not an {FORMAT} manifest (format {data.get('format')!r})")
            if data.get("version") != VERSION:
                raise CheckpointError(where, f"format version {data.get('version')} is not {VERSION}",
                                      "load it with the infinity version that wrote it")
            params = tuple(ParamEntry(**{**p, "shape": tuple(p["shape"]), "aliases": tuple(p.get("aliases", ()))})
                           for p in data.pop("params"))
            buffers = tuple(BufferEntry(**{**b, "shape": tuple(b["shape"])}) for b in data.pop("buffers"))
            files = tuple(FileEntry(**f) for f in data.pop("files"))
            if data.get("checksum", CHECKSUM) not in CHECKSUMS:
                raise CheckpointError(where, f"names checksum {data.get('checksum')!r}, not one this infinity reads "
                                      f"({', '.join(CHECKSUMS)})", "load it with the infinity version that wrote it")
            return cls(params=params, buffers=buffers, files=files, **data)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(where, f"the manifest cannot be read ({type(err).__name__}: {err})") from None


def new_checksum(algorithm: str = CHECKSUM) -> Any:
    """A hashlib-style object (update, hexdigest) of one of CHECKSUMS."""
    return CHECKSUMS[algorithm]()


def file_checksum(path: str | os.PathLike[str], algorithm: str = CHECKSUM, chunk: int = 8 << 20) -> tuple[int, str]:
    """(bytes, checksum) of a file, read in chunks."""
    digest, size = new_checksum(algorithm), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def check_file(folder: Path, entry: FileEntry, size: int, checksum: str | None, algorithm: str = CHECKSUM) -> None:
    """Raises a CheckpointError naming the file when its size or checksum (of algorithm) is not the manifest's."""
    path = folder / entry.name
    if size != entry.bytes:
        raise CheckpointError(str(path), f"is {size} bytes, the manifest says {entry.bytes} (truncated or "
                              f"overwritten)", "load another tag, or save again")
    if checksum is not None and checksum != entry.checksum:
        raise CheckpointError(str(path), f"{algorithm} is {checksum}, the manifest says {entry.checksum} (the file "
                              f"was altered)", "load another tag, or save again")


class RankFiles:
    """One rank's folder of a checkpoint, for reading (load_checkpoint, infinity-consolidate)."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CheckpointError(str(self.folder), "has no manifest.json: the save did not finish (or this is "
                                  "not a rank folder)", "load another tag (`latest` names the last complete one)") \
                from None
        self.manifest = Manifest.from_json(text, str(path))
        self._params = {p.name: p for p in self.manifest.params}
        self._buffers = {b.name: b for b in self.manifest.buffers}

    def path(self, name: str) -> Path:
        return self.folder / name

    def check_sizes(self) -> None:
        """Every listed file exists with the size the manifest gives (cheap: no reads)."""
        for entry in self.manifest.files:
            try:
                size = os.stat(self.path(entry.name)).st_size
            except FileNotFoundError:
                raise CheckpointError(str(self.path(entry.name)), "is missing", "load another tag") from None
            check_file(self.folder, entry, size, None)

    def verify(self, names: Iterable[str] | None = None) -> None:
        """Sizes and checksums of the listed files (or of names), each read whole once."""
        wanted = set(names) if names is not None else None
        self.check_sizes()
        for entry in self.manifest.files:
            if wanted is None or entry.name in wanted:
                size, checksum = file_checksum(self.path(entry.name), self.manifest.checksum)
                check_file(self.folder, entry, size, checksum, self.manifest.checksum)

    def param(self, name: str) -> ParamEntry:
        try:
            return self._params[name]
        except KeyError:
            raise CheckpointError(str(self.folder), f"holds no parameter {name!r}") from None

    def parameter_part(self, name: str, state: OptimizerState | None = None) -> torch.Tensor:
        """This rank's real elements of parameter name (1-D): its model values (state None, compute dtype)
        or one of its fp32 optimizer states."""
        from safetensors import safe_open

        entry = self.param(name)
        file, tensor = (MODEL_FILE, name) if state is None else (OPTIMIZER_FILE, optimizer_tensor(state, name))
        with safe_open(str(self.path(file)), framework="pt") as f:
            return f.get_slice(tensor)[: entry.real]

    def buffer(self, name: str) -> torch.Tensor:
        """A persistent buffer or frozen parameter, shaped."""
        from safetensors import safe_open

        try:
            entry = self._buffers[name]
        except KeyError:
            raise CheckpointError(str(self.folder), f"holds no buffer {name!r}") from None
        with safe_open(str(self.path(MODEL_FILE)), framework="pt") as f:
            return f.get_slice(name)[: entry.numel].reshape(entry.shape)

    def state(self) -> dict[str, Any]:
        return json.loads(self.path(STATE_FILE).read_text(encoding="utf-8"))

    def rng(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path(RNG_FILE)))

    def client_state(self) -> Any:
        """The client state; a CheckpointError (never torch's advice to drop weights_only) for one that
        torch.load(weights_only=True) refuses."""
        path = self.path(CLIENT_STATE_FILE)
        try:
            return torch.load(path, weights_only=True)
        except Exception as err:  # UnpicklingError for a forbidden global, RuntimeError or EOFError for others
            raise CheckpointError(str(path), f"is not a client state that torch.load(weights_only=True) takes "
                                  f"({refusal(err)}): it was altered after the save, or not written by "
                                  "save_checkpoint; infinity never unpickles other objects",
                                  "restore the file from where the checkpoint was saved, or load another tag") from None


def refusal(err: BaseException) -> str:
    """What torch.load(weights_only=True) refused, from its message, leaving out its advice to re-run with
    weights_only=False (which would run whatever the file holds)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and "weights_only" not in line]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
                lines[0] if lines else type(err).__name__)


def open_rank(ckpt_dir: str | os.PathLike[str], tag: str | None = None, rank: int = 0) -> RankFiles:
    """Rank rank's files of tag (None: the tag `latest` names)."""
    return RankFiles(rank_dir(ckpt_dir, resolve_tag(ckpt_dir, tag), rank))


def open_all(ckpt_dir: str | os.PathLike[str], tag: str | None = None) -> list[RankFiles]:
    """Every rank's files of tag, in rank order, checked to be one complete checkpoint of one world."""
    tag = resolve_tag(ckpt_dir, tag)
    first = RankFiles(rank_dir(ckpt_dir, tag, 0))
    ranks = [first] + [RankFiles(rank_dir(ckpt_dir, tag, r)) for r in range(1, first.manifest.world)]
    for r, files in enumerate(ranks):
        if files.manifest.rank != r or files.manifest.world != first.manifest.world:
            raise CheckpointError(str(files.folder), f"manifest says rank {files.manifest.rank} of world "
                                  f"{files.manifest.world}; expected rank {r} of {first.manifest.world}")
    return ranks


def full_parameter(ranks: list[RankFiles], name: str, state: OptimizerState | None = None) -> torch.Tensor:
    """Parameter name whole and shaped, from every rank's part (rank 0's alone when replicated)."""
    entry = ranks[0].param(name)
    if entry.replicated or entry.world == 1:
        flat = ranks[0].parameter_part(name, state)
    else:
        flat = torch.cat([files.parameter_part(name, state) for files in ranks])
    if flat.numel() != entry.numel:
        raise CheckpointError(str(ranks[0].folder), f"parameter {name!r}: the ranks' parts hold {flat.numel()} "
                              f"elements, the manifest says {entry.numel}")
    return flat.reshape(entry.shape)
