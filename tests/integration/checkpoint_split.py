"""A checkpoint of `world` ranks made from a world-1 one, per the shard layout (infinity/shard.py),
with the checkpoint's own writer (infinity/checkpoint/tensors.py, files.py): what a run of `world`
processes would have saved, for consolidation tests that need no torch.distributed."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from infinity.checkpoint import files, tensors
from infinity.checkpoint.format import (CLIENT_STATE_FILE, MANIFEST, MODEL_FILE, OPTIMIZER_FILE, RNG_FILE,
                                        STATE_FILE, FileEntry, Manifest, OptimizerState, ParamEntry, RankFiles,
                                        dtype_of_name, file_checksum, optimizer_tensor, rank_dir, stored_numel)
from infinity.io import DirectPolicy, open_handle
from infinity.memory.stream import HostPart
from infinity.shard import shard_of

COPIED = (RNG_FILE, STATE_FILE, CLIENT_STATE_FILE)


def split(source_dir: Path, tag: str, target_dir: Path, world: int, replicated: frozenset[str] = frozenset()) -> None:
    """Writes target_dir/tag/rank_<r> for r < world, and target_dir/latest naming tag; parameters named in
    replicated are held whole by every rank."""
    whole = RankFiles(rank_dir(source_dir, tag, 0))
    for rank in range(world):
        folder = rank_dir(target_dir, tag, rank)
        folder.mkdir(parents=True)
        for name in COPIED:
            shutil.copyfile(whole.path(name), folder / name)
        _write_rank(whole, folder, world, rank, replicated)
    files.write_latest(target_dir, tag)


def _write_rank(whole: RankFiles, folder: Path, world: int, rank: int, replicated: frozenset[str]) -> None:
    m = whole.manifest
    entries, model, optimizer = [], [], {state: [] for state in OptimizerState}
    for p in m.params:
        shard = shard_of(p.name, torch.Size(p.shape), world, rank, p.name in replicated)
        entry = ParamEntry.of(shard, dtype_of_name(p.dtype), p.aliases, frozen=p.frozen)
        entries.append(entry)
        cut = slice(shard.start, shard.start + shard.real)
        model.append(tensors.StoredTensor(p.name, dtype_of_name(p.dtype), entry.stored,
                                        HostPart(whole.parameter_part(p.name)[cut].contiguous())))
        for state in OptimizerState if not p.frozen else ():  # a frozen parameter has no optimizer states
            optimizer[state].append(tensors.StoredTensor(optimizer_tensor(state, p.name), torch.float32,
                                                       stored_numel(shard.real, 4),
                                                       HostPart(whole.parameter_part(p.name, state)[cut].contiguous())))
    for b in m.buffers:
        model.append(tensors.StoredTensor(b.name, dtype_of_name(b.dtype), b.stored,
                                        HostPart(whole.buffer(b.name).reshape(-1).contiguous())))
    opt = [spec for state in OptimizerState for spec in optimizer[state]]
    handle = open_handle(nvme_path=folder, direct=DirectPolicy.AUTO)
    try:
        staging = tensors.staging_buffers(max(s.nbytes for s in model + opt), 1 << 20, 4)
        written = [tensors.write(folder, OPTIMIZER_FILE, opt, handle, staging),
                   tensors.write(folder, MODEL_FILE, model, handle, staging)]
    finally:
        handle.close()
    written += [FileEntry(name, *file_checksum(folder / name)) for name in COPIED]
    manifest = Manifest(tag=m.tag, world=world, rank=rank, precision=m.precision, global_steps=m.global_steps,
                        params=tuple(entries), buffers=m.buffers, files=tuple(written), config=m.config,
                        settings=m.settings)
    files.write_bytes(folder, MANIFEST, manifest.to_json().encode())
