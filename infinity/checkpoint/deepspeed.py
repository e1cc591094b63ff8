"""DeepSpeed ZeRO-3 checkpoints into an engine: load_checkpoint's import path.

[Note: DeepSpeed's layout, as its zero_to_fp32.py reads it]  A DeepSpeed ZeRO-3 save of a world of W ranks
under tag T is::

    CKPT_DIR/latest                                       the tag (text)
    CKPT_DIR/T/zero_pp_rank_<r>_mp_rank_00_model_states.pt  per rank r: "param_shapes" (a list, one ordered
        dict per parameter group, of trained parameter name -> torch.Size), "module" (the state dict: buffers
        whole, parameters as placeholders), "global_steps", "global_samples", "skipped_steps", "ds_config",
        "ds_version", and the client_state's keys
    CKPT_DIR/T/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt  per rank r: {"optimizer_state_dict":
        {"fp32_flat_groups": [flat fp32 per sub-group], "optimizer_state_dict": {"state": {k: {"step", "exp_avg",
        "exp_avg_sq", ...} for sub-group k}, "param_groups": [...]}, "loss_scaler", "partition_count", ...}}

Rank r's sub-groups laid end to end are one flat vector in which every trained parameter, in param_shapes
order, takes ceil(numel / W) elements: its flattened elements [r * ceil(numel / W), ...), zero-padded at the
end.  A sub-group k's optimizer states have the same layout as fp32_flat_groups[k].

The import builds, from those files, the checkpoint this engine would have saved at DeepSpeed's step
(infinity's own format, in a hidden folder beside the DeepSpeed one), and loads it through the ordinary load
path, which checks it as any other (and restores the parts load_checkpoint's keywords name:
checkpoint/restored.py); then removes it.  Parameters take DeepSpeed's fp32 master weights (cast
to the compute dtype), the optimizer its fp32 states and per-sub-group step counts, the engine DeepSpeed's
global_steps, skipped_steps and global_samples (micro_steps: global_steps x gradient_accumulation_steps), the buffers the module state's, each parameter group the lr
DeepSpeed's optimizer had (when the two have as many groups), and a client LR scheduler (initialize's
lr_scheduler=) the state_dict DeepSpeed saved of its scheduler, and an fp16 engine DeepSpeed's dynamic loss
scale (its scale, hysteresis and good steps since the last overflow).
[Note: frozen parameters]  Frozen parameters (requires_grad=False) are not in DeepSpeed's param_shapes nor
its optimizer: its model states list them in frozen_param_shapes, and each rank's file holds its fragment of
each (frozen_param_fragments: ceil(numel / W) elements, zero-padded, as zero_to_fp32.py merges them).  They
take those values; one the save does not list keeps the value the engine holds.
DeepSpeed's files are read with torch.load's mmap, one rank's file at a time per state, never unpickling
anything outside torch, the standard containers and DeepSpeed's own classes (which become inert stand-ins).
"""
from __future__ import annotations

import logging
import pickle
import re
import shutil
import types
from pathlib import Path
from typing import Any

import torch

from infinity.checkpoint import state
from infinity.checkpoint.protocol import Checkpointable
from infinity.checkpoint.save import Streaming, write_files
from infinity.errors import CheckpointError
from infinity.memory.stream import HostPart, Part

log = logging.getLogger("infinity.checkpoint")

MODEL_STATES = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
OPTIM_STATES = "{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
DS_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
           "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
           "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
           "ds_version"}
STATE_ALIASES = {"sum": "exp_avg_sq"}  # torch's Adagrad state is DeepSpeed's CPU Adagrad's exp_avg_sq
IMPORT_DIR = ".infinity-import"


def is_deepspeed(tag_folder: Path) -> bool:
    """True when tag_folder holds DeepSpeed ZeRO model-state files (and no infinity rank folders)."""
    return tag_folder.is_dir() and any(MODEL_STATES.match(p.name) for p in tag_folder.iterdir())


def import_deepspeed(engine: Checkpointable, ckpt_dir: Path, tag: str, load: Any) -> tuple[str, Any]:
    """Loads DeepSpeed's save of tag into engine (load: checkpoint/load.py's load); (the tag folder, the
    client_state DeepSpeed saved)."""
    folder = ckpt_dir / tag
    ds = DeepSpeedSave.read(folder)
    imported = Imported(engine, ds)
    root = ckpt_dir / IMPORT_DIR
    target = root / tag / f"rank_{engine.rank}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, mode=0o700)
    try:
        client = state.client_state_bytes(ds.client_state, str(folder))
        write_files(imported, target, tag, 0, client, ckpt_dir, Streaming())
        _, client_state = load(engine, root, tag)
    finally:
        shutil.rmtree(target, ignore_errors=True)
        engine.ranks.barrier("DeepSpeed import: every rank loaded")
        if engine.rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    log.info("imported DeepSpeed checkpoint %s (%d ranks, step %d) from %s", tag, ds.world, ds.global_steps, folder)
    return str(folder), client_state


