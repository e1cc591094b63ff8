"""Fine-tune a Transformers model with Trainer, its parameters and optimizer states on NVMe through infinity.

    python examples/trainer_nvme.py --nvme /local_nvme --steps 20
    python examples/trainer_nvme.py --nvme /local_nvme --model ./my-gpt2 --text corpus.txt --out ./finetuned

With --model, a saved model folder is streamed into its NVMe partitions (from_pretrained); without it a small
GPT-2 is built from a config.  The config is the Transformers guide's ds_config_zero3.json (shipped as
hf-zero3-nvme) with only nvme_path changed: its "auto" values come from the TrainingArguments below.
The model is saved for plain from_pretrained at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import transformers
from transformers import TrainingArguments

from infinity.config import shipped
from infinity.integrations.transformers import InfinityTrainer, from_pretrained, resolve_config


class Blocks(torch.utils.data.Dataset):
    """A text's UTF-8 bytes (or, without one, a repeated sentence) cut into blocks of `seq` tokens."""

    def __init__(self, text: str, seq: int):
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        self.blocks = ids[: len(ids) // seq * seq].view(-1, seq)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def guide_config(nvme: str) -> dict:
    config = json.loads(shipped.find("hf-zero3-nvme").read_text())
    for block in ("offload_param", "offload_optimizer"):
        config["zero_optimization"][block]["nvme_path"] = nvme
    return config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nvme", required=True, help="an existing folder on the NVMe drive")
    p.add_argument("--model", help="a saved Transformers causal LM folder (byte-level vocabulary of at least 256)")
    p.add_argument("--text", help="a text file to train on (its bytes are the tokens)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--out", default="trainer-out", help="checkpoints and the saved model go here")
    ns = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = TrainingArguments(output_dir=ns.out, max_steps=ns.steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=ns.steps // 10,
                             logging_steps=1, save_steps=max(ns.steps // 2, 1), report_to=[], use_cpu=True)
    config = guide_config(ns.nvme)
    if ns.model:  # its weights go straight into NVMe partitions: the config is resolved before the model exists
        config = resolve_config(config, args, transformers.AutoConfig.from_pretrained(ns.model), ns.steps)
        model = from_pretrained(transformers.AutoModelForCausalLM, ns.model, config)
    else:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=max(ns.seq, 64)))
    text = Path(ns.text).read_text() if ns.text else "The quick brown fox jumps over the lazy dog. " * 200
    trainer = InfinityTrainer(model=model, args=args, train_dataset=Blocks(text, ns.seq), infinity_config=config)
    trainer.train()
    trainer.save_model(f"{ns.out}/final")
    print(f"saved to {ns.out}/final; the last log: {trainer.state.log_history[-2]}")
    trainer.engine.close()


if __name__ == "__main__":
    main()
