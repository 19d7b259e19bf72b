"""The layer-benchmark adapters, one per model family, keyed by the ``model_type`` each
serves. A model without an entry has no layer benchmark (the model-level benchmark,
:mod:`.model`, needs none: it runs any registered model through its engine)."""

from __future__ import annotations

from .deepseek_v4 import ADAPTER as _DEEPSEEK_V4
from .qwen3 import ADAPTER as _QWEN3

__all__ = ["ADAPTERS"]

ADAPTERS = {a.model_type: a for a in (_DEEPSEEK_V4, _QWEN3)}
