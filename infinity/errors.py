"""infinity's error types.  Each carries the context a user needs to act: the key,
path, offset or size involved and the setting to change."""
from __future__ import annotations

import errno as _errno
import os
import signal as _signal
from dataclasses import dataclass


class InfinityError(Exception):
    """Base of every error infinity raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration: where, what, and how to fix it."""

    key: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" + (f" ({self.fix})" if self.fix else "")


class ConfigError(InfinityError, ValueError):
    """A configuration, or a command-line setting, is wrong.  Lists every problem at once."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...], source: str = "config"):
        self.problems = tuple(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.problems)


class NvmePathError(ConfigError):
    """nvme_path is missing, not a folder, not writable, or on a file system that cannot serve it."""

    def __init__(self, path: str, message: str, fix: str, key: str = "nvme_path"):
        self.path = path
        super().__init__([Problem(key, f"{path!r} {message}", fix)], source=key)


class CapacityError(InfinityError):
    """Not enough room on a tier (disk, host memory, buffers) for what was asked."""

    def __init__(self, what: str, needed: int, available: int, fix: str):
        self.needed, self.available = needed, available
        super().__init__(f"{what}: needs {needed} bytes, {available} available; {fix}")


class NativeUnavailable(InfinityError, ImportError):
    """The native libaio engine cannot be loaded here; says why and how to get it."""


class AioError(InfinityError, OSError):
    """An I/O operation failed.  Carries errno, operation, path, offset and size."""

    def __init__(self, err: int, op: str, path: str, offset: int, nbytes: int, detail: str = "", fix: str = ""):
        self.op, self.path, self.offset, self.nbytes, self.fix = op, path, offset, nbytes, fix
        name = _errno.errorcode.get(err, str(err))
        message = f"{op} of {nbytes} bytes at offset {offset} of {path} failed: {os.strerror(err)} ({name})"
        message += (f"; {detail}" if detail else "") + (f"; {fix}" if fix else "")
        OSError.__init__(self, err, message, path)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ShortTransferError(AioError):
    """A read or write moved fewer bytes than asked (for reads: past the end of the file)."""

    def __init__(self, op: str, path: str, offset: int, nbytes: int, expected: int, actual: int, fix: str = ""):
        self.expected, self.actual = expected, actual
        detail = f"short {op}: expected {expected} bytes, got {actual} at file offset {offset}"
        super().__init__(_errno.EIO, op, path, offset, nbytes, detail, fix)


class AlignmentError(AioError):
    """O_DIRECT was required but the buffer address or file offset is not aligned."""

    def __init__(self, op: str, path: str, offset: int, nbytes: int, address: int, alignment: int):
        self.address, self.alignment = address, alignment
        detail = (f"O_DIRECT needs buffer address and file offset aligned to {alignment} bytes; "
                  f"buffer is at 0x{address:x} (address % {alignment} = {address % alignment}), "
                  f"offset % {alignment} = {offset % alignment}")
        fix = ("allocate the buffer with infinity.memory.HostBuffer (aligned), use an aligned offset, "
               "or open the handle with direct=DirectPolicy.AUTO to let unaligned transfers use the page cache")
        super().__init__(_errno.EINVAL, op, path, offset, nbytes, detail, fix)


class SwapChecksumError(AioError):
    """Bytes read back from a swap file differ from what was written there (their crc32c, taken as the
    write was submitted, does not match): a flipped bit on the drive, or something else writing the file.
    Names the file, the offset, the partition and both checksums."""

    def __init__(self, path: str, offset: int, nbytes: int, partition: str, expected: int, found: int):
        self.partition, self.expected, self.found = partition, expected, found
        detail = (f"swap checksum mismatch in partition {partition!r}: crc32c 0x{expected:08x} when written, "
                  f"0x{found:08x} when read back")
        fix = ("the drive or file system returned other bytes than were written; the run stops (its swapped "
               "state is unreliable): restart from the last checkpoint, and check the drive (dmesg, smartctl) "
               "or point nvme_path at another one")
        super().__init__(_errno.EIO, "read", path, offset, nbytes, detail, fix)


class EngineFailed(InfinityError):
    """An earlier error (a failed transfer, a step stopped midway) left the swapped state unreliable;
    the run refuses to go on.  The first error is the cause (`__cause__`) and is named in the message."""

    @classmethod
    def of(cls, cause: BaseException) -> "EngineFailed":
        failed = cls(f"an earlier error left the swapped state unreliable, so this run refuses to go on; start "
                     f"again from a checkpoint. Cause: {type(cause).__name__}: {cause}")
        failed.__cause__ = cause
        return failed


class NonFiniteError(InfinityError):
    """Training produced a NaN or infinite loss or gradient norm and "stop_on_nonfinite" is set: the run
    stops after that step (which changed no weights when the gradient norm was the non-finite one)."""

    def __init__(self, step: int, named: str):
        self.step = step
        super().__init__(f"optimizer step {step}: non-finite {named}; the run stops because stop_on_nonfinite is "
                         f"set. Lower the learning rate (optimizer.params.lr), set gradient_clipping, or use bf16 or "
                         f"fp16 with dynamic loss scaling; then restart from the last checkpoint")


class UsageError(InfinityError):
    """The engine was driven out of order (step before backward, a parameter added after initialize)."""


class ExternalParameterError(UsageError):
    """A partitioned parameter (its values on the offload tier, an empty placeholder in the model) was read
    where the engine could not detect the read and fetch it.  Names the parameters and the fix."""

    def __init__(self, names: list[str], cause: str):
        self.names = names
        super().__init__(f"parameter {', '.join(repr(n) for n in names)} was read while partitioned (an empty "
                         f"placeholder: its values are on the offload tier), outside the forward of the module "
                         f"that owns it, where the engine cannot detect the read (a backward that reads it without "
                         f"autograd having saved it, another thread, or code outside the engine's forward): call "
                         f"infinity.zero.register_external_parameter(module, param) with the module in whose "
                         f"forward or backward it is read, or read it inside infinity.zero.GatheredParameters. "
                         f"torch said: {cause}")


class LossScaleAtMinimum(InfinityError):
    """An fp16 step overflowed with the loss scale already at fp16.min_loss_scale and hysteresis spent: the
    scale cannot shrink, so the run stops (DeepSpeed raises "Current loss scale already at minimum")."""

    def __init__(self, scale: float):
        self.scale = scale
        super().__init__(f"fp16 gradients overflowed with the loss scale at its minimum ({scale:g}); the run stops, "
                         "as DeepSpeed's does. Lower fp16.min_loss_scale, lower the learning rate, or train in bf16")


class RankFailed(InfinityError):
    """A collective between the data-parallel ranks failed: a peer died, or did not answer within the
    process group's timeout.  Names the operation, what it carried and this rank, and (`first`) the rank
    that failed first and its error, when that rank said so (zero/ranks.py's tell_failure)."""

    def __init__(self, op: str, what: str, rank: int, world: int, cause: BaseException, first: str = ""):
        self.op, self.what, self.rank, self.world, self.first = op, what, rank, world, first
        why = (f"{first}" if first else "another rank died or did not answer within the process group's timeout "
               "(infinity.init_distributed(timeout=...))")
        super().__init__(f"{op} of {what} failed on rank {rank} of {world}: {why}; the run "
                         f"cannot go on: restart every rank from the last checkpoint. Cause: "
                         f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")


class CheckpointError(InfinityError):
    """A checkpoint cannot be written or loaded as asked: a file missing, truncated or altered (named with
    its expected and found size or checksum), or a checkpoint of another model or world size."""

    def __init__(self, path: str, message: str, fix: str = ""):
        self.path, self.fix = path, fix
        super().__init__(f"checkpoint {path}: {message}" + (f"; {fix}" if fix else ""))


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run (what `timeout`, systemd, Kubernetes and Slurm send is SIGTERM).
    A KeyboardInterrupt, so every cleanup that runs for Ctrl-C runs for both; the command line tools exit
    with exit_code, 128 + the signal's number (130, 143), as a shell reports a process the signal ended."""

    def __init__(self, signum: int):
        self.signum = signum
        self.signal_name = _signal.Signals(signum).name
        self.during = ""  # what it interrupted ("step 3 of 20"), where the catcher knows
        super().__init__(self.signal_name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
