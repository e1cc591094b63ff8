"""engine.save_checkpoint: each rank writes its own folder, durably, manifest last; then `latest`.

[Note: the order of a save]
1. client_state is checked first (refused before anything is written); rank 0 draws the save's id and
   every rank takes it (one collective), so load can tell the rank folders of one save from a mix;
2. the files are written aside, into TAG/.rank_<r>.saving (what an interrupted save left there is
   removed first; new folder entries fsynced);
3. rng.safetensors, state.json, client_state.pt, optimizer.safetensors, model.safetensors: each to a
   temporary name, fsynced, renamed (checkpoint/files.py); the two large files stream from the swap
   files (or host tensors) through the async-IO engine in chunks;
4. manifest.json, listing every file's size and checksum, the same way; the folder is fsynced;
5. every rank waits for every other (Ranks.barrier, with several ranks); each puts its
   folder in place as TAG/rank_<r> (files.exchange_in: an earlier save of the same tag is exchanged
   atomically and removed); all wait again, rank 0 replaces `latest`, and all wait a last time so no
   rank returns before `latest` names the new tag.
So a folder named rank_<r> is always one complete save.  A process killed anywhere before 5 leaves
every rank_<r> and `latest` as they were: the previous complete checkpoint, even under the same tag.
A kill within 5, between two ranks' swaps, leaves folders of two saves under one tag, which load
refuses (their save ids differ).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from infinity.checkpoint import files, state, tensors
from infinity.checkpoint.contents import contents_of
from infinity.checkpoint.format import (CLIENT_STATE_FILE, MANIFEST, MODEL_FILE, OPTIMIZER_FILE, RNG_FILE,
                                        STATE_FILE, Manifest, check_tag, dtype_name, rank_dir)
from infinity.config.training import TagValidation
from infinity.errors import CheckpointError, InfinityError
from infinity.checkpoint.protocol import Checkpointable, RankGroup
from infinity.io import DirectPolicy, IoHandle, open_handle

log = logging.getLogger("infinity.checkpoint")


@dataclass(frozen=True)
class Streaming:
    """The staging buffers a checkpoint streams through: count x chunk_bytes of host memory at most.

    [Note: small chunks, several in flight]  Measured on this machine (1.65 GB of state, swap files on the
    virtio disk, the checkpoint on it or on a second device): 8 buffers of 2 MiB (4 reads ahead) saved at
    1.9 GB/s and loaded at 2.3 GB/s to a second device where 4 of 8 MiB (2 reads ahead) did 1.3 and 1.7,
    and 1 MiB or 4 MiB chunks, or 4 or 12 buffers of 2 MiB, were slower too; on one disk all were alike.
    Smaller chunks hand each read on to its write sooner, so reads and writes overlap more finely."""

    chunk_bytes: int = 2 << 20
    count: int = 8


def save(engine: Checkpointable, save_dir: str | Path, tag: str | None, client_state: Any,
         streaming: Streaming = Streaming()) -> Path:
    """Writes this rank's folder of the checkpoint and, once every rank has, `latest`; returns the folder."""
    tag = check_tag(tag if tag is not None else f"global_step{engine.global_steps}")
    validate_tag(tag, engine.config.checkpoint.tag_validation if engine.config is not None else TagValidation.WARN,
                 engine.ranks)
    ckpt_dir = Path(save_dir)
    final = rank_dir(ckpt_dir, tag, engine.rank)
    client = state.client_state_bytes(client_state if client_state is not None else {}, str(final))
    save_id = shared_save_id(engine.ranks)
    new_tag = not final.parent.exists()
    folder = files.saving_dir(final)
    try:
        files.make_dirs(final.parent)
        files.remove_leftovers(final)
        files.make_dirs(folder)
        write_files(engine, folder, tag, save_id, client, Path(ckpt_dir), streaming)
    except BaseException as err:
        # named first: whether the drive is full is asked before the removal below frees its space
        failure = files.write_failure(final, err) if _in_checkpoint(err, final.parent) else None
        shutil.rmtree(folder, ignore_errors=True)  # a save that failed (a full disk, say) leaves nothing behind,
        if new_tag:  # not even the tag folder it created (unless another rank's save is in it)
            with contextlib.suppress(OSError):
                final.parent.rmdir()
        if failure is not None:
            raise failure from err
        raise
    engine.ranks.barrier("checkpoint save: every rank's files written")
    files.exchange_in(folder, final)
    engine.ranks.barrier("checkpoint save: every rank's folder in place")
    if engine.rank == 0:
        files.write_latest(ckpt_dir, tag)
    engine.ranks.barrier("checkpoint save: `latest` written")
    log.info("saved checkpoint %s (rank %d of %d) in %s", tag, engine.rank, engine.world, final)
    return final


