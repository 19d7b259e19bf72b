"""Embedded default checkpoints: a registered preset written once (seeded random weights)
into the cache directory ``$LLM_KERNELS_CACHE`` (default ``~/.cache/llm_kernels``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from .. import models
from ..errors import OutputDirError
from .safetensors_io import DTYPE_NAMES
from .writer import WRITER_VERSION, write_random_checkpoint

__all__ = ["cache_root", "default_checkpoint"]


def cache_root() -> Path:
    """``$LLM_KERNELS_CACHE`` (``~`` and ``$VARS`` expanded) or ``~/.cache/llm_kernels``."""
    env = os.environ.get("LLM_KERNELS_CACHE")
    if env:
        return Path(os.path.expandvars(env)).expanduser()
    return Path.home() / ".cache" / "llm_kernels"


def default_checkpoint(preset: str | None = None, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       progress: bool = True) -> Path:
    """Directory ``<cache_root>/<preset>-seed<seed>-<dtype>-w<WRITER_VERSION>`` holding the random
    checkpoint of ``preset`` (default: the default model's ``default_preset``, ``mini``),
    written on first use in ``dtype`` (tokenizer files included). The writer version and
    dtype in the name mean a checkpoint of an older writer or another dtype is never reused.
    The folder counts as written when it holds ``config.json`` (the writers move a complete
    checkpoint into place in one rename); a folder without it (left by an interrupted older
    writer) is replaced. When two processes write it at once, the first one to finish wins
    and the other uses its checkpoint. Raises ConfigError for an unknown preset."""
    name = preset or models.get(models.DEFAULT_MODEL_TYPE).default_preset
    out = cache_root() / f"{name}-seed{seed}-{DTYPE_NAMES[dtype]}-w{WRITER_VERSION}"
    if not (out / "config.json").exists():
        if progress:
            print(f"writing the default {name} checkpoint to {out}", file=sys.stderr)
        try:
            write_random_checkpoint(models.preset(name), out, seed=seed, dtype=dtype, progress=progress,
                                    force=out.exists())
        except OutputDirError:
            if not (out / "config.json").exists():
                raise
    return out
