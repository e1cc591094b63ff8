"""A small GPT, its data, and the plain-PyTorch reference run the training tests compare against."""
from __future__ import annotations

import torch

from infinity.models.gpt import Gpt, GptSpec, synthetic_batches
from infinity.swap.optimizer import AdamSettings

SPEC = GptSpec(vocab=256, context=32, hidden=64, layers=2, heads=4)
ADAM = AdamSettings(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def make_batches():
    return synthetic_batches(SPEC, batch=4, steps=20)


def fresh_model() -> Gpt:
    torch.manual_seed(0)
    return Gpt(SPEC)


def plain_torch_run(batches, clip: float = 1.0, accumulation: int = 1, model=None):
    """The reference: the same model and seed (or the model given) with torch.optim.AdamW and clip_grad_norm_."""
    model = model if model is not None else fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=ADAM.lr, betas=ADAM.betas, eps=ADAM.eps,
                            weight_decay=ADAM.weight_decay)
    losses = []
    for i, (x, y) in enumerate(batches):
        loss = model(x, y)
        (loss / accumulation).backward()
        losses.append(loss.item())
        if (i + 1) % accumulation == 0:
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def train(engine, batches) -> list[float]:
    """Steps an infinity engine (or anything shaped like one) over batches; the losses."""
    losses = []
    for x, y in batches:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def train_with_schedule(engine, scheduler, batches) -> tuple[list[float], list[float]]:
    """Steps an infinity engine over batches; (the scheduler's lr before each step, each step's loss)."""
    lrs, losses = [], []
    for batch in batches:
        lrs.append(scheduler.get_last_lr()[0])
        losses += train(engine, [batch])
    return lrs, losses
