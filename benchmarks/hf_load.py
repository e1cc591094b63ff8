"""Loading a pretrained Transformers model: infinity's from_pretrained (weights streamed into NVMe partitions)
against plain Transformers' from_pretrained of the same files (into host memory), and infinity's load
bandwidth against the engine's raw write of the same bytes.

    .venv/bin/python benchmarks/hf_load.py --nvme_path /local_nvme --hidden 1024 --layers 8 --rounds 3 \\
        --json bench-out/hf_load.json

A Llama of the given size (fp32, random weights) is written once by save_pretrained into --nvme_path/hf-load
(sharded at --shard), then each round, in this order: plain from_pretrained; infinity from_pretrained with
parameters and optimizer on NVMe under a fresh folder; the engine's own async-IO handle writing the model's
bytes into a new file in --nvme_path (fsync included), as the raw figure.  The weight files are read warm
(from the page cache) by both loaders after the first round.  The peak resident growth of one infinity load
is measured in a process of its own (tests/integration/hf_rss_worker.py).  Medians of the rounds."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import infinity
from infinity.integrations.transformers import from_pretrained
from infinity.io import Access, open_file
from infinity.memory import HostBuffer

ROOT = Path(__file__).resolve().parents[1]
RSS_WORKER = ROOT / "tests" / "integration" / "hf_rss_worker.py"


def config(nvme: Path) -> dict[str, Any]:
    nvme.mkdir(parents=True, exist_ok=True)
    return {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                  "offload_param": {"device": "nvme", "nvme_path": str(nvme)},
                                  "offload_optimizer": {"device": "nvme", "nvme_path": str(nvme)}},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}


def write_model(folder: Path, hidden: int, layers: int, vocab: int, shard: str) -> tuple[int, int]:
    """The Llama's (total bytes, largest tensor's bytes), written to folder once."""
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64 or 64,
                                   num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                   num_key_value_heads=max(1, hidden // 64), vocab_size=vocab,
                                   max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    if not (folder / "config.json").exists():
        model.save_pretrained(folder, max_shard_size=shard)
    return sum(sizes), max(sizes)


def raw_write(engine: Any, path: Path, nbytes: int, chunk: int = 64 << 20) -> float:
    """Seconds for the engine's own handle to write nbytes into a new file, two requests in flight."""
    handle = engine.run.io_handle()
    buffer = HostBuffer(min(chunk, -(-nbytes // 4096) * 4096))
    buffer.tensor.fill_(7)
    started = time.perf_counter()
    with open_file(path, Access.WRITE) as file:
        in_flight, pos = [], 0
        while pos < nbytes:
            if len(in_flight) == 2:
                in_flight.pop(0).wait()
            n = min(buffer.nbytes, -(-(nbytes - pos) // 4096) * 4096)
            in_flight.append(handle.submit_write(buffer.tensor[:n], file, pos))
            pos += n
        for f in in_flight:
            f.wait()
        os.fsync(file.buffered_fd)
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def one_round(folder: Path, nvme: Path, nbytes: int, r: int) -> dict[str, float]:
    started = time.perf_counter()
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder)
    row = {"plain_s": time.perf_counter() - started}
    del plain
    swap = nvme / f"hf-load-swap-{r}"
    started = time.perf_counter()
    model = from_pretrained(transformers.AutoModelForCausalLM, folder, config(swap))
    row["infinity_s"] = time.perf_counter() - started
    engine, *_ = infinity.initialize(model=model, config=config(swap))
    try:
        row["raw_write_s"] = raw_write(engine, swap / "raw-write.bin", nbytes)
    finally:
        engine.close()
        shutil.rmtree(swap, ignore_errors=True)
    return row


def peak_growth(folder: Path, nvme: Path) -> dict[str, Any]:
    small = nvme / "hf-load-small"
    write_model(small, 64, 1, 128, "1GB")
    swap = nvme / "hf-load-rss"
    swap.mkdir(exist_ok=True)
    try:
        done = subprocess.run([sys.executable, str(RSS_WORKER), str(folder), str(swap), str(small)],
                              capture_output=True, text=True, check=True)
    finally:
        shutil.rmtree(swap, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nvme_path", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--shard", default="200MB", help="save_pretrained's max_shard_size for the model files")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    folder = args.nvme_path / f"hf-load-h{args.hidden}-l{args.layers}-v{args.vocab}-{args.shard}"  # one per model
    total, largest = write_model(folder, args.hidden, args.layers, args.vocab, args.shard)
    rows = [one_round(folder, args.nvme_path, total, r) for r in range(args.rounds)]
    median = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    rss = peak_growth(folder, args.nvme_path)
    summary = {"model_bytes": total, "largest_tensor_bytes": largest, "rounds": rows, "median": median,
               "infinity_GBps": total / median["infinity_s"] / 1e9, "raw_write_GBps": total / median["raw_write_s"] / 1e9,
               "infinity_over_plain": median["infinity_s"] / median["plain_s"],
               "infinity_over_raw_write": median["infinity_s"] / median["raw_write_s"],
               "peak_rss_growth_bytes": rss["growth"], "rss_load_s": rss["seconds"]}
    print(f"model {total / 1e6:.1f} MB (largest tensor {largest / 1e6:.1f} MB), {args.rounds} rounds, medians:")
    print(f"  plain from_pretrained     {median['plain_s']:.3f} s")
    print(f"  infinity from_pretrained  {median['infinity_s']:.3f} s  ({summary['infinity_GBps']:.2f} GB/s, "
          f"{summary['infinity_over_plain']:.2f} x plain)")
    print(f"  engine raw write          {median['raw_write_s']:.3f} s  ({summary['raw_write_GBps']:.2f} GB/s; "
          f"infinity load takes {summary['infinity_over_raw_write']:.2f} x)")
    print(f"  peak RSS growth of one infinity load: {rss['growth'] / 1e6:.1f} MB "
          f"({rss['growth'] / largest:.2f} x the largest tensor)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
