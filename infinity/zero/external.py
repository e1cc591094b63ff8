"""Parameters read in the forward of a module that does not own them (a parent computing
`h @ self.embed.weight.t()`, a module using another's weight): detected, fetched, and from then on gathered
with the module that reads them.

[Note: how a read is detected]  While the engine's forward runs, a TorchFunctionMode sees every torch
function (tensor methods and properties included) and its arguments, and hooks on every module of the
model keep the stack of modules whose forward runs.  An offloaded parameter passed to a torch function
when no module on that stack owns it or has it registered is registered as an external parameter of the
innermost one (Coordinator.add_external): it is gathered now, and from the next step on that module's
pre-hook gathers it with its own (the step after a registration is traced again).  An external parameter
stays gathered from its module's forward until the backward ends, so that a backward that reads the
Parameter itself (F.linear saves it), or reads it without autograd (a registered one), finds its values.  Metadata reads (`w.shape`, `w.size()`, `w.dtype`)
register nothing; a partitioned parameter's shape and size are its real ones.

What cannot be detected: a read outside the engine's forward, in another thread, or in a backward that
reads a parameter autograd did not save (a custom autograd.Function's backward reading `module.weight`):
the mode is not active there.  Name such a parameter with `register_external_parameter(module, param)`
(module: the one in whose forward or backward it is read).  If such a read fails on an empty placeholder,
`diagnose` turns the torch error into an ExternalParameterError naming the parameter and that fix.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from infinity.errors import ExternalParameterError, InfinityError, UsageError
from infinity.memory.record import Residency
from infinity.zero.zero_init_access import parameters_in

METADATA = {torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.requires_grad.__get__,
            torch.Tensor.is_leaf.__get__, torch.Tensor.layout.__get__, torch.Tensor.is_cuda.__get__,
            torch.Tensor.grad_fn.__get__, torch.Tensor.__hash__}
SHAPE_READS: dict[Any, Callable[[torch.Size, tuple[Any, ...]], Any]] = {
    torch.Tensor.shape.__get__: lambda shape, args: shape,
    torch.Tensor.size: lambda shape, args: shape if len(args) < 2 else shape[args[1]],
    torch.Tensor.numel: lambda shape, args: shape.numel(),
    torch.Tensor.dim: lambda shape, args: len(shape),
    torch.Tensor.ndim.__get__: lambda shape, args: len(shape),
}


class ExternalParameters(TorchFunctionMode):
    def __init__(self, model: nn.Module, coordinator: Any, names: list[str], shapes: list[torch.Size]):
        super().__init__()
        self.model, self.coordinator, self.names, self.shapes = model, coordinator, names, shapes
        self.index = {id(p): i for i, p in enumerate(coordinator.params) if i in coordinator.offloaded}
        self._own = {id(m): frozenset(self.index[id(p)] for p in m.parameters(recurse=False) if id(p) in self.index)
                     for m in model.modules()}
        self._module_names = {id(m): n or type(m).__name__ for n, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self._hooks = [h for m in model.modules() for h in (
            m.register_forward_pre_hook(self._push, prepend=True),
            m.register_forward_hook(self._pop, always_call=True))]
        self.registered: list[tuple[str, str]] = []  # (module, parameter) as detected or registered
        for m in model.modules():  # registered before initialize
            for p in m.__dict__.pop("_infinity_external", ()):
                if id(p) in self.index:
                    self.register(m, self.index[id(p)])

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """The engine's forward: reads of parameters outside their module are detected inside; a forward
        without grad (no backward follows) lets its external parameters go at its end."""
        self.stack.clear()
        with self.explaining(), self:
            yield
        if not torch.is_grad_enabled():
            self.coordinator.release_externals()

    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        """A torch error raised inside that reads a partitioned, empty parameter becomes an
        ExternalParameterError naming it ([Note: how a read is detected])."""
        try:
            yield
        except (RuntimeError, IndexError, ValueError) as err:
            if not isinstance(err, InfinityError):
                self.diagnose(err)
            raise

    def _push(self, module: nn.Module, args: Any) -> None:
        self.stack.append(module)

    def _pop(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    # ---- the mode -----------------------------------------------------------------------
    def __torch_function__(self, func: Callable[..., Any], types_: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func not in METADATA and self.stack:
            for p in parameters_in(args, kwargs):
                i = self.index.get(id(p))
                if i is None:
                    continue
                if func in SHAPE_READS:
                    if p.data.numel() == 0:
                        return SHAPE_READS[func](self.shapes[i], args)
                    continue
                if not self._held(i):
                    self.register(self.stack[-1], i, detected=True)
        return func(*args, **(kwargs or {}))

    def _held(self, i: int) -> bool:
        """Whether a module whose forward runs owns parameter i or has it registered (it is gathered)."""
        ext = self.coordinator.externals
        return any(i in self._own.get(id(m), ()) or i in ext.get(id(m), ()) for m in self.stack)

    def register(self, module: nn.Module, i: int, detected: bool = False) -> None:
        if id(module) not in self._module_names:
            raise UsageError(f"register_external_parameter: the module {type(module).__name__} is not part of the "
                             f"engine's model; pass the module (of engine.module) in whose forward the parameter "
                             f"is read")
        self.registered.append((self._module_names[id(module)], self.names[i]))
        self.coordinator.add_external(module, self._module_names[id(module)], i, gather_now=detected)

    # ---- the clear error ------------------------------------------------------------------
    def diagnose(self, err: BaseException) -> None:
        """Raises ExternalParameterError (from err) when err's traceback reads a parameter that is
        partitioned and not gathered; otherwise returns."""
        found: list[int] = []
        tb = err.__traceback__
        while tb is not None:
            for i in _empty_params_in_frame(tb.tb_frame, self.index):
                if i not in found:
                    found.append(i)
            tb = tb.tb_next
        if found:
            raise ExternalParameterError([self.names[i] for i in found], str(err)) from err


def _empty_params_in_frame(frame: types.FrameType, index: dict[int, int]) -> list[int]:
    """The partitioned, empty parameters a frame names: its locals and the globals it reads, and up to two
    attributes deep (`ctx.module.weight`) along the names its code uses."""
    code_names = set(frame.f_code.co_names)
    level = [v for v in frame.f_locals.values()] + [frame.f_globals[n] for n in code_names if n in frame.f_globals]
    found: list[int] = []
    for _ in range(3):
        following = []
        for obj in level:
            if isinstance(obj, nn.Parameter):
                i = index.get(id(obj))
                if i is not None and obj.data.numel() == 0:
                    found.append(i)
                continue
            for name in code_names:
                following.append(_attribute(obj, name))
        level = [v for v in following if v is not None]
    return found


def _attribute(obj: Any, name: str) -> Any:
    """obj.name without running properties: a module's parameter or submodule, or an instance attribute."""
    places = [obj._parameters, obj._modules] if isinstance(obj, nn.Module) else []
    d = getattr(obj, "__dict__", None)
    places += [d] if isinstance(d, dict) else []
    for place in places:
        if name in place:
            return place[name]
    return None