def _in_checkpoint(err: BaseException, tag_folder: Path) -> bool:
    """Whether err is a failure to write into the checkpoint (not the swap side's, which latches and names
    its own file)."""
    if not isinstance(err, OSError):
        return False
    path = os.path.abspath(str(getattr(err, "path", None) or err.filename or tag_folder))
    return not isinstance(err, InfinityError) or path.startswith(os.path.abspath(tag_folder) + os.sep)


def write_files(engine: Checkpointable, folder: Path, tag: str, save_id: int, client: bytes, ckpt_dir: Path,
                streaming: Streaming) -> None:
    """Every file of this rank's save of tag into folder, the manifest last (ckpt_dir: for the async-IO
    handle when nothing of the run is on NVMe)."""
    contents = contents_of(engine)
    written = [tensors_file(folder, RNG_FILE, state.rng_tensors()),
               files.write_bytes(folder, STATE_FILE, json_bytes(state.engine_state(engine))),
               files.write_bytes(folder, CLIENT_STATE_FILE, client)]
    with io_handle(engine, ckpt_dir) as handle:
        staging = tensors.staging_buffers(contents.largest, streaming.chunk_bytes, streaming.count)
        written.append(tensors.write(folder, OPTIMIZER_FILE, contents.optimizer, handle, staging))
        written.append(tensors.write(folder, MODEL_FILE, contents.model, handle, staging))
    manifest = Manifest(tag=tag, world=engine.world, rank=engine.rank,
                        precision=dtype_name(engine.dtype), global_steps=engine.global_steps,
                        params=contents.params, buffers=contents.buffers, files=tuple(written),
                        config=engine.config.to_dict() if engine.config is not None else None,
                        settings=state.settings_json(engine.settings), save_id=save_id)
    files.write_bytes(folder, MANIFEST, manifest.to_json().encode())
    files.fsync_dir(folder)


def tensors_file(folder: Path, name: str, values: dict[str, torch.Tensor]) -> Any:
    from safetensors.torch import save

    return files.write_bytes(folder, name, save(values))


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, indent=1).encode()


def validate_tag(tag: str, policy: TagValidation, ranks: RankGroup) -> None:
    """checkpoint.tag_validation: with several ranks, every rank must save under the same tag (compared
    by a hash of it); Warn logs a disagreement, Fail raises, Ignore does not compare."""
    if policy is TagValidation.IGNORE:
        return
    digest = int.from_bytes(hashlib.sha256(tag.encode()).digest()[:7], "little")
    low, high = ranks.low_high(digest, "the checkpoint tag")
    if low != high:
        message = f"ranks save under different checkpoint tags (this rank: {tag!r})"
        if policy is TagValidation.FAIL:
            raise CheckpointError(tag, message, "pass the same tag on every rank (checkpoint.tag_validation is Fail)")
        log.warning("%s; checkpoint.tag_validation is Warn", message)


def shared_save_id(ranks: RankGroup) -> int:
    """A random id of this save, rank 0's on every rank (the largest of it and the others' zeros)."""
    mine = secrets.randbits(62) + 1
    return ranks.low_high(mine if ranks.rank == 0 else 0, "the checkpoint's save id")[1]


@contextlib.contextmanager
def io_handle(engine: Checkpointable, folder: Path) -> Iterator[IoHandle]:
    """The run's own async-IO handle (its first memory manager's), or with nothing on NVMe, one opened
    for this checkpoint and closed after."""
    own = engine.io_handle()
    if own is not None:
        yield own
        return
    handle = open_handle(engine.settings.aio, nvme_path=folder, direct=DirectPolicy.AUTO)
    try:
        yield handle
    finally:
        handle.close()

