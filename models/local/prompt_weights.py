"""Moved to models.prompt_weights (hosted backends strip the syntax with it too). Only this
name is left, for models.local.worker, until that module imports models.prompt_weights."""

from __future__ import annotations

from models.prompt_weights import chunk_count

__all__ = ["chunk_count"]
