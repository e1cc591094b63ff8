"""infinity with Hugging Face Transformers (the optional extra `infinity[transformers]`).

Each module adds its public names to __all__ below.
"""
from __future__ import annotations

from infinity.integrations.transformers.pretrained import LoadingInfo, from_pretrained
from infinity.integrations.transformers.trainer import InfinitySeq2SeqTrainer, InfinityTrainer, resolve_config

__all__: list[str] = ["InfinitySeq2SeqTrainer", "InfinityTrainer", "LoadingInfo", "from_pretrained", "resolve_config"]
