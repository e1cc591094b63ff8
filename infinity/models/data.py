"""Token data for infinity-train --data: a text file (tokenized with a tokenizer from a local folder, or byte by
byte), a .npy array or a .bin file of token ids; cut into the batches of each step in a fixed order, so that a
run resumed at step k trains on the batches the uninterrupted run would have.

[Note: the layout of a .bin file]  Raw little-endian token ids with no header, as nanoGPT writes them: uint16
when the model's vocabulary fits (at most 65536 ids), uint32 otherwise.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from infinity.errors import ConfigError, Problem

BYTE_VOCAB = 256  # byte-level tokens: each UTF-8 byte is one id
UINT16_VOCAB = 1 << 16


class Target(enum.Enum):
    """What a sequence's labels are."""

    NEXT_TOKEN = "next token"  # a causal LM: labels are the inputs shifted by one
    CONTINUATION = "continuation"  # a seq2seq model: labels are the `context` tokens that follow the inputs


@dataclass(frozen=True)
class Tokens:
    ids: torch.Tensor  # 1-D int64
    source: str  # where they came from, for messages

    def batches(self, batch: int, context: int, first: int, count: int, target: Target = Target.NEXT_TOKEN
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Batches first..first+count-1 of `batch` sequences each.  Sequence s starts at s × span (modulo the
        room), so batch b is the same whatever batch the run started from."""
        span = context + 1 if target is Target.NEXT_TOKEN else 2 * context
        room = len(self.ids) - span + 1
        if room < 1:
            raise ConfigError([Problem("--data", f"{self.source} holds {len(self.ids)} tokens, fewer than one "
                                                 f"sequence of {span} ({target.value} targets at --seq {context})",
                                       "give more text, or a shorter --seq")], source="command line")
        out = []
        for b in range(first, first + count):
            starts = [(s * span) % room for s in range(b * batch, (b + 1) * batch)]
            rows = torch.stack([self.ids[i:i + span] for i in starts])
            cut = -1 if target is Target.NEXT_TOKEN else context
            x, y = rows[:, :cut], rows[:, 1:] if target is Target.NEXT_TOKEN else rows[:, context:]
            out.append((x.contiguous(), y.contiguous()))  # a model may view() its labels
        return out

    def check_vocab(self, vocab: int) -> None:
        top = int(self.ids.max()) if len(self.ids) else 0
        if top >= vocab:
            raise ConfigError([Problem("--data", f"{self.source} holds token id {top}, beyond the model's "
                                                 f"vocabulary of {vocab}",
                                       "use the model's tokenizer (--tokenizer DIR), or a model with a larger "
                                       "vocabulary (--vocab)")], source="command line")


def read_tokens(path: str, vocab: int, tokenizer: str | None = None) -> Tokens:
    """The token ids of `path` (.npy, .bin or text), checked against the model's vocabulary."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError([Problem("--data", f"{path} is not a file", "name a text, .npy or .bin file")],
                          source="command line")
    if file.suffix == ".npy":
        ids = torch.from_numpy(np.asarray(np.load(file), dtype=np.int64).reshape(-1))
    elif file.suffix == ".bin":
        ids = torch.from_numpy(np.fromfile(file, dtype="<u2" if vocab <= UINT16_VOCAB else "<u4").astype(np.int64))
    else:
        ids = _tokenize(file.read_text(encoding="utf-8"), tokenizer)
    tokens = Tokens(ids, f"{path}" + (f" (tokenized by {tokenizer})" if tokenizer else ""))
    tokens.check_vocab(vocab)
    return tokens


def _tokenize(text: str, tokenizer: str | None) -> torch.Tensor:
    if tokenizer is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError([Problem("--tokenizer", "needs the transformers package",
                                   "pip install transformers, or leave out --tokenizer for byte-level tokens")],
                          source="command line") from None
    if not Path(tokenizer, "tokenizer_config.json").is_file() and not Path(tokenizer, "tokenizer.json").is_file():
        raise ConfigError([Problem("--tokenizer", f"{tokenizer} is not a folder holding a tokenizer "
                                                  "(tokenizer.json or tokenizer_config.json)",
                                   "save one with tokenizer.save_pretrained(DIR)")], source="command line")
    return torch.tensor(AutoTokenizer.from_pretrained(tokenizer)(text)["input_ids"], dtype=torch.int64)
