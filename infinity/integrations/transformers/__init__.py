"""infinity with Hugging Face Transformers (the optional extra `infinity[transformers]`).

Each module adds its public names to __all__ below.
"""
from __future__ import annotations

from infinity.integrations.transformers.pretrained import LoadingInfo, from_pretrained

__all__: list[str] = ["LoadingInfo", "from_pretrained"]