class DeepSpeedSave:
    """The parts of a DeepSpeed ZeRO-3 save the import needs, each parameter's values whole (fp32)."""

    def __init__(self, folder: Path, world: int, model_states: dict[str, Any], optim_prefix: str):
        self.folder, self.world, self.prefix = folder, world, optim_prefix
        self.shapes: dict[str, torch.Size] = {}
        for group in model_states["param_shapes"]:
            self.shapes.update({name: torch.Size(shape) for name, shape in group.items()})
        self.global_steps = int(model_states.get("global_steps", 0))
        self.skipped_steps = int(model_states.get("skipped_steps", 0))
        self.global_samples = int(model_states.get("global_samples", 0))
        self.lr_scheduler = model_states.get("lr_scheduler")  # the client scheduler's state_dict, or None
        self.module = model_states.get("module") or {}
        self.client_state = {k: v for k, v in model_states.items() if k not in DS_KEYS}
        self.offsets, offset = {}, 0
        for name, shape in self.shapes.items():
            self.offsets[name] = offset
            offset += _partitioned(shape.numel(), world)
        self._flat: dict[str, list[torch.Tensor]] = {}
        self.steps: list[list[float]] = []  # per rank, per sub-group
        self.group_lrs: list[float] = []  # each of DeepSpeed's optimizer parameter groups' lr (rank 0's)
        self.bounds: list[list[int]] = []  # per rank, each sub-group's first flat element, then the end
        self.loss_scale: dict[str, float | int] = {}  # DeepSpeed's dynamic fp16 loss scaler, as LossScaler's state
        self.frozen_shapes = {name: torch.Size(shape) for name, shape in
                              (model_states.get("frozen_param_shapes") or {}).items()}
        self._frozen: dict[str, list[torch.Tensor]] = {}  # each frozen parameter's fragment on every rank

    @classmethod
    def read(cls, folder: Path) -> "DeepSpeedSave":
        ranks = sorted(int(m.group(1)) for p in folder.iterdir() if (m := MODEL_STATES.match(p.name)))
        if ranks != list(range(len(ranks))):
            raise CheckpointError(str(folder), f"holds DeepSpeed model states of ranks {ranks}, not 0..{len(ranks) - 1}",
                                  "copy every rank's zero_pp_rank_* files into the folder")
        model_states = _load(folder / f"zero_pp_rank_0_mp_rank_00_model_states.pt")
        if "param_shapes" not in model_states:
            raise CheckpointError(str(folder), "is a DeepSpeed checkpoint without param_shapes (not ZeRO stage 3?)",
                                  "only ZeRO stage 3 saves can be imported")
        prefix = "bf16_" if (folder / OPTIM_STATES.format(prefix="bf16_", rank=0)).exists() else ""
        save = cls(folder, len(ranks), model_states, prefix)
        for r in range(save.world):
            save._read_rank(r)
            if save.frozen_shapes:
                save._read_frozen(r, model_states if r == 0 else
                                  _load(folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
        return save

    def _read_frozen(self, rank: int, model_states: dict[str, Any]) -> None:
        """Rank's fragments of the frozen parameters: ceil(numel / W) elements each, as its trained pieces."""
        fragments = model_states.get("frozen_param_fragments") or {}
        for name in self.frozen_shapes:
            if name not in fragments:
                raise CheckpointError(str(self.folder), f"lists the frozen parameter {name!r} but rank {rank}'s "
                                      "model states hold no fragment of it", "copy every rank's files of the save")
            self._frozen.setdefault(name, []).append(fragments[name].reshape(-1))

    def frozen_whole(self, name: str) -> torch.Tensor | None:
        """A frozen parameter's saved values, whole and flat (in the dtype DeepSpeed kept it), or None when the
        save holds none of it."""
        if name not in self._frozen:
            return None
        return torch.cat(self._frozen[name])[:self.frozen_shapes[name].numel()]

    def _read_rank(self, rank: int) -> None:
        path = self.folder / OPTIM_STATES.format(prefix=self.prefix, rank=rank)
        if not path.exists():
            raise CheckpointError(str(path), "is missing", "copy every rank's *_optim_states.pt into the folder")
        zero = _load(path).get("optimizer_state_dict", {})
        flat, inner = zero.get("fp32_flat_groups"), zero.get("optimizer_state_dict", {})
        if flat is None or "state" not in inner:
            raise CheckpointError(str(path), "holds no fp32_flat_groups and optimizer state (not ZeRO stage 3?)",
                                  "only ZeRO stage 3 saves can be imported")
        groups = [inner["state"][k] for k in sorted(inner["state"])]
        if rank == 0:
            self.group_lrs = [float(g["lr"]) for g in inner.get("param_groups", []) if "lr" in g]
            self.loss_scale = _scaler_state(zero.get("loss_scaler"))
        self._flat.setdefault("master", []).append(torch.cat([t.reshape(-1).float() for t in flat]))
        for name in groups[0] if groups else {}:
            if isinstance(groups[0][name], torch.Tensor) and groups[0][name].dim() > 0:
                self._flat.setdefault(name, []).append(torch.cat([g[name].reshape(-1).float() for g in groups]))
        self.steps.append([float(g.get("step", 0)) for g in groups])
        sizes = [t.numel() for t in flat]
        self.bounds.append([sum(sizes[:i]) for i in range(len(sizes) + 1)])

    def whole(self, name: str, state_name: str) -> torch.Tensor:
        """Parameter name's state (master, or an optimizer state) whole and flat, from every rank's piece."""
        source = STATE_ALIASES.get(state_name, state_name) if state_name not in self._flat else state_name
        if source not in self._flat:
            raise CheckpointError(str(self.folder), f"holds no optimizer state {state_name!r} (it has "
                                  f"{sorted(self._flat)})", "import into an engine with the optimizer the run "
                                  "was saved with")
        numel = self.shapes[name].numel()
        piece, offset = _partitioned(numel, self.world), self.offsets[name]
        return torch.cat([flat[offset:offset + piece] for flat in self._flat[source]])[:numel]

    def step_of(self, name: str) -> float:
        """The optimizer step count of the sub-group holding parameter name (rank 0's piece)."""
        offset, bounds = self.offsets[name], self.bounds[0]
        k = max(i for i in range(len(bounds) - 1) if bounds[i] <= offset) if len(bounds) > 1 else 0
        return self.steps[0][k] if self.steps[0] else 0.0


class Imported:
    """The engine as it would have been at DeepSpeed's save: its own parts, with the parameters' and optimizer
    states' values, the counters and step counts taken from the DeepSpeed save (the checkpoint protocol, for
    save.write_files)."""

    def __init__(self, engine: Checkpointable, ds: DeepSpeedSave):
        self._engine, self._ds = engine, ds
        for attr in ("module", "names", "params", "shapes", "shards", "frozen", "ranks", "rank", "world", "config",
                     "settings", "dtype", "loss_scaler", "optimizer_states"):
            setattr(self, attr, getattr(engine, attr))
        self.param_groups = [dict(g) for g in engine.param_groups]
        if len(ds.group_lrs) == len(self.param_groups):  # the lr DeepSpeed's optimizer had (its scheduler's)
            for group, lr in zip(self.param_groups, ds.group_lrs):
                group["lr"] = lr
        saved = ds.lr_scheduler if engine.client_scheduler is not None else None
        self.client_scheduler = _Saved(saved) if isinstance(saved, dict) else None
        self._check_names()
        gas = int(getattr(engine.settings, "gradient_accumulation_steps", 1))
        self.counters = _Counters({"global_steps": ds.global_steps, "micro_steps": ds.global_steps * gas,
                                   "skipped_steps": ds.skipped_steps, "global_samples": ds.global_samples})
        self.global_steps = ds.global_steps
        self.lr = engine.lr
        scaler = engine.loss_scaler
        if scaler is not None and ds.loss_scale:  # an fp16 run resumed from DeepSpeed's dynamic scaler
            self.loss_scaler = _Saved({**scaler.state_dict(), **ds.loss_scale, "skipped_steps": ds.skipped_steps})
        self._copy_buffers()

    @property
    def _trained(self) -> list[str]:
        """The trained parameters' names (DeepSpeed's param_shapes list only those)."""
        return [n for i, n in enumerate(self.names) if i not in self.frozen]

    def _check_names(self) -> None:
        mine, theirs = set(self._trained), set(self._ds.shapes)
        if mine != theirs:
            raise CheckpointError(str(self._ds.folder), f"holds other trained parameters than this model: only in the "
                                  f"checkpoint {sorted(theirs - mine)[:5]}, only in the model {sorted(mine - theirs)[:5]}",
                                  "build the model the DeepSpeed run trained")
        saved_shapes = {**self._ds.frozen_shapes, **self._ds.shapes}
        for name, shape in zip(self.names, self.shapes):
            if name in saved_shapes and saved_shapes[name] != shape:
                raise CheckpointError(str(self._ds.folder), f"holds {name!r} of shape {tuple(saved_shapes[name])}; "
                                      f"the model's is {tuple(shape)}", "build the model the DeepSpeed run trained")

    def _copy_buffers(self) -> None:
        trained = {id(p) for p in self.params}
        with torch.no_grad():
            for key, t in self.module.state_dict(keep_vars=True).items():
                saved = self._ds.module.get(key)
                if id(t) not in trained and isinstance(saved, torch.Tensor) and saved.shape == t.shape:
                    t.copy_(saved)

    def _piece(self, i: int, values: torch.Tensor) -> torch.Tensor:
        shard = self.shards[i]
        return values[shard.start:shard.start + shard.real].contiguous()

    def param_part(self, i: int) -> Part:
        if i in self.frozen:  # [Note: frozen parameters]
            saved = self._ds.frozen_whole(self.names[i])
            if saved is None:
                return self._engine.param_part(i)
            return HostPart(self._piece(i, saved).to(self.dtype))
        return HostPart(self._piece(i, self._ds.whole(self.names[i], "master")).to(self.dtype))

    def optimizer_part(self, i: int, state_name: str) -> Part:
        return HostPart(self._piece(i, self._ds.whole(self.names[i], state_name)))

    def optimizer_steps(self) -> dict[str, float]:
        return {name: self._ds.step_of(name) for name in self._trained}

    def io_handle(self) -> Any:
        return self._engine.io_handle()

    def fresh_optimizer(self) -> None:
        self._engine.fresh_optimizer()


class _Saved:
    """A state_dict saved by DeepSpeed, as the Stateful the checkpoint writes (a client scheduler's)."""

    def __init__(self, values: dict[str, Any]):
        self.values = values

    def state_dict(self) -> dict[str, Any]:
        return self.values

    def load_state_dict(self, values: dict[str, Any]) -> None:
        self.values = values


class _Counters:
    def __init__(self, values: dict[str, int]):
        self.values = values

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, values: dict[str, Any]) -> None:
        self.values = dict(values)


def _scaler_state(saved: Any) -> dict[str, float | int]:
    """DeepSpeed's DynamicLossScaler (a stand-in, or its state as a dict) as infinity's LossScaler state, or {}
    for a static scaler (bf16, fp32, a fixed fp16 scale) or none.

    [Note: the window count]  DeepSpeed counts iterations (cur_iter, last_overflow_iter: -1 before any
    overflow) and grows the scale when (cur_iter - last_overflow_iter - 1) is a positive multiple of the
    window; infinity counts the good steps since the last overflow, which is that same difference.
    """
    values = saved if isinstance(saved, dict) else getattr(saved, "__dict__", {})
    if not all(k in values for k in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")):
        return {}
    return {"scale": float(values["cur_scale"]),
            "good_steps": max(int(values["cur_iter"]) - int(values["last_overflow_iter"]) - 1, 0),
            "hysteresis": int(values["cur_hysteresis"])}


def _partitioned(numel: int, world: int) -> int:
    return -(-numel // world)


# ---- reading DeepSpeed's torch.save files ---------------------------------------------------------
class _Standin:
    """An object of a DeepSpeed class (its loss scaler, a config enum) read without DeepSpeed: its state only."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, values: Any) -> None:
        self.__dict__.update(values if isinstance(values, dict) else {"state": values})


ALLOWED = ("torch", "collections", "copyreg", "numpy", "_codecs")
BUILTINS = {"set", "frozenset", "slice", "complex", "bytearray", "range"}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        root = module.split(".")[0]
        if root == "deepspeed":
            return type(name, (_Standin,), {"__module__": module})
        if root in ALLOWED or (module == "builtins" and name in BUILTINS):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not read from a DeepSpeed checkpoint")


_PICKLE = types.SimpleNamespace(Unpickler=_Unpickler, load=pickle.load, __name__="infinity_deepspeed_pickle")


def _load(path: Path) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        raise CheckpointError(str(path), f"cannot be read as a DeepSpeed checkpoint file ({err})",
                              "pass the folder DeepSpeed's save_checkpoint wrote") from None
    if not isinstance(data, dict):
        raise CheckpointError(str(path), f"holds a {type(data).__name__}, not DeepSpeed's dict")
    return data
