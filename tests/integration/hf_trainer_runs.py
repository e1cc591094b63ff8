"""Tiny GPT-2 and T5 models built from configs, their data, and one Trainer run (plain Transformers or infinity's),
shared by test_hf_trainer.py and, as a script, the runs it starts in fresh processes (resume, torchrun).

    python hf_trainer_runs.py KIND TRAINER OUT NVME STEPS [--save-steps N] [--resume DIR] [--batch B]

writes OUT/log.json: Trainer's log_history (rank 0)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from infinity.integrations.transformers import InfinitySeq2SeqTrainer, InfinityTrainer

SEQ, TARGET, VOCAB = 16, 8, 256


class Tokens(torch.utils.data.Dataset):
    """n random sequences; causal LM (labels = inputs) or seq2seq (labels: TARGET tokens)."""

    def __init__(self, n: int, seed: int, seq2seq: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(2, VOCAB, (n, SEQ), generator=g)
        self.y = torch.randint(2, VOCAB, (n, TARGET), generator=g) if seq2seq else self.x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def tiny_t5() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.AutoModelForSeq2SeqLM.from_config(cfg)


def nvme_config(nvme: str | Path) -> dict[str, Any]:
    """fp32, parameters and optimizer states on NVMe; the batch, clipping and optimizer values "auto"."""
    zero = {"stage": 3, "sub_group_size": 20_000, "stage3_param_persistence_threshold": 0,
            "offload_param": {"device": "nvme", "nvme_path": str(nvme), "max_in_cpu": 0},
            "offload_optimizer": {"device": "nvme", "nvme_path": str(nvme), "buffer_count": 4}}
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": zero}


def arguments(kind: str, out: str | Path, steps: int, batch: int = 4, save_steps: int = 0, **more: Any):
    cls = Seq2SeqTrainingArguments if kind == "t5" else TrainingArguments
    # [Note: T5 across ranks]  T5's loss is its batch's mean whatever num_items_in_batch says, and Trainer
    # multiplies a loss by the world size when average_tokens_across_devices (made for losses summed over every
    # rank's tokens): two ranks would log, and step on, twice the loss, in plain Trainer as in infinity's.
    extra = ({"predict_with_generate": True, "generation_max_length": TARGET, "average_tokens_across_devices": False}
             if kind == "t5" else {})
    values = dict(output_dir=str(out), per_device_train_batch_size=batch, per_device_eval_batch_size=4,
                  gradient_accumulation_steps=2, max_steps=steps, learning_rate=1e-3, warmup_steps=2,
                  logging_steps=1, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                  report_to=[], seed=0, use_cpu=True, disable_tqdm=True, **extra)
    return cls(**{**values, **more})


def trainer(kind: str, which: str, out: str | Path, nvme: str | Path | None, steps: int, model=None,
            config: Any = None, lr_lambda: Any = None, **args: Any):
    """A Trainer (which="plain") or an infinity one (which="infinity") on kind's model and data.  lr_lambda
    (plain only): Trainer's AdamW with its defaults stepped by a LambdaLR of it, in place of its scheduler."""
    seq2seq = kind == "t5"
    model = model if model is not None else (tiny_t5() if seq2seq else tiny_gpt2())
    common = dict(model=model, args=arguments(kind, out, steps, **args), train_dataset=Tokens(64, 1, seq2seq),
                  eval_dataset=Tokens(8, 2, seq2seq))
    if which == "plain":
        if lr_lambda is not None:
            a = common["args"]
            opt = torch.optim.AdamW(model.parameters(), lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                    eps=a.adam_epsilon, weight_decay=a.weight_decay)
            common["optimizers"] = (opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
        return (Seq2SeqTrainer if seq2seq else Trainer)(**common)
    if nvme is not None:
        Path(nvme).mkdir(exist_ok=True)
    config = config if config is not None else nvme_config(nvme)
    return (InfinitySeq2SeqTrainer if seq2seq else InfinityTrainer)(**common, infinity_config=config)


def losses(t) -> list[dict[str, float]]:
    """The training logs: step, loss, grad_norm and learning_rate of each logged step."""
    return [{k: h[k] for k in ("step", "loss", "grad_norm", "learning_rate")} for h in t.state.log_history
            if "loss" in h]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind"), p.add_argument("which"), p.add_argument("out"), p.add_argument("nvme")
    p.add_argument("steps", type=int)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--resume")
    p.add_argument("--batch", type=int, default=4)
    ns = p.parse_args(argv)
    t = trainer(ns.kind, ns.which, ns.out, ns.nvme, ns.steps, save_steps=ns.save_steps, batch=ns.batch)
    t.train(resume_from_checkpoint=ns.resume)
    result = {"logs": losses(t), "eval_loss": t.evaluate()["eval_loss"], "world": t.engine.run.world}
    if t.is_world_process_zero():
        Path(ns.out, "log.json").write_text(json.dumps(result))
    if t.engine is not None:
        t.engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
