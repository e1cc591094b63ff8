"""infinity-consolidate's logic: one full state dict from the per-rank folders of one checkpoint tag.

Each trained parameter is the ranks' fp32 master pieces put end to end in rank order (Shard start and
length), cut to the parameter's elements and reshaped (format.full_parameter), converted to the asked
dtype and written at once; a frozen one (no master) the same from the ranks' model.safetensors parts, in
the compute dtype the run held it in, converted; then the persistent buffers (and the parameters the
engine did not hold), whole, from rank 0.  The
output is streamed tensor by tensor (safetensors), so memory holds about one parameter: its pieces,
the joined copy and its converted copy.  Every file read is checked against its manifest's size and
checksum first.  The result loads into the plain torch model with load_state_dict(strict=True).
"""
from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from infinity.checkpoint.files import write_failure
from infinity.checkpoint.format import (LATEST, MANIFEST, MODEL_FILE, OPTIMIZER_FILE, OptimizerState, RankFiles,
                                        dtype_of_name, full_parameter, open_all, rank_dir, tag_dir)
from infinity.checkpoint.state_dict_file import StateDictFormat, write_state_dict
from infinity.checkpoint.tensor_file import TensorSpec
from infinity.errors import CheckpointError
from infinity.shard import shard_of

log = logging.getLogger("infinity.checkpoint")
RANK_PREFIX = "rank_"


class OutputDtype(enum.Enum):
    """The dtype parameters are written in (buffers keep their own)."""

    FP32 = "fp32"  # the master weights as they are
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def torch(self) -> torch.dtype:
        return {OutputDtype.FP32: torch.float32, OutputDtype.BF16: torch.bfloat16,
                OutputDtype.FP16: torch.float16}[self]


@dataclass(frozen=True)
class Consolidated:
    """What was written: the file, the tag and world it came from, and its tensor and byte counts."""

    path: Path
    tag: str
    world: int
    params: int
    buffers: int
    nbytes: int


def consolidate(ckpt_dir: str | os.PathLike[str], out: str | os.PathLike[str], tag: str | None = None,
                dtype: OutputDtype = OutputDtype.FP32,
                how: StateDictFormat = StateDictFormat.SAFETENSORS) -> Consolidated:
    """Writes the full state dict of ckpt_dir's tag (None: the one `latest` names) to out; a
    CheckpointError naming the path and the fix for anything that is not one complete checkpoint, or
    for an out that exists already (it is never overwritten)."""
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    if out.exists():
        raise CheckpointError(str(out), "exists already; it is left as it is", "remove it or give another OUT")
    tag = _tag(ckpt_dir, tag)
    ranks = _ranks(ckpt_dir, tag)
    for files in ranks:
        files.verify([MODEL_FILE, OPTIMIZER_FILE])
    first = ranks[0].manifest
    specs = [TensorSpec(key, dtype.torch, tuple(p.shape)) for p in first.params for key in (p.name, *p.aliases)]
    specs += [TensorSpec(b.name, dtype_of_name(b.dtype), tuple(b.shape)) for b in first.buffers]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_state_dict(out, specs, _tensors(ranks, dtype.torch), how)
    except (OSError, RuntimeError) as err:  # a full drive, a read-only folder; torch.save's RuntimeError
        raise write_failure(out, err, "OUT") from err  # the temporary file is gone: no output at all
    done = Consolidated(out, tag, first.world, len(first.params), len(first.buffers), sum(s.nbytes for s in specs))
    log.info("consolidated %s (tag %s, %d ranks): %d parameters, %d buffers, %d bytes", ckpt_dir, tag, done.world,
             done.params, done.buffers, done.nbytes)
    return done


