"""infinity with Hugging Face Transformers (the optional extra `infinity[transformers]`).

Each module adds its public names to __all__ below.
"""
from __future__ import annotations

__all__: list[str] = []
