"""The embedded default checkpoint: ``~`` expanded in ``$LLM_KERNELS_CACHE`` and the
directory keyed on preset, seed, dtype and writer version (an older writer's checkpoint is
never reused); it carries the random tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from llm_kernels.checkpoint import defaults
from llm_kernels.checkpoint.writer import WRITER_VERSION


def test_cache_root_expands_user_and_vars(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_KERNELS_CACHE", "~/lk-cache")
    assert defaults.cache_root() == Path.home() / "lk-cache"
    monkeypatch.setenv("LK_TEST_BASE", str(tmp_path))
    monkeypatch.setenv("LLM_KERNELS_CACHE", "$LK_TEST_BASE/c")
    assert defaults.cache_root() == tmp_path / "c"
    monkeypatch.delenv("LLM_KERNELS_CACHE")
    assert defaults.cache_root() == Path.home() / ".cache" / "llm_kernels"


def test_default_checkpoint_is_keyed_and_has_a_tokenizer(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_KERNELS_CACHE", str(tmp_path))
    stale = tmp_path / "qwen3-mini-seed0"  # an older writer's directory: not reused
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    out = defaults.default_checkpoint("qwen3-mini", dtype=torch.float32, progress=False)
    assert out == tmp_path / f"qwen3-mini-seed0-float32-w{WRITER_VERSION}"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    mtime = (out / "config.json").stat().st_mtime_ns
    assert defaults.default_checkpoint("qwen3-mini", dtype=torch.float32, progress=False) == out
    assert (out / "config.json").stat().st_mtime_ns == mtime  # written once
