"""The estimate as a table for people and as JSON for machines."""
from __future__ import annotations

from typing import Any

from infinity.estimate import Estimate, Row
from infinity.estimate.tiers import ZeroInit

GIB = 2 ** 30
GB = 10 ** 9


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def to_json(result: Estimate) -> dict[str, Any]:
    """Every figure in bytes (bandwidth in bytes per second)."""
    return {
        "model": {"total_params": result.size.total_params, "trained_params": result.size.trained,
                  "largest_layer_params": result.size.largest_layer_params,
                  "largest_param": result.size.largest_param},
        "cluster": {"gpus_per_node": result.cluster.gpus_per_node, "nodes": result.cluster.nodes,
                    "world_size": result.cluster.world_size},
        "rows": [_row_json(row) for row in result.rows],
        "notes": list(result.notes),
    }


def _row_json(row: Row) -> dict[str, Any]:
    out: dict[str, Any] = {
        "offload_param": row.option.offload_param.value, "offload_optimizer": row.option.offload_optimizer.value,
        "zero_init": row.option.zero_init is ZeroInit.ON, "per_gpu_bytes": row.need.per_gpu,
        "host_per_node_bytes": row.need.host_per_node, "nvme_per_node_bytes": row.need.nvme_per_node,
        "basis": row.need.basis.value, "chosen_by_config": row.chosen,
    }
    if row.need.host_parts:
        out["host_parts_per_node_bytes"] = dict(row.need.host_parts)
    if row.traffic is not None:
        t = row.traffic
        out["per_step"] = {"seconds": t.seconds, "read_per_node_bytes": t.read_per_node,
                           "write_per_node_bytes": t.write_per_node, "read_bytes_per_second": t.read_bandwidth,
                           "write_bytes_per_second": t.write_bandwidth, "bytes_per_second": t.bandwidth}
    return out


def table(result: Estimate) -> str:
    """One line per option; the zero_init on/off pair shares a line where its figures agree."""
    size, cluster = result.size, result.cluster
    frozen = f", {size.trained / 1e6:.0f}M trained" if size.trained != size.total_params else ""
    lines = [f"Model states of {size.total_params / 1e6:.0f}M parameters{frozen} (largest layer "
             f"{size.largest_layer_params / 1e6:.0f}M) on {cluster.nodes} node(s) x {cluster.gpus_per_node} GPU(s), "
             f"world size {cluster.world_size}.",
             "Sizes in GiB (2^30 bytes; DeepSpeed's estimator prints the same figures as \"GB\"); "
             "bandwidth in GB/s (10^9 bytes).", ""]
    with_traffic = any(row.traffic for row in result.rows)
    header = f"  {'offload_param':<14}{'offload_optimizer':<19}{'zero_init':<10}{'per GPU':>9}{'host/node':>11}" \
             f"{'NVMe/node':>11}"
    if with_traffic:
        header += f"{'read/step':>11}{'write/step':>11}{'NVMe GB/s':>11}"
    lines += [header + "  basis"]
    for row, zero_init in _merged(result.rows):
        lines.append(_line(row, zero_init, with_traffic))
    lines.append("")
    if any(row.chosen for row in result.rows):
        lines.append("* the option the given config selects")
    lines.append("deepspeed-estimator: DeepSpeed's ZeRO-3 formula with its 1.5 factor on host memory; "
                 "infinity: the buffers infinity's engine allocates (its two pools, max_in_cpu) and its swap files.")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def _merged(rows: tuple[Row, ...]) -> list[tuple[Row, str]]:
    out: list[tuple[Row, str]] = []
    for on, off in zip(rows[::2], rows[1::2]):
        same = (on.need.per_gpu, on.need.host_per_node, on.need.nvme_per_node, on.traffic) == (
            off.need.per_gpu, off.need.host_per_node, off.need.nvme_per_node, off.traffic)
        out += [(on, "on/off")] if same else [(on, "on"), (off, "off")]
    return out


def _line(row: Row, zero_init: str, with_traffic: bool) -> str:
    mark = "* " if row.chosen else "  "
    text = (f"{mark}{row.option.offload_param.value:<14}{row.option.offload_optimizer.value:<19}{zero_init:<10}"
            f"{gib(row.need.per_gpu):>9}{gib(row.need.host_per_node):>11}{gib(row.need.nvme_per_node):>11}")
    if with_traffic:
        t = row.traffic
        text += (f"{gib(t.read_per_node):>11}{gib(t.write_per_node):>11}{t.bandwidth / GB:>11.2f}" if t
                 else f"{'-':>11}{'-':>11}{'-':>11}")
    return text + f"  {row.need.basis.value}"
