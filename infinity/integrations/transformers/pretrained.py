"""`from_pretrained`: a Transformers model whose weights go from a pretrained folder straight into their
partitions, never whole in host memory.

    from infinity.integrations.transformers import from_pretrained
    model = from_pretrained(AutoModelForCausalLM, "my-model", config="ds_config.json")
    engine, *_ = infinity.initialize(model=model, config="ds_config.json")

[Note: how a model is built and filled]  The model is built on the meta device (no storage, no random
draws: Transformers' own from_pretrained builds it the same way).  Then each module, children before
parents, gets host tensors for its own parameters and meta buffers: a parameter found in the folder is
read (weights.py, one tensor at a time) and converted to dtype; anything not found (a missing key, a
non-persistent buffer such as Llama's rotary inv_freq) is initialised by the model's own _init_weights
for that module, with the loaded tensors flagged `_is_hf_initialized` and written after it, so they are
never overwritten.  Each parameter read is written to its partition at once, by the same store zero.Init
writes to (zero/init.py's InitRun), which initialize then takes over: host memory holds one read buffer
([Note: one read buffer]), the store's write buffers (together one largest tensor; the writes from them
overlap the next reads: [Note: writes left in flight] in zero/init.py), and a module's newly initialised
tensors.  With
offload_param not on nvme the parameters stay in host memory, where the config puts them anyway.

[Note: Parameter objects are replaced]  A meta tensor's storage cannot be swapped for a host one in
place (`.data =` refuses the change of device), so each parameter gets a new nn.Parameter, set on every
module that holds it: tied weights (GPT-2's lm_head and wte, T5's shared embeddings) stay one object,
tied before loading by the model's own constructor, filled and placed once.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from infinity.config import Config
from infinity.config.config import ConfigSource
from infinity.errors import CheckpointError, UsageError
from infinity.integrations.transformers.weights import Weights, open_weights
from infinity.swap.params import Tier
from infinity.zero.from_config import settings_from_config
from infinity.zero.init import InitRun, placed
from infinity.zero.placeholders import guard_state_dict, mark_partitioned
from infinity.zero.ranks import init_distributed

log = logging.getLogger("infinity.integrations")
FLAG = "_is_hf_initialized"  # Transformers' mark of a tensor its init functions must leave alone


@dataclass
class LoadingInfo:
    """What Transformers' from_pretrained(output_loading_info=True) returns beside the model."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[str] = field(default_factory=list)
    error_msgs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return dataclasses.asdict(self)


def from_pretrained(model_class: Any, path: str | Path, config: ConfigSource | Config, *, dtype: Any = None,
                    torch_dtype: Any = None, output_loading_info: bool = False, use_safetensors: bool | None = None,
                    **kwargs: Any) -> Any:
    """model_class (a Transformers model class or Auto class) built from the folder at path, its weights on the
    tiers config (what initialize takes) names.  dtype (or torch_dtype): as Transformers' (default "auto": the
    config's dtype, else the weights'); other keyword arguments update the model's config, as Transformers'
    do.  With output_loading_info=True: (model, {"missing_keys": ..., "unexpected_keys": ..., ...})."""
    transformers = _transformers()
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"from_pretrained: {str(folder)!r} is not a folder; infinity loads local folders only "
                         "(download a hub model first, e.g. with huggingface_hub.snapshot_download)")
    settings = settings_from_config(config if isinstance(config, Config) else Config.load(config))
    hf_config, model_kwargs = transformers.AutoConfig.from_pretrained(folder, return_unused_kwargs=True, **kwargs)
    with open_weights(folder, use_safetensors) as weights:
        wanted = _dtype(dtype if dtype is not None else torch_dtype, hf_config, weights)
        model = _build(transformers, model_class, hf_config, wanted, model_kwargs)
        store = None
        if settings.param_tier is Tier.NVME:
            ranks = init_distributed()  # under torchrun: each rank writes its own piece, as zero.Init does
            store = InitRun(dataclasses.replace(settings, rank=ranks.rank), ranks)
        try:
            info = Loader(transformers, model, weights, wanted, store).load()
            if store is not None:
                store.settle()  # the writes left in flight (zero/init.py) complete before the model is handed out
        except BaseException:
            if store is not None:
                store.close()
            raise
    if store is not None and store.count == 0:
        store.close()  # every parameter stayed resident: initialize opens its own store
    guard_state_dict(model)
    model.eval()  # as Transformers returns it
    _generation_config(transformers, model, folder)
    _report(info, folder, type(model).__name__)
    return (model, info.as_dict()) if output_loading_info else model