def check_placeholders(run: Any) -> None:
    """A UsageError when an offloaded parameter at rest holds something else than its empty placeholder:
    code replaced its .data outside GatheredParameters (resize_token_embeddings without the block reads
    the placeholder's shape [0] and sets a weight of width 0), and the next fetch would silently undo it."""
    residence = run.coordinator.residence
    for i in run.offloaded:
        d = run.params[i].data
        if (d.dim() != 1 or d.shape[0] != 0) and residence.state(i) in (Residency.AT_REST, Residency.READ_AHEAD):
            raise UsageError(f"parameter {run.names[i]!r} is partitioned (its values are on the offload tier) but "
                             f"its .data was replaced outside infinity.zero.GatheredParameters (now of shape "
                             f"{tuple(d.shape)}); change partitioned parameters inside "
                             f"`with infinity.zero.GatheredParameters(params, modifier_rank=0):` (for "
                             f"resize_token_embeddings, the input and output embeddings' weights)")


def register_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """DeepSpeed's function: parameter (of another module) is read in module's forward or backward; the
    engine gathers it with module's own.  Call it after infinity.initialize (before, it is remembered and
    registered when the engine is built)."""
    owner = getattr(parameter, "_infinity_owner", None)
    if owner is None:
        pending = module.__dict__.setdefault("_infinity_external", [])
        pending.append(parameter)
        return
    owner.run.external.register(module, owner.index)
