"""Session-wide fixtures shared by the reference / runtime conformance tests.

``zoo`` writes each test config's random checkpoint once (into a session tmp dir), loads
our weights once per dtype and the transformers ``DeepseekV4ForCausalLM`` once per
(config, dtype, experts backend). Checkpoints are stored in float32, so the float32 loads
are exact and both sides make the same bf16 cast for the bfloat16 loads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import CASES

import transformers  # noqa: E402  (after helpers: keep import order stable)

transformers.logging.set_verbosity_error()


class ModelZoo:
    """Lazily built, cached checkpoints and models of :data:`helpers.CASES`."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self._tmp = tmp_path_factory
        self._dirs: dict[str, Path] = {}
        self._ours: dict[tuple, tuple] = {}
        self._hf: dict[tuple, torch.nn.Module] = {}

    def case(self, name: str):
        return CASES[name]

    def checkpoint(self, name: str) -> Path:
        """Directory of the case's checkpoint (written on first use)."""
        if name not in self._dirs:
            from llm_kernels.checkpoint import write_random_checkpoint

            c = CASES[name]
            d = self._tmp.mktemp(f"ckpt_{name}")
            write_random_checkpoint(c.cfg, d, seed=c.seed, dtype=torch.float32,
                                    weight_scale=c.weight_scale, progress=False)
            self._dirs[name] = d
        return self._dirs[name]

    def ours(self, name: str, dtype: torch.dtype = torch.float32):
        """``(cfg, weights)`` from ``load_checkpoint``. Treat as read-only (shared)."""
        key = (name, dtype)
        if key not in self._ours:
            from llm_kernels.checkpoint import load_checkpoint

            self._ours[key] = load_checkpoint(self.checkpoint(name), dtype=dtype, progress=False)
        return self._ours[key]

    def hf(self, name: str, dtype: torch.dtype = torch.float32, experts: str | None = None):
        """transformers ``DeepseekV4ForCausalLM`` in eval mode, no grad. ``experts`` picks
        the experts backend (``None``: transformers' default, ``grouped_mm`` on CPU;
        ``"eager"``: the per-expert loop accumulating in the model dtype)."""
        key = (name, dtype, experts)
        if key not in self._hf:
            self._hf[key] = self.fresh_hf(name, dtype, experts)
        return self._hf[key]

    def fresh_hf(self, name: str, dtype: torch.dtype = torch.float32, experts: str | None = None):
        """A new (uncached) transformers model, safe to modify."""
        from transformers import DeepseekV4ForCausalLM

        kw = {} if experts is None else {"experts_implementation": experts}
        m = DeepseekV4ForCausalLM.from_pretrained(self.checkpoint(name), dtype=dtype, **kw)
        m.eval().requires_grad_(False)
        return m


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> ModelZoo:
    return ModelZoo(tmp_path_factory)


class Qwen3Zoo:
    """Lazily written checkpoints (float32 storage) and loaded models of
    :data:`qwen3_helpers.Q3_CASES`: ours per dtype/quant, transformers per dtype/attention."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self._tmp = tmp_path_factory
        self._dirs: dict[str, Path] = {}
        self._ours: dict[tuple, tuple] = {}
        self._hf: dict[tuple, torch.nn.Module] = {}

    def case(self, name: str):
        from qwen3_helpers import Q3_CASES

        return Q3_CASES[name]

    def checkpoint(self, name: str) -> Path:
        if name not in self._dirs:
            from llm_kernels.checkpoint import write_random_checkpoint

            c = self.case(name)
            d = self._tmp.mktemp(f"qwen3_{name}")
            write_random_checkpoint(c.cfg, d, seed=c.seed, dtype=torch.float32, weight_scale=c.weight_scale,
                                    progress=False)
            self._dirs[name] = d
        return self._dirs[name]

    def ours(self, name: str, dtype: torch.dtype, quant: str | None = None):
        key = (name, dtype, quant)
        if key not in self._ours:
            from llm_kernels.checkpoint import load_checkpoint

            self._ours[key] = load_checkpoint(self.checkpoint(name), dtype=dtype, progress=False, quant=quant)
        return self._ours[key]

    def hf(self, name: str, dtype: torch.dtype, attn: str = "eager"):
        key = (name, dtype, attn)
        if key not in self._hf:
            m = transformers.Qwen3ForCausalLM.from_pretrained(self.checkpoint(name), dtype=dtype,
                                                              attn_implementation=attn)
            self._hf[key] = m.eval()
        return self._hf[key]


@pytest.fixture(scope="session")
def qwen3_zoo(tmp_path_factory):
    return Qwen3Zoo(tmp_path_factory)