class Loader:
    """Fills a meta-built model module by module (see the module's note)."""

    def __init__(self, transformers: Any, model: nn.Module, weights: Weights, dtype: torch.dtype,
                 store: InitRun | None):
        self.transformers, self.model, self.weights, self.dtype, self.store = transformers, model, weights, dtype, store
        self.key_of = _key_mapping(model, weights.names())
        self.owners: dict[int, list[tuple[nn.Module, str, str]]] = {}  # id(param) -> (module, attr, full name)
        for prefix, module in _walk(model):
            for attr, p in module._parameters.items():
                if p is not None:
                    self.owners.setdefault(id(p), []).append((module, attr, prefix + attr))
        self.done: set[int] = set()
        self.scratch: torch.Tensor | None = None  # [Note: one read buffer]
        self.used: set[str] = set()
        self.info = LoadingInfo()

    def load(self) -> LoadingInfo:
        for prefix, module, init_owner in _post_order(self.model, self.transformers.PreTrainedModel):
            self._fill(prefix, module, init_owner)
        ignored_missing = _patterns(self.model, "_keys_to_ignore_on_load_missing")
        self.info.missing_keys = [k for k in self.info.missing_keys if not any(re.search(p, k) for p in ignored_missing)]
        ignored = _patterns(self.model, "_keys_to_ignore_on_load_unexpected")
        non_persistent = {n for n, _ in _non_persistent_buffers(self.model)}
        self.info.unexpected_keys = [k for k in self.weights.names() if k not in self.used and k not in non_persistent
                                     and not any(re.search(p, k) for p in ignored)]
        return self.info

    def _fill(self, prefix: str, module: nn.Module, init_owner: Any) -> None:
        loaded: dict[str, tuple[str, Any]] = {}  # attr -> (kind, checkpoint key)
        fresh = False
        for attr, p in list(module._parameters.items()):
            if p is None or id(p) in self.done:
                continue
            key = self._find([name for _, _, name in self.owners[id(p)]], p.shape)
            new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
            new.__dict__.update(p.__dict__)
            for owner, owner_attr, _ in self.owners[id(p)]:
                owner._parameters[owner_attr] = new
            self.done.add(id(p))
            self.done.add(id(new))
            if key is None:
                fresh = True
                self.info.missing_keys.append(self.owners[id(p)][0][2])
            else:
                setattr(new, FLAG, True)
                loaded[attr] = ("param", key)
        for attr, b in list(module._buffers.items()):
            if b is None or b.device.type != "meta":
                continue
            persistent = attr not in module._non_persistent_buffers_set
            key = self._find([prefix + attr], b.shape) if persistent else None
            module._buffers[attr] = torch.empty(b.shape, dtype=b.dtype)
            if key is None:
                fresh = True
                if persistent:
                    self.info.missing_keys.append(prefix + attr)
            else:
                loaded[attr] = ("buffer", key)
        if fresh:
            with torch.no_grad():
                init_owner._init_weights(module)
        for attr, (kind, key) in loaded.items():
            self._set(module, attr, kind, key)
            if kind == "param":
                self._place(module._parameters[attr])  # before the next read reuses the scratch buffer
        for p in module._parameters.values():
            self._place(p)

    def _place(self, p: Any) -> None:
        if self.store is None or p is None or placed(p) is not None:
            return
        self.store.place(p)
        record = placed(p)
        if record is not None:
            mark_partitioned(p, record.shape)

    def _set(self, module: nn.Module, attr: str, kind: str, key: str) -> None:
        if kind == "buffer":
            module._buffers[attr] = self.weights.read(key).to(module._buffers[attr].dtype)  # type: ignore[union-attr]
            return
        p = module._parameters[attr]
        values = self.weights.read(key, self._scratch(key) if self._leaves(p) else None)
        p.data = values.to(self.dtype) if values.is_floating_point() else values  # type: ignore[union-attr]

    def _leaves(self, p: Any) -> bool:
        """Whether p goes to the store as soon as its module is filled (so its values may be read into the
        scratch buffer): offload_param nvme, and more elements than the persistence threshold."""
        return self.store is not None and p.numel() > self.store.settings.persistence_threshold

    def _scratch(self, key: str) -> torch.Tensor:
        """[Note: one read buffer]  The values of parameters that leave for the store at once are read into
        one host buffer as large as the folder's largest tensor, reused for each: a fresh tensor per parameter
        would leave the allocator's heap holding freed blocks of mixed sizes, and the resident set grows
        with the model instead of staying at a few tensors."""
        spec = self.weights.spec(key)
        nbytes = int(torch.Size(spec.shape).numel()) * torch.empty(0, dtype=spec.dtype).element_size()
        if self.scratch is None or self.scratch.numel() < nbytes:
            largest = max(int(torch.Size(self.weights.spec(n).shape).numel()) *
                          torch.empty(0, dtype=self.weights.spec(n).dtype).element_size() for n in self.weights.names())
            self.scratch = torch.empty(max(largest, nbytes), dtype=torch.uint8)
        return self.scratch[:nbytes].view(spec.dtype).view(spec.shape)

    def _find(self, names: list[str], shape: torch.Size) -> str | None:
        """The checkpoint key holding one of names (a tensor's aliases), checked against shape."""
        for name in names:
            key = self.key_of(name)
            if key is None:
                continue
            stored = self.weights.spec(key).shape
            if tuple(stored) != tuple(shape):
                raise CheckpointError(str(self.weights.folder), f"tensor {key!r} has shape {list(stored)}, but the "
                                      f"model's {name!r} has shape {list(shape)}",
                                      "load it with the config it was saved with (config.json in the folder)")
            self.used.add(key)
            return key
        return None


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise UsageError("infinity.integrations.transformers needs the transformers package: "
                         "pip install 'infinity[transformers]'") from err
    return transformers


