"""engine.load_checkpoint: checks a rank folder against this engine, then streams it back in.

[Note: what is checked, and when]  Before anything changes: the manifest is there (a folder without
one is an unfinished save), it was written by a world of this size for this rank, and it holds this
model (the same parameter names, shapes, parts and dtypes, and the same buffers); every file has the
size the manifest gives, and the small files (state, random generators, client state) their
checksums.  The two large files are checked as they stream into the swap files and host tensors, so
they are read once; a checksum that differs there is found only after the engine's state was
overwritten, so the engine is latched failed (EngineFailed from then on) and the error names the file.

[Note: a partial load reads everything]  load_optimizer_states=False and load_module_only=True
(checkpoint/restored.py) take the same path: both files stream in whole and are checked; the optimizer
states left out stream into a part that keeps nothing (`discarded`), and the optimizer is then made fresh
(engine.fresh_optimizer: moments zero, step counts 0) through the engine, whose memory manager moves those
bytes.  The fp32 masters are always loaded: the parameters and their masters come from one save.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from infinity.checkpoint import state, tensors
from infinity.checkpoint.contents import Contents, contents_of
from infinity.checkpoint.deepspeed import import_deepspeed, is_deepspeed
from infinity.checkpoint.format import (CLIENT_STATE_FILE, CONSOLIDATE_HINT, MODEL_FILE, OPTIMIZER_FILE, RNG_FILE,
                                        STATE_FILE, Manifest, RankFiles, optimizer_tensor, rank_dir, resolve_tag,
                                        tag_dir)
from infinity.checkpoint.files import saving_dir
from infinity.checkpoint.save import Streaming, io_handle
from infinity.checkpoint.protocol import Checkpointable, RankGroup
from infinity.checkpoint.restored import WHOLE, Restored
from infinity.checkpoint.tensors import StoredTensor
from infinity.errors import CheckpointError
from infinity.memory.stream import HostPart

log = logging.getLogger("infinity.checkpoint")

SHOWN = 8  # differences listed in a model mismatch


def load(engine: Checkpointable, load_dir: str | Path, tag: str | None,
         streaming: Streaming = Streaming(), restored: Restored = WHOLE) -> tuple[str, Any]:
    """(the checkpoint's tag folder, its client_state) after restoring the parts of what this rank saved that
    restored names (checkpoint/restored.py).  A DeepSpeed ZeRO-3 save is imported (checkpoint/deepspeed.py)."""
    ckpt_dir = Path(load_dir)
    tag = resolve_tag(ckpt_dir, tag)
    if is_deepspeed(tag_dir(ckpt_dir, tag)):
        return import_deepspeed(engine, ckpt_dir, tag, lambda e, d, t: load(e, d, t, streaming, restored))
    folder = rank_dir(ckpt_dir, tag, engine.rank)
    try:
        files = open_folder(ckpt_dir, tag, folder, engine.world, engine.rank)
    except CheckpointError as err:
        agree_on_save(engine.ranks, -1, folder)  # the other ranks learn that this one cannot load, and stop too
        raise err
    manifest = files.manifest
    agree_on_save(engine.ranks, manifest.save_id, folder)
    contents = contents_of(engine)
    check_model(manifest, contents, folder)
    files.verify([STATE_FILE, RNG_FILE, CLIENT_STATE_FILE])  # sizes of all, checksums of the small ones
    client, saved, rng = files.client_state(), files.state(), files.rng()
    if Restored.OPTIMIZER in restored:
        state.check_groups(engine, saved, str(folder))
    optimizer = {s.name: s if Restored.OPTIMIZER in restored or s.name.startswith(MASTER_PREFIX) else discarded(s)
                 for s in contents.optimizer}
    with engine.latching_failure(), io_handle(engine, ckpt_dir) as handle:
        staging = tensors.staging_buffers(contents.largest, streaming.chunk_bytes, streaming.count)
        tensors.read(folder / OPTIMIZER_FILE, manifest.file(OPTIMIZER_FILE), optimizer, handle, staging,
                     manifest.checksum)
        tensors.read(folder / MODEL_FILE, manifest.file(MODEL_FILE), {s.name: s for s in contents.model}, handle,
                     staging, manifest.checksum)
        if Restored.OPTIMIZER not in restored:
            engine.fresh_optimizer()
        state.restore(engine, saved, rng, str(folder), restored)
    log.info("loaded checkpoint %s (rank %d of %d) from %s (%s)", tag, engine.rank, engine.world, folder, restored)
    return str(tag_dir(ckpt_dir, tag)), client


MASTER_PREFIX = optimizer_tensor("master", "")


def discarded(spec: StoredTensor) -> StoredTensor:
    """spec streaming into a part that keeps nothing (its bytes are read and checked, then dropped)."""
    return StoredTensor(spec.name, spec.dtype, spec.numel, HostPart(torch.empty(0, dtype=spec.dtype)))


def open_folder(ckpt_dir: Path, tag: str, folder: Path, world: int, rank: int) -> RankFiles:
    """This rank's folder of tag, with its manifest read and its world and rank checked."""
    if not tag_dir(ckpt_dir, tag).is_dir():
        raise CheckpointError(str(tag_dir(ckpt_dir, tag)), "does not exist", "check the folder and the tag")
    if not folder.is_dir():
        if saving_dir(folder).is_dir():
            raise CheckpointError(str(folder), f"does not exist: the save of tag {tag!r} did not finish (its files "
                                  f"are still in {saving_dir(folder).name})", "load another tag (`latest` names "
                                  "the last complete one)")
        raise missing_rank(ckpt_dir, tag, folder, rank, world)
    files = RankFiles(folder)
    check_world(files.manifest, world, rank, folder)
    return files


def missing_rank(ckpt_dir: Path, tag: str, folder: Path, rank: int, world: int) -> CheckpointError:
    """Why this rank's folder is not there, from what the other rank folders' manifests say: it was
    deleted (or never copied) from a save that had it, or the save had fewer ranks."""
    saved = sorted(p for p in tag_dir(ckpt_dir, tag).glob("rank_*") if p.is_dir())
    worlds = set()
    for other in saved:
        try:
            worlds.add(RankFiles(other).manifest.world)
        except CheckpointError:
            continue
    if not saved:
        return CheckpointError(str(folder), f"does not exist, and tag folder {tag!r} holds no rank folder at all: "
                               "they were deleted, or not copied with the checkpoint", "restore the rank folders "
                               "(each rank writes its own rank_<r>) or load another tag")
    if worlds and max(worlds) > rank:
        return CheckpointError(str(folder), f"does not exist, but the save of tag {tag!r} had {max(worlds)} ranks "
                               f"(the manifests of {', '.join(p.name for p in saved)} say so): it was deleted, or "
                               "not copied with the others", "restore it (each rank writes its own rank_<r>) or "
                               "load another tag")
    return CheckpointError(str(folder), f"does not exist: tag {tag!r} was saved by {max(worlds) if worlds else '?'} "
                           f"rank(s), fewer than this run's {world}", CONSOLIDATE_HINT)


def agree_on_save(ranks: RankGroup, save_id: int, folder: Path) -> None:
    """With several ranks: every rank's folder must come from one save (the same save_id); -1 says this
    rank cannot load.  One collective that every rank enters, so no rank is left waiting in a later one."""
    low, high = ranks.low_high(save_id, "the checkpoint's save id")
    if save_id == -1:
        return  # this rank raises its own error
    if low == -1:
        raise CheckpointError(str(folder.parent), "cannot be loaded by another rank (its own error says why); "
                              "this rank loads nothing either", "fix what that rank reports, or load another tag")
    if low != high:
        raise CheckpointError(str(folder.parent), "holds rank folders of different saves: a save under this tag was "
                              "interrupted while the ranks put their folders in place",
                              "load another tag, or save this one again")


def check_world(manifest: Manifest, world: int, rank: int, folder: Path) -> None:
    if manifest.world != world or manifest.rank != rank:
        raise CheckpointError(str(folder), f"was saved by rank {manifest.rank} of a world of {manifest.world} "
                              f"ranks; this is rank {rank} of {world}", CONSOLIDATE_HINT)


def check_model(manifest: Manifest, contents: Contents, folder: Path) -> None:
    """Raises a CheckpointError saying how the checkpoint's model differs from this engine's."""
    saved_params = {p.name for p in manifest.params}
    legacy = [p.name for p in contents.params if p.frozen and p.name not in saved_params
              and any(b.name == p.name for b in manifest.buffers)]
    if legacy:
        raise CheckpointError(str(folder), f"holds frozen parameter(s) {', '.join(legacy[:SHOWN])} as buffers: it was "
                              "saved by an infinity that kept frozen parameters in the module, and this engine "
                              "holds them on the param tier", "merge it with `infinity-consolidate CKPT_DIR OUT`, load "
                              "that into the model with load_state_dict before initialize, and train on from there")
    diffs = differences({p.name: p for p in manifest.params}, {p.name: p for p in contents.params},
                        ("shape", "start", "length", "replicated", "dtype", "frozen"), "parameters")
    diffs += differences({b.name: b for b in manifest.buffers}, {b.name: b for b in contents.buffers},
                         ("shape", "dtype"), "buffers")
    if diffs:
        raise CheckpointError(str(folder), f"holds another model than this engine's ({'; '.join(diffs)})",
                              "load it into the model it was saved from (and the same precision), or "
                              + CONSOLIDATE_HINT + " (strict=False takes the parameters that match)")


def differences(saved: dict[str, Any], here: dict[str, Any], fields: tuple[str, ...], what: str) -> list[str]:
    """What differs, in at most four lines, each naming up to SHOWN entries."""
    found = [(f"{what} only in the checkpoint", [n for n in saved if n not in here]),
             (f"{what} only in this model", [n for n in here if n not in saved])]
    changed = [f"{name} {f} {_text(getattr(saved[name], f))} in the checkpoint, {_text(getattr(here[name], f))} here"
               for name in saved if name in here for f in fields if getattr(saved[name], f) != getattr(here[name], f)]
    found.append((f"{what} that differ", changed))
    return [f"{title}: {', '.join(items[:SHOWN])}" + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")
            for title, items in found if items]


def _text(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)
