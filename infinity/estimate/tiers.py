"""Bytes a ZeRO-3 model needs on each tier, per offload option.

Rows without NVMe follow DeepSpeed's ZeRO-3 estimator (`estimate_zero3_model_states_mem_needs`,
1.5 buffer factor), so the figures agree with what users already know.  Rows with NVMe count
what infinity's engine allocates: its two buffer pools (each buffer as large as the engine makes it:
the largest parameter, the largest sub-group of whole parameters), the parameters kept in host memory
(max_in_cpu), and the swap files, with parameters in the config's precision.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

from infinity.config import DIRECT_ALIGNMENT, Config, OffloadDevice
from infinity.config.training import Precision
from infinity.estimate.sizes import Cluster, ModelSize

NONE, CPU, NVME = OffloadDevice.NONE, OffloadDevice.CPU, OffloadDevice.NVME

# DeepSpeed's estimator pads host figures by half again for allocator slack and fragmentation.
BUFFER_NUMERATOR, BUFFER_DENOMINATOR = 3, 2
FP16, FP32 = 2, 4
# Per parameter: fp32 master weight + Adam exp_avg + exp_avg_sq + fp32 gradient.
OPTIMIZER_BYTES = 4 * FP32
# Bytes of a parameter on NVMe and in the parameter pool: the engine keeps them in the compute dtype.
PARAM_BYTES = {Precision.FP16: FP16, Precision.BF16: FP16, Precision.FP32: FP32}


class ZeroInit(enum.Enum):
    """Whether the model is built already partitioned (deepspeed.zero.Init / infinity's init) or
    whole in every process first."""

    ON = "on"
    OFF = "off"


class Basis(enum.Enum):
    """Where a row's figures come from."""

    DEEPSPEED = "deepspeed-estimator"  # DeepSpeed's formula, 1.5 factor on host memory
    INFINITY = "infinity"  # infinity's own allocations, no factor


@dataclass(frozen=True)
class Option:
    offload_param: OffloadDevice
    offload_optimizer: OffloadDevice
    zero_init: ZeroInit

    @property
    def uses_nvme(self) -> bool:
        return NVME in (self.offload_param, self.offload_optimizer)

    def matches(self, config: Config) -> bool:
        zero = config.zero_optimization
        return (zero.offload_param.device, zero.offload_optimizer.device) == (self.offload_param,
                                                                              self.offload_optimizer)


# Parameters may be offloaded only where optimizer states are too (DeepSpeed's estimator skips
# offload_param=cpu with offload_optimizer=none for the same reason).
DEVICE_PAIRS = ((NONE, NONE), (NONE, CPU), (CPU, CPU), (NONE, NVME), (CPU, NVME), (NVME, CPU), (NVME, NVME))
OPTIONS = tuple(Option(p, o, z) for p, o in DEVICE_PAIRS for z in ZeroInit)


@dataclass(frozen=True)
class Need:
    """Bytes on each tier.  `host_parts` breaks host_per_node down (per node) for NVMe rows."""

    per_gpu: int
    host_per_node: int
    nvme_per_node: int
    basis: Basis
    host_parts: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Traffic:
    """NVMe bytes moved per node in one optimizer step, and the bandwidth that hides them in `seconds`."""

    read_per_node: int
    write_per_node: int
    seconds: float

    @property
    def read_bandwidth(self) -> float:
        return self.read_per_node / self.seconds

    @property
    def write_bandwidth(self) -> float:
        return self.write_per_node / self.seconds

    @property
    def bandwidth(self) -> float:
        return (self.read_per_node + self.write_per_node) / self.seconds


def need(option: Option, size: ModelSize, cluster: Cluster, config: Config) -> Need:
    if option.uses_nvme:
        return _infinity_need(option, size, cluster, config)
    return _deepspeed_need(option, size, cluster)


def _deepspeed_need(option: Option, size: ModelSize, cluster: Cluster) -> Need:
    """DeepSpeed's ZeRO-3 estimate, in exact integer arithmetic."""
    total, gpus, nodes = size.total_params, cluster.gpus_per_node, cluster.nodes
    layer = 2 * FP16 * size.largest_layer_params  # the gathered largest layer: parameters + gradients
    if option.offload_optimizer is CPU:
        offloaded_param = option.offload_param is CPU
        gpu = layer if offloaded_param else layer + FP16 * total // cluster.world_size
        per_param = OPTIMIZER_BYTES + (FP16 if offloaded_param else 0)
        if option.zero_init is ZeroInit.ON:
            host_numerator, host_denominator = total * per_param, nodes
        else:  # every process first builds the whole model in fp32
            host_numerator, host_denominator = total * max(FP32 * gpus * nodes, per_param), nodes
    else:
        gpu = layer + (FP16 + OPTIMIZER_BYTES) * total // cluster.world_size
        built = size.largest_layer_params if option.zero_init is ZeroInit.ON else total
        host_numerator, host_denominator = built * FP32 * gpus, 1
    host = host_numerator * BUFFER_NUMERATOR // (host_denominator * BUFFER_DENOMINATOR)
    return Need(per_gpu=gpu, host_per_node=host, nvme_per_node=0, basis=Basis.DEEPSPEED)


def _infinity_need(option: Option, size: ModelSize, cluster: Cluster, config: Config) -> Need:
    """What infinity keeps per rank, times the ranks of a node.

    [Note: what the engine's pools hold]  Gradients and updated parameters are staged through the
    two pools themselves, so there is no third staging buffer.  A parameter-pool buffer holds the
    largest parameter (buffer_size is only its upper limit) in whole 4096-byte blocks, as its swap
    extent; an optimizer-pool buffer the largest sub-group, which is whole parameters: never smaller
    than the largest parameter.  The optimizer pool has buffer_count buffers per sub-group in flight,
    never more sub-groups than there are (infinity/swap/optimizer.py's pool_buffers)."""
    zero = config.zero_optimization
    part = -(-size.total_params // cluster.world_size)  # a rank's partition, in elements
    trained = -(-size.trained // cluster.world_size)  # of it, the elements with optimizer states
    largest = largest_partition(size, cluster)
    param_bytes = PARAM_BYTES[config.precision]
    layer = 2 * FP16 * size.largest_layer_params
    gpu = layer if option.offload_param is not NONE else layer + FP16 * part
    parts: dict[str, int] = {}
    if option.offload_param is CPU:
        parts["fp16_params"] = FP16 * part
    elif option.offload_param is NVME:
        buffer = min(zero.offload_param.buffer_size, largest)  # larger than buffer_size: a config error
        parts["param_pool"] = zero.offload_param.buffer_count * _aligned(buffer * param_bytes)
        parts["params_in_cpu"] = min(zero.offload_param.max_in_cpu, part) * param_bytes
    depth, group = optimizer_pipeline(config, trained, largest)
    if option.offload_optimizer is CPU:
        parts["optimizer_states"] = OPTIMIZER_BYTES * trained
    elif trained:  # a model frozen whole builds no optimizer
        parts["optimizer_pool"] = zero.offload_optimizer.buffer_count * depth * group * FP32
    parts = {name: bytes_ * cluster.gpus_per_node for name, bytes_ in parts.items()}
    host = sum(parts.values())
    if option.zero_init is ZeroInit.OFF:
        host = max(host, FP32 * size.total_params * cluster.gpus_per_node)
    return Need(per_gpu=gpu, host_per_node=host, nvme_per_node=_swap_bytes(option, part, trained, group, config)
                * cluster.gpus_per_node, basis=Basis.INFINITY, host_parts=parts)


def largest_partition(size: ModelSize, cluster: Cluster) -> int:
    """A rank's share of the largest parameter (the largest layer stands in when it is not known)."""
    largest = size.largest_param if size.largest_param is not None else size.largest_layer_params
    return -(-largest // cluster.world_size)


def optimizer_pipeline(config: Config, part: int, largest: int = 0) -> tuple[int, int]:
    """(sub-groups in flight, elements per sub-group) of a rank whose partition is `part` elements
    and whose largest parameter is `largest`: a sub-group holds whole parameters, so it is never
    smaller than the largest one, and never more sub-groups are in flight than the partition has.
    (0, 0) for an empty partition (nothing trained)."""
    group = min(max(config.zero_optimization.sub_group_size, largest), part)
    if group == 0:
        return 0, 0
    return min(config.zero_optimization.offload_optimizer.pipeline_depth, -(-part // group)), group


def shares_master(option: Option, config: Config) -> bool:
    """Whether a trained parameter's NVMe partition is its range of the optimizer's fp32 master file (fp32,
    both on NVMe under one nvme_path: [Note: a partition inside another] in memory/views.py)."""
    zero = config.zero_optimization
    return (option.offload_param is NVME and option.offload_optimizer is NVME
            and config.precision is Precision.FP32
            and zero.offload_param.nvme_path == zero.offload_optimizer.nvme_path)


def _swap_bytes(option: Option, part: int, trained: int, group: int, config: Config) -> int:
    """A rank's swap files: parameters (part elements) in the compute dtype, and per optimizer sub-group of
    the trained ones four fp32 tensors, each extent rounded up to the O_DIRECT alignment.  Trained parameters
    that are master ranges (`shares_master`) take no space of their own, unless zero.Init wrote them first."""
    total = 0
    if option.offload_param is NVME:
        shared = trained if shares_master(option, config) and option.zero_init is ZeroInit.OFF else 0
        total += _aligned(PARAM_BYTES[config.precision] * (part - shared))
    if option.offload_optimizer is NVME and trained:
        full, rest = divmod(trained, group)
        total += OPTIMIZER_BYTES // FP32 * (full * _aligned(FP32 * group) + _aligned(FP32 * rest))
    return total


def traffic(option: Option, size: ModelSize, cluster: Cluster, config: Config, seconds: float) -> Traffic | None:
    """NVMe bytes of one optimizer step: parameters read in forward and backward of every
    micro-step (less those kept in host memory) and written once after the update (not at all where the
    master's write is theirs: `shares_master`); optimizer states and gradients read once and written once
    (trained parameters' only: frozen ones are never written, and have no optimizer states)."""
    if not option.uses_nvme:
        return None
    zero = config.zero_optimization
    steps = config.gradient_accumulation_steps if isinstance(config.gradient_accumulation_steps, int) else 1
    part = -(-size.total_params // cluster.world_size)
    trained = -(-size.trained // cluster.world_size)
    read = write = 0
    if option.offload_param is NVME:
        swapped = part - min(zero.offload_param.max_in_cpu, part)
        read += 2 * steps * PARAM_BYTES[config.precision] * swapped
        write += 0 if shares_master(option, config) else PARAM_BYTES[config.precision] * min(swapped, trained)
    if option.offload_optimizer is NVME:
        read += OPTIMIZER_BYTES * trained
        write += OPTIMIZER_BYTES * trained
    gpus = cluster.gpus_per_node
    return Traffic(read_per_node=read * gpus, write_per_node=write * gpus, seconds=seconds)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