def _dtype(asked: Any, hf_config: Any, weights: Weights) -> torch.dtype:
    """Transformers' rule: "auto" (the default) is the config's dtype, else the first floating tensor's."""
    if asked is None or asked == "auto":
        asked = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if asked is None:
            floating = (weights.spec(n).dtype for n in weights.names() if weights.spec(n).dtype.is_floating_point)
            asked = next(floating, torch.get_default_dtype())
    if isinstance(asked, str):
        asked = getattr(torch, asked, None)
    if not isinstance(asked, torch.dtype):
        raise UsageError(f"from_pretrained: dtype {asked!r} is not a torch dtype; pass torch.float32, "
                         "torch.bfloat16, torch.float16 or 'auto'")
    return asked


def _build(transformers: Any, model_class: Any, hf_config: Any, dtype: torch.dtype, kwargs: dict[str, Any]) -> Any:
    """The model on the meta device, tied by its own constructor (see the module's note)."""
    concrete = isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)
    make = model_class._from_config if concrete else getattr(model_class, "from_config", None)
    if make is None:
        raise UsageError(f"from_pretrained: {model_class!r} is not a Transformers model class (it has no "
                         "from_config); pass e.g. AutoModelForCausalLM or LlamaForCausalLM")
    with torch.device("meta"):
        return make(hf_config, dtype=dtype, **kwargs)


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Every (prefix, module) reachable, a shared module once per path (so every alias of a parameter)."""
    yield prefix, module
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}{name}.")


def _post_order(module: nn.Module, pretrained: type, prefix: str = "",
                owner: Any = None) -> Iterator[tuple[str, nn.Module, Any]]:
    """(prefix, module, the nearest PreTrainedModel at or above it), children before their parent."""
    owner = module if isinstance(module, pretrained) else owner
    for name, child in module._modules.items():
        if child is not None:
            yield from _post_order(child, pretrained, f"{prefix}{name}.", owner)
    yield prefix, module, owner


def _non_persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for prefix, module in _walk(model):
        for attr, b in module._buffers.items():
            if b is not None and attr in module._non_persistent_buffers_set:
                yield prefix + attr, b


def _key_mapping(model: nn.Module, stored: list[str]) -> Any:
    """The model's name -> the checkpoint's key: the same, or with the base model's prefix added or removed
    (a base model's weights loaded into a model with a head, or the reverse), as Transformers does."""
    keys = set(stored)
    prefix = getattr(model, "base_model_prefix", "")
    has_base = bool(prefix) and hasattr(model, prefix)
    stored_prefixed = bool(prefix) and any(k.startswith(prefix + ".") for k in keys)

    def key_of(name: str) -> str | None:
        if name in keys:
            return name
        if has_base and not stored_prefixed and name.startswith(prefix + "."):
            bare = name[len(prefix) + 1:]
            return bare if bare in keys else None
        if not has_base and stored_prefixed and f"{prefix}.{name}" in keys:
            return f"{prefix}.{name}"
        return None

    return key_of


def _patterns(model: nn.Module, attr: str) -> list[str]:
    return list(getattr(model, attr, None) or [])


def _generation_config(transformers: Any, model: Any, folder: Path) -> None:
    if (folder / "generation_config.json").is_file() and getattr(model, "can_generate", lambda: False)():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)


def _report(info: LoadingInfo, folder: Path, name: str) -> None:
    """Transformers' two warnings, worded as its own."""
    if info.unexpected_keys:
        log.warning("Some weights of the model checkpoint at %s were not used when initializing %s: %s", folder,
                    name, info.unexpected_keys)
    if info.missing_keys:
        log.warning("Some weights of %s were not initialized from the model checkpoint at %s and are newly "
                    "initialized: %s\nYou should probably TRAIN this model on a down-stream task to be able to use "
                    "it for predictions and inference.", name, folder, info.missing_keys)