def _tensors(ranks: list[RankFiles], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for p in ranks[0].manifest.params:
        values = full_parameter(ranks, p.name, None if p.frozen else OptimizerState.MASTER).to(dtype)
        for key in (p.name, *p.aliases):  # a tied parameter under each of its state_dict keys
            yield key, values
    for b in ranks[0].manifest.buffers:
        yield b.name, ranks[0].buffer(b.name)


def _tag(ckpt_dir: Path, tag: str | None) -> str:
    """The tag asked for, or the one `latest` names, checked to be a folder of ckpt_dir."""
    if not ckpt_dir.is_dir():
        raise CheckpointError(str(ckpt_dir), "is not a folder", "give the folder engine.save_checkpoint wrote into")
    if tag is None:
        latest = ckpt_dir / LATEST
        if not latest.is_file():
            raise CheckpointError(str(ckpt_dir), f"has no `{LATEST}` file, so it is not a checkpoint folder or no "
                                  f"save finished in it{_tags_hint(ckpt_dir)}", "pass --tag TAG to pick a tag")
        tag = latest.read_text(encoding="utf-8").strip()
    if not tag or "/" in tag or tag.startswith(".") or not tag_dir(ckpt_dir, tag).is_dir():
        raise CheckpointError(str(tag_dir(ckpt_dir, tag)), f"no tag {tag!r} in this checkpoint folder"
                              f"{_tags_hint(ckpt_dir)}", "pass --tag with one of the tags found")
    return tag


def _tags_hint(ckpt_dir: Path) -> str:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if (p / f"{RANK_PREFIX}0").is_dir()) if ckpt_dir.is_dir() else []
    return f" (tags found: {', '.join(tags)})" if tags else " (no tag folders with rank_0 found)"


def _ranks(ckpt_dir: Path, tag: str) -> list[RankFiles]:
    """Every rank's files, checked to be one complete save of one world and one model."""
    folder = tag_dir(ckpt_dir, tag)
    found = sorted(p.name for p in folder.iterdir() if p.name.startswith(RANK_PREFIX))
    if not (rank_dir(ckpt_dir, tag, 0) / MANIFEST).is_file():
        raise CheckpointError(str(rank_dir(ckpt_dir, tag, 0)), "has no manifest.json: not a checkpoint rank folder, "
                              f"or its save did not finish (rank folders here: {found or 'none'})",
                              "consolidate another tag")
    world = RankFiles(rank_dir(ckpt_dir, tag, 0)).manifest.world
    expected = {f"{RANK_PREFIX}{r}" for r in range(world)}
    missing = sorted(expected - set(found), key=lambda n: int(n.removeprefix(RANK_PREFIX)))
    if missing:
        raise CheckpointError(str(folder / missing[0]), f"is missing: rank 0's manifest says {world} ranks saved "
                              f"this tag, and {', '.join(missing)} are not here",
                              "copy every rank's folder (each node writes its own) into this tag folder")
    extra = sorted(set(found) - expected)
    if extra:
        raise CheckpointError(str(folder / extra[0]), f"does not belong: rank 0's manifest says {world} ranks "
                              "saved this tag (a folder of another save with a larger world?)",
                              "remove the extra rank folders, or consolidate the save they belong to")
    ranks = open_all(ckpt_dir, tag)
    for files in ranks:
        _check_same_model(ranks[0], files)
        _check_shards(files)
    return ranks


def _check_same_model(first: RankFiles, other: RankFiles) -> None:
    mine = [(p.name, p.shape, p.numel, p.replicated, p.frozen) for p in first.manifest.params]
    theirs = [(p.name, p.shape, p.numel, p.replicated, p.frozen) for p in other.manifest.params]
    if mine != theirs:
        differ = next((a[0] for a, b in zip(mine, theirs) if a != b), f"{len(mine)} against {len(theirs)} parameters")
        raise CheckpointError(str(other.folder), f"lists other parameters than rank 0 (first difference: {differ})",
                              "every rank folder of a tag must come from the same save")


def _check_shards(files: RankFiles) -> None:
    for p in files.manifest.params:
        want = shard_of(p.name, torch.Size(p.shape), p.world, p.rank, p.replicated)
        if (p.start, p.length) != (want.start, want.length):
            raise CheckpointError(str(files.folder), f"parameter {p.name!r} holds elements [{p.start}, "
                                  f"{p.start + p.length}), not the shard [{want.start}, {want.start + want.length}) "
                                  f"of rank {p.rank} of {p.world}", "consolidate a checkpoint of this format version")
