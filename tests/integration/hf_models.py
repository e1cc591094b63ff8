"""Tiny Transformers models (GPT-2 with tied embeddings, Llama, T5), their batches and the plain
Transformers + torch AdamW reference run, for the from_pretrained / save_pretrained tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from training_reference import ADAM

import transformers

VOCAB, SEQ, BATCH = 128, 16, 2


def config_of(arch: str) -> transformers.PretrainedConfig:
    if arch == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
                                       bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, embd_pdrop=0.0,
                                       resid_pdrop=0.0)
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0)
    if arch == "t5":
        return transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    raise ValueError(arch)


def auto_class(arch: str):
    return transformers.AutoModelForSeq2SeqLM if arch == "t5" else transformers.AutoModelForCausalLM


def save_plain(arch: str, folder: Path, seed: int = 0, bin_files: int = 0, **save) -> Path:
    """A freshly initialised plain model of arch, written by Transformers' save_pretrained; with bin_files,
    its weights as that many weights-only torch files instead (pytorch_model.bin, or shards and their
    index), as Transformers wrote them before safetensors (its save_pretrained writes only safetensors now)."""
    torch.manual_seed(seed)
    model = auto_class(arch).from_config(config_of(arch))
    model.save_pretrained(folder, **save)
    if bin_files:
        (folder / "model.safetensors").unlink()
        state = model.state_dict()
        if bin_files == 1:
            torch.save(state, folder / "pytorch_model.bin")
            return folder
        keys = list(state)
        names = [f"pytorch_model-{i + 1:05d}-of-{bin_files:05d}.bin" for i in range(bin_files)]
        weight_map = {k: names[i * bin_files // len(keys)] for i, k in enumerate(keys)}
        for name in names:
            torch.save({k: state[k] for k in keys if weight_map[k] == name}, folder / name)
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def batches(steps: int, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (BATCH, SEQ), generator=g) for _ in range(steps)]


def loss_of(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


def plain_run(arch: str, folder: Path, data: list[torch.Tensor]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain from_pretrained, torch AdamW (no clipping): losses and final parameters."""
    model = auto_class(arch).from_pretrained(folder)
    opt = torch.optim.AdamW(model.parameters(), lr=ADAM.lr, betas=ADAM.betas, eps=ADAM.eps,
                            weight_decay=ADAM.weight_decay)
    losses = []
    for x in data:
        loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def train(engine, data: list[torch.Tensor]) -> list[float]:
    losses = []
    for x in data:
        loss = loss_of(engine, x)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def assert_close_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], steps: int,
                         rel: float = 1e-5) -> None:
    """Each parameter within rel (norm of the difference over the norm), except GPT-2's key bias (the third
    of c_attn.bias that softmax ignores: see test_training.assert_same_weights' note), within lr x steps."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        if name.endswith("attn.c_attn.bias"):
            h = w.shape[0] // 3
            assert float((g[h:2 * h] - w[h:2 * h]).abs().max()) <= 2 * ADAM.lr * steps, name
            g, w = torch.cat([g[:h], g[2 * h:]]), torch.cat([w[:h], w[2 * h:]])
        assert float((g - w).norm() / w.norm()) <= rel, name
